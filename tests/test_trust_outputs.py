"""Trust in outputs (issue 18, parts 2 and 5): nothing Spectrascope did not create is removed or
replaced, and every output file is written whole or not at all.

- User files and folders that merely look like temporaries (any version's naming, aged), next
  to a ``--save`` destination, in the home, or behind a symlink in the home, survive ``prune
  --save`` and ``spectrascope clean``; only temporaries recorded when they were created (path,
  host, pid, process start) are removed, and only once their process is gone.
- ``--out``/``--eigs``/``--html`` onto an existing file or symlink are refused in one line
  before any work unless ``--overwrite``, which replaces the link itself, never its target.
- A full disk or a file-size limit (EFBIG) while writing an output or a saved model is one line
  naming the destination, and leaves nothing behind.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import time
from pathlib import Path

import pytest

from core import housekeeping
from core.cli import main as cli
from test_faults import home, leftovers, spawn, tiny_folder, wait_for  # noqa: F401 (fixtures)

OLD = time.time() - 3 * 24 * 3600


def run_cli(capsys, *args: str) -> tuple[int, str, list[str]]:
    """Exit code, stdout and the error lines of stderr of one `spectrascope` command."""
    rc = cli(list(args))
    out, err = capsys.readouterr()
    return rc, out, [line for line in err.splitlines() if "error" in line or line.startswith("spectrascope")]


def user_lookalikes(folder: Path) -> dict[Path, str]:
    """A user's own files and folders named like temporaries of every version, two days old:
    ``.NAME.partial-XXXXXXXX`` and ``.NAME.PID.HEX8.tmp`` (older versions) and an owner-tagged
    ``.NAME.partial~HOST~PID~START~HEX8`` naming a dead process of this host."""
    folder.mkdir(parents=True, exist_ok=True)
    host = housekeeping.owner_tag().split("~")[0]
    made = {}
    for name in (".backup.partial-20241231", ".notes.1.abcdef12.tmp",
                 f".thesis.partial~{host}~{2**22 + 4321}~77~0123abcd"):
        path = folder / name
        if name.endswith(".tmp"):
            path.write_text("my notes")
        else:
            path.mkdir()
            (path / "data.txt").write_text("my data")
        os.utime(path, (OLD, OLD))
        made[path] = "my notes" if name.endswith(".tmp") else "my data"
    return made


def intact(made: dict[Path, str]) -> bool:
    return all((p.read_text() if p.is_file() else (p / "data.txt").read_text()) == text for p, text in made.items())


# --- nothing we did not create is removed ------------------------------------------------------

def test_prune_save_keeps_user_files_named_like_temporaries(tiny_folder, home, tmp_path, capsys):
    out = tmp_path / "d"
    made = user_lookalikes(out)
    rc, _, lines = run_cli(capsys, "prune", "--model", str(tiny_folder), "--method", "magnitude", "--device", "cpu",
                           "--quiet", "--save", str(out / "pruned"))
    assert rc == 0, lines
    assert intact(made)
    assert sorted(p.name for p in out.iterdir()) == sorted([*(p.name for p in made), "pruned"])


def test_clean_keeps_user_files_in_the_home_and_lists_them(home, tmp_path, capsys):
    made = {**user_lookalikes(home), **user_lookalikes(home / "analyses")}
    rc, text, lines = run_cli(capsys, "clean", "--dry-run")
    assert rc == 0, lines
    assert all(str(p) in text for p in made) and "left alone" in text, text
    assert "would remove" not in text
    rc, text, lines = run_cli(capsys, "clean")
    assert rc == 0, lines
    assert intact(made) and "removed" not in text.replace("not removed", ""), text


def test_clean_never_follows_a_symlink_in_the_home(home, tmp_path, capsys):
    outside = tmp_path / "my-projects"
    made = user_lookalikes(outside)
    home.mkdir(parents=True, exist_ok=True)
    (home / "projects").symlink_to(outside, target_is_directory=True)
    (home / "models").symlink_to(outside, target_is_directory=True)
    rc, text, lines = run_cli(capsys, "clean")
    assert rc == 0, lines
    assert intact(made)
    assert str(outside) not in text


_WRITE_STUCK = """
import pathlib, sys, time
from core.config import atomic_file
def write(tmp):
    tmp.write_text("half of a table")
    pathlib.Path(sys.argv[2]).write_text("writing")
    time.sleep(600)
