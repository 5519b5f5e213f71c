"""Faults: processes killed mid-write, folders appearing mid-write, concurrent writers,
read-only or misplaced homes, damaged caches and headers, a full disk.

Each case checks that nothing was lost, that no temporary remains after the next run (or
``housekeeping.clean``), and that a user's mistake is reported in one line.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import saved_tiny, tiny_model
from core import housekeeping
from core.analysis import cache_folder, analyze
from core.cli import main as cli
from core.config import NoSpaceLeft, atomic_dir, atomic_file
from core.models import is_converted, wrap_model

ROOT = Path(__file__).resolve().parents[1]


def leftovers(folder: Path) -> list[str]:
    """Names of temporaries (any version's naming) inside ``folder``."""
    return sorted(p.name for p in Path(folder).iterdir() if ".partial" in p.name or p.name.endswith(".tmp"))


def spawn(code: str, *args: str, home: Path, user: int | None = None) -> subprocess.Popen:
    """Run ``code`` in a fresh Python with this worktree importable (as ``user`` when given)."""
    env = {**os.environ, "SPECTRASCOPE_HOME": str(home), "HOME": str(home.parent),
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            user=user, group=user, extra_groups=[] if user is not None else None)


_NOBODY = 65534


def unprivileged() -> int | None:
    """The user to run a permission test as: nobody when root (root may write anywhere) and
    nobody can run this Python, else None (this user)."""
    if os.geteuid() != 0:
        return None
    try:
        subprocess.run([sys.executable, "-c", "pass"], user=_NOBODY, group=_NOBODY, extra_groups=[], check=True,
                       capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return _NOBODY


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    end = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the child exited early: {proc.stderr.read()}")
        if time.time() > end:
            proc.kill()
            raise AssertionError(f"the child never reached {path}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def tiny_folder() -> Path:
    return saved_tiny("llama")


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "home"
    monkeypatch.setenv("SPECTRASCOPE_HOME", str(path))
    return path


# --- user outputs: never replace what this call did not create -------------------------

@pytest.mark.parametrize("content", [True, False], ids=["folder with a file", "empty folder"])
def test_folder_appearing_at_the_destination_mid_write_is_kept(tmp_path, content):
    dest = tmp_path / "out"

    def write(tmp: Path) -> None:
        (tmp / "ours.txt").write_text("ours")
        dest.mkdir()                      # somebody else creates the destination meanwhile
        if content:
            (dest / "theirs.txt").write_text("theirs")

    with pytest.raises(ValueError, match="already exists") as err:
        atomic_dir(dest, write)
    assert "\n" not in str(err.value) and str(dest) in str(err.value)
    assert sorted(p.name for p in dest.iterdir()) == (["theirs.txt"] if content else [])
    assert leftovers(tmp_path) == []


def _race(dest: Path, replace: bool, n: int = 2) -> tuple[list, list]:
    """``n`` threads write ``dest`` at once (all pass the start before any publishes)."""
    barrier = threading.Barrier(n)
    results, errors = [], []

    def writer(i: int) -> None:
        def write(tmp: Path) -> None:
            (tmp / "who.txt").write_text(str(i))
            (tmp / "data.bin").write_bytes(bytes(1000))
            barrier.wait(timeout=30)
        try:
            results.append(atomic_dir(dest, write, replace=replace))
        except ValueError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors


def test_two_concurrent_saves_to_one_folder_the_second_fails(tmp_path):
    dest = tmp_path / "pruned"
    results, errors = _race(dest, replace=False)
    assert results == [dest.resolve()] and len(errors) == 1
    assert "already exists" in str(errors[0]) and "\n" not in str(errors[0])
    assert sorted(p.name for p in dest.iterdir()) == ["data.bin", "who.txt"]
    assert leftovers(tmp_path) == []


def test_concurrent_cache_writers_both_succeed_and_the_winner_is_not_replaced(tmp_path):
    dest = tmp_path / "entry"
    published = threading.Event()
    inode = {}

    def first(tmp: Path) -> None:
        (tmp / "who.txt").write_text("first")

    def second(tmp: Path) -> None:
        (tmp / "who.txt").write_text("second")
        published.wait(timeout=30)

    def run_second() -> None:
        inode["second"] = atomic_dir(dest, second, replace=True)

    t = threading.Thread(target=run_second)
    t.start()
    time.sleep(0.2)
    atomic_dir(dest, first, replace=True)
    reader = open(dest / "who.txt")           # a reader of the first copy
    inode["first"] = os.stat(dest).st_ino
    published.set()
    t.join()
    assert inode["second"] == dest.resolve()
    assert os.stat(dest).st_ino == inode["first"] and (dest / "who.txt").read_text() == "first"
    assert reader.read() == "first"
    reader.close()
    assert leftovers(tmp_path) == []


def test_atomic_file_leaves_no_temporary_on_failure(tmp_path):
    def write(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_file(tmp_path / "x.csv", write)
    assert list(tmp_path.iterdir()) == []


# --- leftovers of killed processes -----------------------------------------------------

_CACHE_WRITE = """
import pathlib, sys, time
import numpy as np
from core.progress import install_interrupt_handlers
install_interrupt_handlers()
savez = np.savez
def stuck(f, **kw):
    savez(f, **kw)
    if "/partial/" in str(getattr(f, "name", f)):   # the finished groups kept on the way: not the cache entry
        return
    pathlib.Path(sys.argv[2]).write_text("writing")
    time.sleep(600)
np.savez = stuck
from core.analysis import analyze
analyze(sys.argv[1], device="cpu")
"""


_IGNORING_SIGINT = """
import pathlib, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)     # inherited so by `nohup spectrascope ... &` (a shell's background)
from core import cli
def slow(args, progress):
    pathlib.Path(sys.argv[1]).write_text("running")
    time.sleep(600)
cli.COMMANDS["runs"] = cli.COMMANDS["runs"]._replace(run=slow)
sys.exit(cli.main(["runs"]))
"""


def test_a_cli_started_with_sigint_ignored_still_stops_on_sigint(home, tmp_path):
    """The dashboard's Cancel is a SIGINT to the job's process group; a process started in the
    background by a shell inherits SIGINT ignored, and the job then ran on (the dashboard, or the
    test suite, started with `nohup ... &`). The CLI makes SIGINT stop its work wherever it runs."""
    ready = tmp_path / "ready"
    proc = spawn(_IGNORING_SIGINT, str(ready), home=home)
    wait_for(ready, proc)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 130, proc.stderr.read()
    assert proc.stderr.read().strip() == "spectrascope runs: interrupted"


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "TERM"])
def test_killed_cache_write_leaves_nothing_after_the_next_run(tiny_folder, home, tmp_path, sig):
    ready = tmp_path / "ready"
    proc = spawn(_CACHE_WRITE, str(tiny_folder), str(ready), home=home)
    wait_for(ready, proc)
    analyses = home / "analyses"
    assert len(leftovers(analyses)) == 1            # the half-written entry, under a temporary name
    proc.send_signal(sig)
    proc.wait(timeout=60)
    assert proc.returncode != 0
    if sig == signal.SIGTERM:                       # like Ctrl-C: the process removes its own temporary
        assert leftovers(analyses) == [], proc.stderr.read()
    result = analyze(tiny_folder, device="cpu")
    assert not result.cached and len(result.table) == 14
    assert leftovers(analyses) == []
    partial = analyses / "partial"
    assert not partial.exists() or all(leftovers(d) == [] for d in partial.iterdir() if d.is_dir())
    assert analyze(tiny_folder, device="cpu").cached


def _recorded(dest: Path, **owner: object) -> Path:
    """A temporary of this process beside ``dest``, its ledger entry then given another ``owner``
    (``start``: a reused pid; ``host``: another machine's process)."""
    tmp = housekeeping.temp_path(dest)
    entry = housekeeping._entry(housekeeping._ledger(), tmp)
    entry.write_text(json.dumps({**json.loads(entry.read_text()), **owner}))
    return tmp


_DIES = """
import sys
from core.housekeeping import temp_path
tmp = temp_path(sys.argv[1])
tmp.mkdir()
(tmp / "model.safetensors").write_bytes(bytes(2000))
print(tmp)
"""


def test_clean_removes_dead_owners_only(home, tmp_path):
    """Only recorded temporaries of dead processes (pid gone, or reused with another start time)
    are removed; a live or remote owner's are kept, and look-alikes that were never recorded
    (forged owner tags, older versions' names, aged) are only listed by ``left_alone``.
    (Before the ledger, this case asserted that the last two were removed on their name alone.)"""
    proc = spawn(_DIES, str(tmp_path / "b"), home=home)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    dead = Path(out.strip())
    live = housekeeping.temp_path(tmp_path / "a")          # this process: alive
    reused = _recorded(tmp_path / "c", start="1")          # our pid, another start time
    remote = _recorded(tmp_path / "d", host="other-host")
    host = housekeeping.owner_tag().split("~")[0]
    forged = tmp_path / f".e{housekeeping.MARK}{host}~{2**22 + 12345}~77~0123abcd"   # never recorded
    legacy = tmp_path / ".f.partial-abcd_123"
    for p in (live, reused, remote, forged, legacy):
        p.mkdir()
        (p / "model.safetensors").write_bytes(bytes(2000))
        os.utime(p, (time.time() - 3 * 24 * 3600,) * 2)
    (tmp_path / "user-folder").mkdir()

    found = housekeeping.clean(dry_run=True)
    assert sorted(x.path.name for x in found) == sorted([dead.name, reused.name])
    assert all(x.bytes == 2000 and "\n" not in str(x) and str(x.path) in str(x) for x in found)
    assert dead.exists()                                    # dry run
    assert housekeeping.left_alone([tmp_path]) == sorted([forged, legacy])
    assert housekeeping.default_roots(tmp_path) == [tmp_path, tmp_path / "home", tmp_path / "user-folder"]
    freed = housekeeping.clean([tmp_path, tmp_path / "missing"])
    assert sorted(x.path.name for x in freed) == sorted(x.path.name for x in found)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [live.name, remote.name, forged.name, legacy.name, "home", "user-folder"])
    assert housekeeping.clean() == []


_CONVERT_STUCK = """
import pathlib, sys, time
import transformers
save = transformers.PreTrainedModel.save_pretrained
def stuck(self, *a, **k):
    save(self, *a, **k)
    pathlib.Path(sys.argv[1]).write_text("saved")
    time.sleep(600)
transformers.PreTrainedModel.save_pretrained = stuck
from core.models import demo_gguf, gguf_to_folder
gguf_to_folder(demo_gguf())
"""

_CONVERT_AND_LOAD = """
import logging
logging.basicConfig(level=logging.INFO, format="%(message)s")
from core.models import load_model
m = load_model("demo", device="cpu")
assert m.summary()["matrices"] == 210
"""


@pytest.mark.slow
def test_killed_then_concurrent_first_conversions_of_the_demo(home, tmp_path):
    """kill -9 during the demo's conversion leaves a temporary; two processes converting at once
    afterwards both succeed (one uses the other's copy) and the temporary is gone."""
    ready = tmp_path / "saved"
    proc = spawn(_CONVERT_STUCK, str(ready), home=home)
    wait_for(ready, proc, timeout=600)
    proc.kill()
    proc.wait()
    models = home / "models"
    assert len(leftovers(models)) == 1

    procs = [spawn(_CONVERT_AND_LOAD, home=home) for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert "converting" in err
    assert sum("meanwhile by another process" in err for _, err in outs) == 1, [e for _, e in outs]
    assert leftovers(models) == []
    (dest,) = [p for p in models.iterdir()]
    assert is_converted(dest)


# --- one line, exit 2 ------------------------------------------------------------------

def _cli(*args: str, capsys) -> tuple[int, str]:
    """The exit code and the error lines (transformers may draw its own progress bars)."""
    rc = cli(list(args))
    err = capsys.readouterr().err
    return rc, "\n".join(line for line in err.splitlines() if "error" in line)


_READ_ONLY = """
import sys
from core.cli import main
sys.exit(main(["analyze", "--model", sys.argv[1], "--quiet", "--device", "cpu"]))
"""


@pytest.mark.parametrize("case", ["read-only", "under a file"])
def test_unwritable_home_is_one_line(tiny_folder, tmp_path, case):
    base = Path(tempfile.mkdtemp(prefix="spectrascope-ro-"))
    base.chmod(0o755)
    user = unprivileged() if case == "read-only" else None
    if case == "read-only" and os.geteuid() == 0 and user is None:
        home = Path("/proc/self")       # root writes through permissions, not into /proc
        if os.access(home, os.W_OK):
            pytest.skip("root, and no folder that root cannot write")
    elif case == "read-only":
        home = base / "home"
        home.mkdir(mode=0o555)
        home.chmod(0o555)
    else:
        (base / "file").write_text("")
        home = base / "file" / "home"
    proc = spawn(_READ_ONLY, str(tiny_folder), home=home, user=user)
    _, err = proc.communicate(timeout=300)
    lines = [line for line in err.splitlines() if "error" in line]
    assert proc.returncode == 2, err
    assert len(lines) == 1 and str(home) in lines[0] and "set SPECTRASCOPE_HOME to a writable folder" in lines[0]


_STALE = """
import sys
from pathlib import Path
from core.config import atomic_dir
from core.models import is_converted
dest = Path(sys.argv[1])
atomic_dir(dest, lambda t: [(t / "config.json").write_text("{}"), (t / "model.safetensors").write_text("w")],
           replace=True, keep=is_converted)
print(sorted(p.name for p in dest.iterdir()))
"""


def test_read_only_stale_folder_in_the_model_cache_is_replaced(tmp_path):
    base = Path(tempfile.mkdtemp(prefix="spectrascope-stale-"))
    models = base / "home" / "models"
    stale = models / "demo-0123"
    (stale / "sub").mkdir(parents=True)
    (stale / "sub" / "tokenizer.json").write_text("{}")
    user = unprivileged()
    for p in (base, base / "home", models, stale, stale / "sub", stale / "sub" / "tokenizer.json"):
        if user is not None:
            os.chown(p, user, user)
        p.chmod(0o755)
    (stale / "sub").chmod(0o555)
    stale.chmod(0o555)
    proc = spawn(_STALE, str(stale), home=base / "home", user=user)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert out.strip() == "['config.json', 'model.safetensors']"
    assert leftovers(models) == []


@pytest.mark.parametrize("damage", ["meta {}", "meta [1,2]", "truncated eigs"])
@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
def test_damaged_analysis_cache_is_recomputed_and_rewritten(home, caplog, damage, use_cache):
    loaded = wrap_model(tiny_model("llama", seed=3), label="tiny")
    first = analyze(loaded, device="cpu")
    folder = cache_folder(loaded.identity, "peak")
    if damage.startswith("meta"):
        (folder / "meta.json").write_text(damage[5:])
    else:
        eigs = folder / "eigs.npz"
        eigs.write_bytes(eigs.read_bytes()[: eigs.stat().st_size // 2])
    with caplog.at_level(logging.WARNING, logger="core.analysis"):
        again = analyze(loaded, device="cpu", use_cache=use_cache)
    assert not again.cached
    if use_cache:
        assert any("damaged analysis cache" in r.getMessage() and str(folder) in r.getMessage()
                   for r in caplog.records)
    np.testing.assert_array_equal(again.table["alpha"], first.table["alpha"])
    third = analyze(loaded, device="cpu")                 # the entry was rewritten
    assert third.cached and json.loads((folder / "meta.json").read_text())["identity"] == loaded.identity
    assert leftovers(folder.parent) == []


def _safetensors(path: Path, header: object, data: bytes = bytes(64)) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


_Q = "model.layers.0.self_attn.q_proj.weight"


@pytest.mark.parametrize("header", [
    [1, 2],
    "text",
    {_Q: {"dtype": "F32", "data_offsets": [0, 64]}},
    {_Q: {"dtype": "F32", "shape": [-4, -4], "data_offsets": [0, 64]}},
    {_Q: {"dtype": "F32", "shape": [4, 8], "data_offsets": [0, 64]}},
    {_Q: {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 6400]}},
], ids=["list", "string", "no shape", "negative", "shape vs offsets", "offsets past the end"])
def test_malformed_safetensors_header_is_one_line(tmp_path, home, capsys, header):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    path = tmp_path / "model.safetensors"
    _safetensors(path, header)
    rc, err = _cli("analyze", "--model", str(path), "--streaming", "--quiet", "--device", "cpu", capsys=capsys)
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert str(path) in err and "corrupt safetensors header" in err


def test_disk_full_writing_an_output_is_one_line(tmp_path, home, capsys, monkeypatch, tiny_folder):
    import pandas as pd

    def full(self, path, *a, **k):
        Path(path).write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_csv", full)
    out = tmp_path / "metrics.csv"
    rc, err = _cli("analyze", "--model", str(tiny_folder), "--out", str(out), "--quiet", "--device", "cpu",
                   capsys=capsys)
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert str(out) in err and "no space left" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]


def test_disk_full_in_safetensors_is_one_line(tmp_path):
    from safetensors import SafetensorError

    def write(tmp: Path) -> None:
        (tmp / "model.safetensors").write_bytes(bytes(100))
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                              'message: "No space left on device" })')

    with pytest.raises(NoSpaceLeft) as err:
        atomic_dir(tmp_path / "model", write)
    assert isinstance(err.value, ValueError) and str(tmp_path / "model") in str(err.value)
    assert "no space left" in str(err.value) and "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_disk_full_writing_the_cache_is_a_warning(home, caplog, monkeypatch):
    loaded = wrap_model(tiny_model("llama", seed=4), label="tiny-full")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", full)
    with caplog.at_level(logging.WARNING, logger="core.analysis"):
        result = analyze(loaded, device="cpu")
    assert len(result.table) == 14
    assert any("no space left" in r.getMessage() for r in caplog.records)
    assert leftovers(home / "analyses") == []


def test_a_dashboard_cancel_that_came_before_the_job_handled_sigint_is_read_from_its_file(home, tmp_path):
    """Cancel touches the job's cancel file, then signals: a job that had not yet installed its
    SIGINT handler (started with SIGINT ignored) stops as it starts, before any work."""
    flag = tmp_path / "cancel"
    flag.touch()
    env = {**os.environ, "SPECTRASCOPE_HOME": str(home), "SPECTRASCOPE_CANCEL_FILE": str(flag),
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "core.cli", "eval", "--model", "demo", "--max-windows", "1"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130 and proc.stderr.strip() == "spectrascope eval: interrupted", proc.stderr
