"""Checks before work (issue 18, part 5): everything a user can fix is refused in one line on
stderr, exit code 2, before a model is loaded and without recording a run; the runs registry
with a bad schema version, read-only, or deleted during a run.

A refusal case checks the exit code, that stderr has exactly one line naming the offending
option or file, that no model was loaded (loading raises here) and the refusal came back well
under the time a model load takes, and that no run was recorded.
"""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import pytest
import transformers

from conftest import saved_tiny
from core.cli import main as cli
from core.registry import Registry
from test_faults import home  # noqa: F401 (fixture)

FAST_S = 1.0          # a refusal: no model load (the tiny model alone takes about a second in-process)


@pytest.fixture(scope="module")
def tiny() -> Path:
    return saved_tiny("llama")


@pytest.fixture
def no_loading(monkeypatch):
    """Loading a model (any route: folder, GGUF conversion, skeleton) fails the test."""
    def loaded(*a, **k):
        raise AssertionError("a model was loaded before the refusal")

    for name in ("from_pretrained", "from_config"):
        monkeypatch.setattr(transformers.AutoModelForCausalLM, name, loaded)


def no_runs(home: Path) -> bool:
    return not (home / "runs.sqlite").exists() or Registry(home / "runs.sqlite").query().empty


def refused(capsys, home: Path, args: list[str], words: list[str]) -> str:
    start = time.perf_counter()
    rc = cli(args)
    seconds = time.perf_counter() - start
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert rc == 2 and len(lines) == 1, (rc, err)
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert seconds < FAST_S, seconds
    assert no_runs(home)
    return lines[0]


def _fill(args: list[str], tmp: Path, tiny: Path) -> list[str]:
    return [a.replace("{tmp}", str(tmp)).replace("{tiny}", str(tiny)) for a in args]


PRUNE = ["prune", "--model", "{tiny}", "--method", "magnitude", "--device", "cpu", "--quiet"]
COMPARE = ["compare", "{tiny}", "{tiny}", "--device", "cpu", "--quiet"]