atomic_file(sys.argv[1], write)
"""


def test_kill_9_during_an_output_write_anywhere_is_cleaned(home, tmp_path, capsys):
    """The temporary of a killed write is found wherever it lies (here beside an ``--out``
    file, a folder no run recorded), because it was recorded when it was created."""
    out = tmp_path / "elsewhere"
    out.mkdir()
    made = user_lookalikes(out)
    ready = tmp_path / "ready"
    proc = spawn(_WRITE_STUCK, str(out / "table.csv"), str(ready), home=home)
    wait_for(ready, proc)
    (ours,) = [p for p in out.iterdir() if p not in made]
    rc, text, _ = run_cli(capsys, "clean", "--dry-run")
    assert rc == 0 and "would remove" not in text            # a live process's temporary is never touched
    proc.kill()
    proc.wait(timeout=60)
    rc, text, _ = run_cli(capsys, "clean")
    assert rc == 0 and "removed" in text and str(ours) in text and f"pid {proc.pid}" in text, text
    assert not ours.exists() and intact(made)
    assert sorted(out.iterdir()) == sorted(made)


# --- user-named outputs: refused when they exist, written atomically ----------------------------

@pytest.fixture(scope="module")
def tables(tiny_folder, tmp_path_factory) -> tuple[Path, Path]:
    """Two analysis tables of the tiny model (inputs of allocate and compare)."""
    from core.analysis import analyze

    folder = tmp_path_factory.mktemp("tables")
    result = analyze(tiny_folder, device="cpu")
    a, b = folder / "a.csv", folder / "b.csv"
    result.table.to_csv(a, index=False)
    result.table.assign(alpha=result.table["alpha"] + 0.1).to_csv(b, index=False)
    return a, b


def _commands(model: str, a: Path, b: Path, dest: Path) -> dict[str, tuple[list[str], Path]]:
    """command -> (arguments writing ``dest``, the file that must not be replaced)."""
    m = ["--model", model, "--device", "cpu", "--quiet"]
    return {
        "analyze --out": (["analyze", *m, "--out", f"{dest}.csv"], Path(f"{dest}.csv")),
        "analyze --eigs": (["analyze", *m, "--eigs", f"{dest}.npz"], Path(f"{dest}.npz")),
        "allocate --out": (["allocate", "--metrics", str(a), "--sparsity", "0.5", "--quiet", "--out",
                            f"{dest}.csv"], Path(f"{dest}.csv")),
        "compare --out": (["compare", str(a), str(b), "--quiet", "--out", str(dest)], Path(f"{dest}-deltas.csv")),
        "compare --html": (["compare", str(a), str(b), "--quiet", "--html", f"{dest}.html"], Path(f"{dest}.html")),
        "sweep --out": (["sweep", *m, "--methods", "magnitude", "--allocations", "uniform", "--sparsities", "0.5",
                         "--max-windows", "1", "--out", str(dest)], Path(f"{dest}.md")),
        "tune --out": (["tune", *m, "--method", "magnitude", "--epsilons", "0.1", "--xmins", "peak",
                        "--out", f"{dest}.csv"], Path(f"{dest}.csv")),
    }


COMMANDS = ["analyze --out", "analyze --eigs", "allocate --out", "compare --out", "compare --html", "sweep --out",
            "tune --out"]


@pytest.mark.parametrize("command", COMMANDS)
def test_an_existing_output_is_refused_before_any_work(command, tiny_folder, tables, home, tmp_path, capsys):
    args, target = _commands(str(tiny_folder), *tables, tmp_path / "mine")[command]
    target.write_text("my precious results\n")
    start = time.perf_counter()
    rc, out, lines = run_cli(capsys, *args)
    assert rc == 2 and len(lines) == 1, lines
    assert str(target) in lines[0] and "already exists" in lines[0] and "--overwrite" in lines[0], lines[0]
    assert target.read_text() == "my precious results\n"
    assert time.perf_counter() - start < 5
    assert not (home / "analyses").exists() and not (home / "runs.sqlite").exists()   # no work, nothing recorded
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "home") == [target.name]


@pytest.mark.parametrize("overwrite", [False, True], ids=["refused", "--overwrite replaces the link"])
def test_an_output_onto_a_symlink_never_writes_its_target(overwrite, tiny_folder, home, tmp_path, capsys):
    target = tmp_path / "elsewhere" / "theirs.csv"
    target.parent.mkdir()
    target.write_text("not a table of ours\n")
    link = tmp_path / "out.csv"
    link.symlink_to(target)
    rc, _, lines = run_cli(capsys, "analyze", "--model", str(tiny_folder), "--device", "cpu", "--quiet",
                           "--out", str(link), *(["--overwrite"] if overwrite else []))
    assert target.read_text() == "not a table of ours\n"
    if overwrite:
        assert rc == 0, lines
        assert not link.is_symlink() and link.read_text().startswith("name,")
    else:
        assert rc == 2 and len(lines) == 1, lines
        assert str(link) in lines[0] and "symbolic link" in lines[0] and "--overwrite" in lines[0], lines[0]
        assert link.is_symlink() and not (home / "analyses").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "home") == ["elsewhere", "out.csv"]


@pytest.mark.parametrize("command", ["analyze --out", "compare --html", "allocate --out"])
def test_overwrite_replaces_an_existing_output(command, tiny_folder, tables, home, tmp_path, capsys):
    args, target = _commands(str(tiny_folder), *tables, tmp_path / "mine")[command]
    target.write_text("an older result\n")
    rc, _, lines = run_cli(capsys, *args, "--overwrite")
    assert rc == 0, lines
    assert target.read_text() != "an older result\n" and target.stat().st_size > 100
    assert leftovers(tmp_path) == []


def test_html_report_on_a_full_disk_is_one_line_and_leaves_nothing(tables, home, tmp_path, capsys, monkeypatch):
    a, b = tables
    dest = tmp_path / "report.html"
    write_text = Path.write_text

    def full(self, data, *args, **kwargs):
        if "report.html" not in self.name:
            return write_text(self, data, *args, **kwargs)
        write_text(self, data[: len(data) // 2], *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    rc, _, lines = run_cli(capsys, "compare", str(a), str(b), "--quiet", "--html", str(dest))
    assert rc == 2 and len(lines) == 1, lines
    assert str(dest) in lines[0] and "no space left" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "home") == []


# --- a file-size limit (EFBIG) ----------------------------------------------------------------

_LIMITED = """
import resource, signal, sys
from core.cli import main
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
sys.exit(main(sys.argv[2:]))
"""


def _limited(home: Path, limit: int, *args: str) -> tuple[int, list[str]]:
    proc = spawn(_LIMITED, str(limit), *args, home=home)
    _, err = proc.communicate(timeout=300)
    return proc.returncode, [line for line in err.splitlines() if line.startswith(("spectrascope", "Traceback"))]


def test_file_size_limit_during_save_is_one_line_and_leaves_nothing(tiny_folder, home, tmp_path):
    out = tmp_path / "d"
    made = user_lookalikes(out)
    dest = out / "pruned"
    size = (tiny_folder / "model.safetensors").stat().st_size
    rc, lines = _limited(home, size // 2, "prune", "--model", str(tiny_folder), "--method", "magnitude",
                         "--device", "cpu", "--quiet", "--save", str(dest))
    assert rc == 2 and len(lines) == 1, lines
    assert str(dest) in lines[0] and "size limit" in lines[0], lines[0]
    assert not dest.exists() and leftovers(out) == sorted(p.name for p in made) and intact(made)


def test_file_size_limit_writing_the_html_report_is_one_line(tables, home, tmp_path):
    a, b = tables
    dest = tmp_path / "report.html"
    rc, lines = _limited(home, 200_000, "compare", str(a), str(b), "--quiet", "--html", str(dest))
    assert rc == 2 and len(lines) == 1, lines
    assert str(dest) in lines[0] and "size limit" in lines[0], lines[0]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "home") == []