CASES = {
    # --save: checked before loading, never recorded as a failed run
    "save parent is a file": (PRUNE + ["--save", "{tmp}/afile/out"], ["save", "{tmp}/afile", "is a file"]),
    "save ancestor is a file": (PRUNE + ["--save", "{tmp}/afile/a/b"], ["save", "{tmp}/afile", "is a file"]),
    "save inside the source": (PRUNE + ["--save", "{tiny}/pruned"], ["save", "inside the source", "{tiny}"]),
    "save inside the source of a safetensors file": (
        ["prune", "--model", "{tiny}/model.safetensors", "--method", "magnitude", "--device", "cpu", "--quiet",
         "--save", "{tiny}/pruned"], ["save", "inside the source", "{tiny}"]),
    "streamed save inside the source": (PRUNE + ["--streaming", "--save", "{tiny}/sub/pruned"],
                                        ["save", "inside the source"]),
    "save in a read-only parent": (PRUNE + ["--save", "{tmp}/locked/out"], ["save", "{tmp}/locked"]),
    # file outputs: checked before the work
    "tune out in a missing folder": (["tune", "--model", "{tiny}", "--device", "cpu", "--quiet", "--out",
                                      "{tmp}/missing/scores.csv"], ["--out", "{tmp}/missing", "does not exist"]),
    "tune out onto a model folder": (["tune", "--model", "{tiny}", "--device", "cpu", "--quiet", "--out", "{tiny}"],
                                     ["--out", "{tiny}", "folder"]),
    "tune out into a model folder": (["tune", "--model", "{tiny}", "--device", "cpu", "--quiet", "--out",
                                      "{tiny}/scores.csv"], ["--out", "{tiny}", "model folder"]),
    "analyze out in a missing folder": (["analyze", "--model", "{tiny}", "--device", "cpu", "--quiet", "--out",
                                         "{tmp}/missing/t.csv"], ["--out", "does not exist"]),
    "analyze out not csv or parquet": (["analyze", "--model", "{tiny}", "--device", "cpu", "--quiet", "--out",
                                        "{tmp}/t.txt"], ["--out", ".csv or .parquet"]),
    "analyze eigs in a missing folder": (["analyze", "--model", "{tiny}", "--device", "cpu", "--quiet", "--eigs",
                                          "{tmp}/missing/e.npz"], ["--eigs", "does not exist"]),
    "compare format bogus": (COMPARE + ["--out", "{tmp}/cmp", "--format", "bogus"], ["--format", "bogus"]),
    "compare format without out": (COMPARE + ["--format", "parquet"], ["--format", "--out"]),
    "compare html in a missing folder": (COMPARE + ["--html", "{tmp}/missing/r.html"], ["--html", "does not exist"]),
    "compare html not html": (COMPARE + ["--html", "{tmp}/report.txt"], ["--html", ".html"]),
    "compare out in a missing folder": (COMPARE + ["--out", "{tmp}/missing/cmp"], ["--out", "does not exist"]),
    # N:M prunes every matrix in its pattern: dense kinds cannot be honoured
    "nm with dense kinds": (PRUNE + ["--nm", "2:4", "--dense-kinds", "k,v"], ["2:4", "dense"]),
    # an empty or blank model is not the demo
    "analyze empty model": (["analyze", "--model", "", "--quiet"], ["model", "empty"]),
    "analyze blank model": (["analyze", "--model", "  ", "--quiet"], ["model", "empty"]),
    "zeroshot empty model": (["zeroshot", "--model", "", "--tasks", "boolq", "--quiet"], ["model", "empty"]),
    "zeroshot blank model": (["zeroshot", "--model", " \t", "--tasks", "boolq", "--quiet"], ["model", "empty"]),
    "compare empty source": (["compare", "", "{tiny}", "--quiet"], ["empty"]),
    # options that only matter with another option
    "max windows without eval": (PRUNE + ["--max-windows", "8"], ["--max-windows", "--eval"]),
    "eval seqlen without eval": (PRUNE + ["--eval-seqlen", "64"], ["--eval-seqlen", "--eval"]),
    "eval bos without eval": (PRUNE + ["--eval-bos", "none"], ["--eval-bos", "--eval"]),
    "dataset without eval": (PRUNE + ["--dataset", "c4"], ["--dataset", "--eval"]),
    "epsilon without alpha": (PRUNE + ["--epsilon", "0.2"], ["--epsilon", "--allocation alpha"]),
    "metrics without alpha": (PRUNE + ["--allocation", "owl", "--metrics", "{tmp}/afile"],
                              ["--metrics", "--allocation alpha"]),
    "reverse without alpha": (PRUNE + ["--reverse"], ["--reverse", "--allocation alpha"]),
    "allocate epsilon with uniform": (["allocate", "--profile", "llama-7b-hf", "--sparsity", "0.5", "--method",
                                       "uniform", "--epsilon", "0.2", "--quiet"], ["--epsilon", "--method alpha"]),
    "zeroshot limit without zeroshot": (PRUNE + ["--zeroshot-limit", "5"], ["--zeroshot-limit", "--zeroshot"]),
    "task dir without zeroshot": (PRUNE + ["--task-dir", "{tmp}"], ["--task-dir", "--zeroshot"]),
    "sweep zeroshot limit without zeroshot": (["sweep", "--model", "{tiny}", "--device", "cpu", "--quiet", "--out",
                                               "{tmp}/sw", "--zeroshot-limit", "5"], ["--zeroshot-limit"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_refused_in_one_line_before_loading_and_not_recorded(case, home, tmp_path, tiny, capsys, no_loading):
    args, words = CASES[case]
    (tmp_path / "afile").write_text("mine")
    (tmp_path / "locked").mkdir()
    before = sorted(p.name for p in tiny.iterdir())
    locked = case == "save in a read-only parent"
    with read_only(tmp_path / "locked" / "out", "folder") if locked else nullcontext():
        refused(capsys, home, _fill(args, tmp_path, tiny), _fill(words, tmp_path, tiny))
    assert (tmp_path / "afile").read_text() == "mine"
    assert sorted(p.name for p in tiny.iterdir()) == before          # nothing written into the model's folder
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "home") == ["afile", "locked"]


# --- the registry -------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["'two'", "0", "x'02'", "1.5", "-3"], ids=["text", "zero", "bytes", "fraction",
                                                                           "negative"])
def test_a_bad_schema_version_is_one_line_naming_the_file_and_kept(value, home, tiny, capsys, no_loading):
    path = home / "runs.sqlite"
    Registry(path)
    con = sqlite3.connect(path)
    con.execute(f"UPDATE schema_version SET version = {value}")
    con.commit()
    con.close()
    before = path.read_bytes()
    for args in (["runs"], _fill(PRUNE, home, tiny), ["eval", "--model", str(tiny), "--quiet"]):
        rc = cli(args)
        lines = capsys.readouterr().err.splitlines()
        assert rc == 2 and len(lines) == 1, lines
        assert str(path) in lines[0] and "schema" in lines[0] and "SPECTRASCOPE_HOME" in lines[0], lines[0]
    assert path.read_bytes() == before


@contextmanager
def read_only(path: Path, how: str):
    """``path`` made read-only, for root too: an immutable file (chattr +i) or a read-only bind mount
    of its folder; a plain chmod where this user is not root."""
    if os.geteuid() != 0:
        target = path if how == "file" else path.parent
        mode = target.stat().st_mode
        target.chmod(0o444 if how == "file" else 0o555)
        try:
            yield
        finally:
            target.chmod(mode)
        return
    if how == "file":
        on, off = ["chattr", "+i", str(path)], ["chattr", "-i", str(path)]
        steps = [on]
    else:
        folder = str(path.parent)
        steps, off = [["mount", "--bind", folder, folder], ["mount", "-o", "remount,ro,bind", folder]], \
            ["umount", folder]
    done = 0
    try:
        for step in steps:
            if subprocess.run(step, capture_output=True).returncode != 0:
                pytest.skip(f"cannot make {path} read-only here ({' '.join(step[:2])} failed)")
            done += 1
        yield
    finally:
        if done:
            subprocess.run(off, capture_output=True)


@pytest.mark.parametrize("how", ["file", "folder"])
def test_a_read_only_registry_is_listed_and_writing_commands_refuse_before_work(how, home, tiny, tmp_path, capsys,
                                                                               no_loading):
    path = home / "runs.sqlite"
    reg = Registry(path)
    with reg.record("eval", model="/models/a", method="dense") as run_id:
        reg.update(run_id, perplexity=12.5)
    before = path.read_bytes()
    with read_only(path, how):
        rc = cli(["runs"])
        out, err = capsys.readouterr()
        assert rc == 0, err
        assert "/models/a" in out and "12.500" in out and "done" in out
        for args in (_fill(PRUNE, tmp_path, tiny), ["eval", "--model", str(tiny), "--quiet", "--device", "cpu"],
                     ["sweep", "--model", str(tiny), "--quiet", "--device", "cpu", "--out", str(tmp_path / "sw")],
                     ["zeroshot", "--model", str(tiny), "--tasks", "boolq", "--quiet", "--device", "cpu"]):
            start = time.perf_counter()
            rc = cli(args)
            seconds = time.perf_counter() - start
            lines = capsys.readouterr().err.splitlines()
            assert rc == 2 and len(lines) == 1, lines
            named = str(path) if how == "file" else str(home)
            assert named in lines[0] and ("read-only" in lines[0] or "not writable" in lines[0]), lines[0]
            assert seconds < FAST_S
    assert path.read_bytes() == before
    assert Registry(path).query()["id"].tolist() == [run_id]


def test_a_registry_deleted_during_a_run_gets_the_run_recorded(home, tiny, tmp_path, capsys, caplog, monkeypatch):
    path = home / "runs.sqlite"
    Registry(path).start("eval", model="an earlier run")           # lost with the file: the run is still ours
    save = transformers.PreTrainedModel.save_pretrained
    deleted = []

    def deleting(self, *a, **k):
        for p in home.glob("runs.sqlite*"):
            p.unlink()
            deleted.append(p.name)
        return save(self, *a, **k)

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", deleting)
    rc = cli(_fill(PRUNE, tmp_path, tiny) + ["--save", str(tmp_path / "out"), "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "runs.sqlite" in deleted and (tmp_path / "out").is_dir()
    told = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and str(path) in r.getMessage()]
    assert len(told) == 1 and "recorded" in told[0] and "deleted" in told[0], told     # the user is told, once
    runs = Registry(path).query()
    run_id = int(json.loads(out)["run_id"])
    row = runs.set_index("id").loc[run_id]
    assert row["status"] == "done" and row["output_dir"] == str(tmp_path / "out")
    assert row["achieved_sparsity"] == pytest.approx(0.5) and row["model"] == str(tiny)
    assert len(Registry(path).matrices(run_id)) == 14
