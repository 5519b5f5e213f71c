"""Faults around recorded runs: `prune --save` killed (-9 and TERM), a folder appearing at the
destination, two saves to one folder, two registry writers, a corrupt registry; runs whose
process is gone read as interrupted; bad arguments refused in one line before any work (and
never recorded); `spectrascope runs` and `spectrascope clean`.

Each case checks that nothing was lost, that nothing stale remains after `clean` or the next
run, that the message is one line, and the registry's status of the run.
"""
from __future__ import annotations

import copy
import json
import os
import signal
import sqlite3
import stat
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import transformers

from conftest import tiny_model
from core import housekeeping
from core.cli import main as cli
from core.models import REPORT_NAME, load_model, save_model, wrap_model
from core.liveness import STALE_S
from core.registry import Registry
from test_faults import home, leftovers, spawn, tiny_folder, unprivileged, wait_for  # noqa: F401 (fixtures)


def registry(home: Path) -> Registry:
    return Registry(home / "runs.sqlite")


def run_cli(capsys, *args: str) -> tuple[int, str, list[str]]:
    """Exit code, stdout and the error lines of stderr of one `spectrascope` command."""
    rc = cli(list(args))
    out, err = capsys.readouterr()
    return rc, out, [line for line in err.splitlines() if "error" in line or "spectrascope" in line]


# --- liveness ----------------------------------------------------------------------------

def _set(reg: Registry, run_id: int, **fields: object) -> None:
    con = sqlite3.connect(reg.path)
    con.execute(f"UPDATE runs SET {', '.join(k + ' = ?' for k in fields)} WHERE id = ?", (*fields.values(), run_id))
    con.commit()
    con.close()


def test_a_run_whose_process_is_gone_reads_as_interrupted(tmp_path):
    reg = Registry(tmp_path / "runs.sqlite")
    ours, dead, reused, remote_old, remote_fresh, legacy = (reg.start("eval", model=f"m{i}") for i in range(6))
    host = housekeeping.owner_tag().split("~")[0]
    _set(reg, dead, pid=2**22 + 4321)                                  # no such process on this host
    _set(reg, reused, process_start="1")                               # our pid, another start time
    _set(reg, remote_old, host="elsewhere", heartbeat_at=time.time() - STALE_S - 5)
    _set(reg, remote_fresh, host="elsewhere", heartbeat_at=time.time())
    _set(reg, legacy, pid=None, host=None, process_start=None, started_at=time.time() - 3 * 24 * 3600)
    runs = reg.query().set_index("id")
    assert runs.loc[ours, "status"] == "running" and runs.loc[ours, "host"] == host
    assert runs.loc[ours, "pid"] == os.getpid()
    for gone in (dead, reused, remote_old, legacy):
        assert runs.loc[gone, "status"] == "interrupted", gone
        assert "interrupted" in runs.loc[gone, "error"] and runs.loc[gone, "finished_at"] > 0
    assert f"pid {2**22 + 4321} on {host}" in runs.loc[dead, "error"]
    assert runs.loc[remote_fresh, "status"] == "running"
    assert reg.query(status="interrupted")["id"].tolist() == [dead, reused, remote_old, legacy]
    assert reg.query(status="running")["id"].tolist() == [ours, remote_fresh]


def test_the_heartbeat_is_renewed_while_running_and_stops_after(tmp_path):
    reg = Registry(tmp_path / "runs.sqlite")
    run_id = reg.start("eval", model="m")
    first = reg.get(run_id)["heartbeat_at"]
    stop = reg.heartbeat(run_id, every=0.05)
    time.sleep(0.5)
    beat = reg.get(run_id)["heartbeat_at"]
    assert beat > first
    reg.finish(run_id)
    stop.set()
    time.sleep(0.2)
    assert reg.get(run_id)["heartbeat_at"] <= time.time() and reg.get(run_id)["status"] == "done"


def test_an_older_database_gets_the_new_columns_and_keeps_its_rows(tmp_path):
    path = tmp_path / "runs.sqlite"
    con = sqlite3.connect(path)
    con.executescript("""
        CREATE TABLE schema_version (version INTEGER NOT NULL); INSERT INTO schema_version VALUES (1);
        CREATE TABLE runs (id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, status TEXT NOT NULL,
            error TEXT, model TEXT, model_identity TEXT, method TEXT, allocation TEXT, sparsity REAL, epsilon REAL,
            mapping TEXT, nm TEXT, allocation_params TEXT, calibration TEXT, achieved_sparsity REAL,
            eval_dataset TEXT, eval_seqlen INTEGER, eval_windows INTEGER, perplexity REAL, tokens_per_second REAL,
            prune_seconds REAL, eval_seconds REAL, device TEXT, dtype TEXT, output_dir TEXT, versions TEXT,
            started_at REAL NOT NULL, finished_at REAL);
        INSERT INTO runs (kind, status, model, perplexity, started_at) VALUES ('eval', 'done', 'old', 12.5, 1.0);
    """)
    con.close()
    reg = Registry(path)
    new = reg.start("eval", model="new")
    runs = reg.query().set_index("id")
    assert runs.loc[1, "model"] == "old" and runs.loc[1, "perplexity"] == 12.5 and runs.loc[1, "status"] == "done"
    assert runs.loc[new, "pid"] == os.getpid()


# --- killed during `prune --save` -------------------------------------------------------

_SAVE = """
import pathlib, sys, time
import transformers
from core.cli import main
ready, model, dest = sys.argv[1:4]
other = sys.argv[4] if len(sys.argv) > 4 else None
save = transformers.PreTrainedModel.save_pretrained
def paused(self, path, *a, **k):
    save(self, path, *a, **k)
    pathlib.Path(ready).write_text(str(path))
    if other is None:
        time.sleep(600)                       # to be killed here
    while not pathlib.Path(other).exists():   # two writers: both reach this point before either publishes
        time.sleep(0.05)
transformers.PreTrainedModel.save_pretrained = paused
sys.exit(main(["prune", "--model", model, "--method", "magnitude", "--device", "cpu", "--quiet", "--save", dest]))
"""


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "TERM"])
def test_killed_prune_save(tiny_folder, home, tmp_path, capsys, sig):
    out = tmp_path / "outputs"
    out.mkdir()
    (out / "earlier-model").mkdir()                  # the user's own folder: never touched
    dest, ready = out / "pruned", tmp_path / "ready"
    proc = spawn(_SAVE, str(ready), str(tiny_folder), str(dest), home=home)
    wait_for(ready, proc)
    assert len(leftovers(out)) == 1                   # the half-written model, under a temporary name
    assert registry(home).query()["status"].tolist() == ["running"]
    proc.send_signal(sig)
    proc.wait(timeout=120)
    err = proc.stderr.read()
    run = registry(home).query().iloc[-1]
    assert not dest.exists()
    if sig == signal.SIGTERM:                         # like Ctrl-C: cleans up and records the run cancelled
        assert proc.returncode == 130, err
        assert [line for line in err.splitlines() if line.startswith(("spectrascope ", "Traceback"))] == [
            "spectrascope prune: interrupted"], err
        assert run["status"] == "cancelled" and "signal 15" in run["error"]
        assert leftovers(out) == []
    else:
        assert run["status"] == "interrupted" and f"pid {proc.pid}" in run["error"]
        rc, text, _ = run_cli(capsys, "runs", "--status", "interrupted")
        assert rc == 0 and f" {run['id']} " in f" {text.splitlines()[1]} " and "interrupted" in text
        rc, text, _ = run_cli(capsys, "clean", "--dry-run")   # found through the run's output folder
        lines = text.strip().splitlines()
        assert rc == 0 and len(lines) == 2 and lines[0].startswith("would remove") and str(out) in lines[0]
        assert f"pid {proc.pid}" in lines[0] and lines[1].startswith("would free") and "in 1 leftover" in lines[1]
        assert len(leftovers(out)) == 1
        rc, text, _ = run_cli(capsys, "clean")
        assert rc == 0 and text.startswith("removed") and leftovers(out) == []
        assert run_cli(capsys, "clean")[1].startswith("nothing to clean")
    assert sorted(p.name for p in out.iterdir()) == ["earlier-model"]
    # the next run to the same folder works and leaves nothing else
    rc, _, lines = run_cli(capsys, "prune", "--model", str(tiny_folder), "--method", "magnitude", "--device", "cpu",
                           "--quiet", "--save", str(dest))
    assert rc == 0, lines
    assert sorted(p.name for p in out.iterdir()) == ["earlier-model", "pruned"]


def test_two_concurrent_saves_to_one_folder(tiny_folder, home, tmp_path):
    dest = tmp_path / "pruned"
    ready = [tmp_path / "ready0", tmp_path / "ready1"]
    procs = [spawn(_SAVE, str(ready[i]), str(tiny_folder), str(dest), str(ready[1 - i]), home=home) for i in (0, 1)]
    outs = [p.communicate(timeout=600) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outs
    (loser_err,) = [err for p, (_, err) in zip(procs, outs) if p.returncode == 2]
    errors = [line for line in loser_err.splitlines() if "error" in line]
    assert len(errors) == 1 and "already exists" in errors[0] and str(dest) in errors[0], loser_err
    runs = registry(home).query().set_index("id")
    assert sorted(runs["status"]) == ["done", "failed"]
    winner = runs.index[runs["status"] == "done"][0]
    assert json.loads((dest / REPORT_NAME).read_text())["run_id"] == winner   # the winner's model, whole
    assert load_model(dest, device="cpu", tokenizer=False).summary()["matrices"] == 14
    assert leftovers(tmp_path) == []


def test_a_folder_appearing_at_the_destination_mid_save_is_kept(tiny_folder, home, tmp_path, capsys, monkeypatch):
    dest = tmp_path / "pruned"
    save = transformers.PreTrainedModel.save_pretrained

    def meanwhile(self, path, *a, **k):
        save(self, path, *a, **k)
        dest.mkdir()
        (dest / "theirs.txt").write_text("theirs")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", meanwhile)
    rc, _, lines = run_cli(capsys, "prune", "--model", str(tiny_folder), "--method", "magnitude", "--device", "cpu",
                           "--quiet", "--save", str(dest))
    assert rc == 2 and len(lines) == 1 and "already exists" in lines[0] and str(dest) in lines[0]
    assert [p.name for p in dest.iterdir()] == ["theirs.txt"] and (dest / "theirs.txt").read_text() == "theirs"
    assert leftovers(tmp_path) == []
    assert registry(home).query()["status"].tolist() == ["failed"]


def test_saved_files_have_the_usual_modes_and_a_relative_save_is_recorded_absolute(
        tiny_folder, home, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    old = os.umask(0o022)
    try:
        rc, _, lines = run_cli(capsys, "prune", "--model", str(tiny_folder), "--method", "magnitude", "--device",
                               "cpu", "--quiet", "--save", "out/pruned")
    finally:
        os.umask(old)
    assert rc == 0, lines
    dest = tmp_path / "out" / "pruned"
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in dest.iterdir()}
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}, modes
    assert stat.S_IMODE(dest.stat().st_mode) == 0o755
    assert registry(home).query()["output_dir"].tolist() == [str(dest)]


# --- the registry ------------------------------------------------------------------------

_WRITER = """
import sys
from core.registry import Registry
reg = Registry(sys.argv[1])
for i in range(int(sys.argv[2])):
    with reg.record("eval", model=sys.argv[3], method="dense") as run_id:
        reg.update(run_id, perplexity=float(i))
"""


def test_two_processes_write_the_registry_at_once(tmp_path):
    path = tmp_path / "home" / "runs.sqlite"           # created by the writers themselves, at once
    procs = [spawn(_WRITER, str(path), "40", f"writer{i}", home=tmp_path / "home") for i in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    runs = Registry(path).query()
    assert len(runs) == 80 and runs["id"].is_unique and set(runs["status"]) == {"done"}
    for i in (0, 1):
        assert sorted(runs.loc[runs["model"] == f"writer{i}", "perplexity"]) == [float(k) for k in range(40)]


@pytest.mark.parametrize("case", ["garbage", "folder", "empty sqlite header"])
def test_a_corrupt_registry_is_one_line_and_kept(tiny_folder, home, capsys, case):
    home.mkdir(parents=True)
    path = home / "runs.sqlite"
    if case == "folder":
        path.mkdir()
        (path / "keep.txt").write_text("mine")
    else:
        path.write_bytes(b"SQLite format 3\x00" + bytes(84) if case != "garbage" else b"these are not runs\n" * 50)
    before = path.read_bytes() if path.is_file() else None
    for args in (["runs"], ["prune", "--model", str(tiny_folder), "--method", "magnitude", "--device", "cpu",
                            "--quiet"]):
        rc, _, lines = run_cli(capsys, *args)
        assert rc == 2 and len(lines) == 1, lines
        assert str(path) in lines[0] and ("move it" in lines[0]) and "SPECTRASCOPE_HOME" in lines[0]
    if before is not None:
        assert path.read_bytes() == before
    else:
        assert (path / "keep.txt").read_text() == "mine"
    rc, text, _ = run_cli(capsys, "clean")          # cleaning does not need the registry
    assert rc == 0 and "nothing to clean" in text


_UNREADABLE = """
import sys
from core.cli import main
sys.exit(main(["runs"]))
"""


def test_an_unreadable_registry_is_one_line(tmp_path):
    user = unprivileged()
    if os.geteuid() == 0 and user is None:
        pytest.skip("root reads every file and nobody cannot run this Python")
    base = Path(tmp_path / "base")
    home = base / "home"
    Registry(home / "runs.sqlite")
    for p in (tmp_path, base, home):
        p.chmod(0o777)
    (home / "runs.sqlite").chmod(0o000)
    proc = spawn(_UNREADABLE, home=home, user=user)
    _, err = proc.communicate(timeout=300)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, err
    assert str(home / "runs.sqlite") in lines[0] and "permission denied" in lines[0]


# --- `spectrascope runs` ------------------------------------------------------------------

def test_runs_lists_filters_and_prints_json(home, capsys):
    reg = registry(home)
    with reg.record("eval", model="/models/a", model_identity="folder:a", method="dense") as dense:
        reg.update(dense, perplexity=20.0)
    with reg.record("prune", model="/models/a", model_identity="folder:a", method="wanda", allocation="alpha",
                    sparsity=0.7, epsilon=0.3, output_dir="/out/x") as pruned:
        reg.update(pruned, perplexity=31.25)
    with pytest.raises(RuntimeError):
        with reg.record("prune", model="/models/b", method="magnitude", allocation="uniform", sparsity=0.5):
            raise RuntimeError("boom")
    rc, text, _ = run_cli(capsys, "runs")
    lines = text.strip().splitlines()
    assert rc == 0 and lines[0].split() == ["id", "kind", "status", "model", "settings", "perplexity", "started",
                                            "output_dir"]
    assert len(lines) == 4
    assert lines[2].split()[:4] == [str(pruned), "prune", "done", "/models/a"]
    assert "wanda alpha S=0.7 eps=0.3" in lines[2] and "31.250" in lines[2] and lines[2].endswith("/out/x")
    assert lines[3].split()[2] == "failed" and "magnitude uniform S=0.5" in lines[3]
    rc, text, _ = run_cli(capsys, "runs", "--model", "models/a", "--last", "1", "--json")
    rows = json.loads(text)
    assert rc == 0 and [r["id"] for r in rows] == [pruned] and rows[0]["perplexity"] == 31.25
    assert rows[0]["pid"] == os.getpid() and rows[0]["versions"]["python"]
    rc, text, _ = run_cli(capsys, "runs", "--status", "failed", "--json")
    assert [r["error"] for r in json.loads(text)] == ["RuntimeError: boom"]
    rc, text, _ = run_cli(capsys, "runs", "--status", "cancelled")
    assert rc == 0 and text.startswith("no runs matching")
    rc, _, lines = run_cli(capsys, "runs", "--last", "0")
    assert rc == 2 and len(lines) == 1 and "--last=0" in lines[0]


# --- one line, before the work, not recorded ---------------------------------------------

MISSING_MODEL = "/no/such/model/folder"     # a check that came after loading would report this instead


@pytest.mark.parametrize("args, words", [
    (["sweep", "--sparsities", "0.5,1.5"], ["--sparsities", "1.5 not in [0, 1)"]),
    (["sweep", "--sparsities", ","], ["--sparsities", "no value"]),
    (["sweep", "--sparsities", "0.5,x"], ["--sparsities", "numbers"]),
    (["sweep", "--epsilons", "wanda=0.2,sparsegpt=2"], ["--epsilons", "2 not in [0, 1)"]),
    (["sweep", "--out", "{tmp}"], ["--out", "{tmp}.csv", "it is a folder"]),
    (["sweep", "--out", "{tmp}/missing/stem"], ["--out", "does not exist"]),
    (["tune-epsilon", "--holdout-windows", "0"], ["--holdout-windows", ">= 1"]),
    (["tune-epsilon", "--epsilons", "0.1,-0.2"], ["--epsilons", "-0.2 not in [0, 1)"]),
], ids=["sparsity above 1", "no sparsity", "sparsity not a number", "epsilon above 1", "out is a folder",
        "out folder missing", "holdout windows 0", "negative epsilon"])
def test_bad_arguments_are_refused_before_loading_and_not_recorded(home, tmp_path, capsys, args, words):
    (tmp_path / "stem.csv").mkdir()
    args = [a.replace("{tmp}", str(tmp_path / "stem")) for a in args]
    rc, _, lines = run_cli(capsys, args[0], "--model", MISSING_MODEL, "--device", "cpu", "--quiet", *args[1:])
    assert rc == 2 and len(lines) == 1, lines
    for word in words:
        assert word.replace("{tmp}", str(tmp_path / "stem")) in lines[0], lines[0]
    assert MISSING_MODEL not in lines[0]
    assert not (home / "runs.sqlite").exists() or registry(home).query().empty


def test_allocate_out_naming_a_folder_is_one_line(home, tmp_path, capsys):
    (tmp_path / "ratios").mkdir()
    rc, _, lines = run_cli(capsys, "allocate", "--profile", "llama-7b-hf", "--sparsity", "0.5", "--out",
                           str(tmp_path / "ratios"), "--quiet")
    assert rc == 2 and len(lines) == 1 and str(tmp_path / "ratios") in lines[0] and "folder" in lines[0]
    assert list((tmp_path / "ratios").iterdir()) == []


@pytest.mark.parametrize("content, words", [
    (bytes(range(256)) * 4, ["binary"]),
    (b"", ["empty"]),
    (b"name,alpha\nmodel.layers.0.self_attn.q_proj,3.1\nmodel.layers.0.self_attn.k_proj,abc\n", ["line 3", "'abc'"]),
    (b"matrix,alpha\nx,3\n", ["no column name"]),
], ids=["binary", "empty", "not a number", "no name column"])
def test_a_bad_metrics_file_is_one_line_naming_it(home, tmp_path, capsys, tiny_folder, content, words):
    path = tmp_path / "metrics.csv"
    path.write_bytes(content)
    for args in (["allocate", "--metrics", str(path), "--sparsity", "0.5", "--quiet"],
                 ["prune", "--model", str(tiny_folder), "--method", "magnitude", "--allocation", "alpha",
                  "--metrics", str(path), "--device", "cpu", "--quiet"]):
        rc, _, lines = run_cli(capsys, *args)
        assert rc == 2 and len(lines) == 1, lines
        assert f"metrics file {path}" in lines[0] and all(w in lines[0] for w in words), lines[0]
    assert not (home / "runs.sqlite").exists() or registry(home).query().empty   # refused, not a failed run


def test_an_unexpected_error_is_one_line_and_a_log_with_the_traceback(home, capsys, monkeypatch):
    from core.cli import runs as runs_command

    def broken(*a, **k):
        raise KeyError("a bug")

    monkeypatch.setattr(runs_command, "select_runs", broken)
    rc, _, lines = run_cli(capsys, "runs")
    assert rc == 1 and len(lines) == 1 and "KeyError" in lines[0] and "a bug" in lines[0]
    log = Path(lines[0].rpartition("full traceback in ")[2].rstrip(")"))
    assert log.parent == home / "logs" and log.name.endswith("-runs.log")
    assert "Traceback" in log.read_text() and "def broken" not in lines[0] and "broken" in log.read_text()


def test_a_name_that_is_neither_a_path_nor_on_the_hub(home, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError) as err:
        load_model("no-such-model-anywhere", device="cpu")
    text = str(err.value)
    assert "'no-such-model-anywhere' is neither a local path" in text and "nor a model reachable" in text
    assert str(tmp_path / "no-such-model-anywhere") in text and "\n" not in text


# --- NaN perplexity -------------------------------------------------------------------------

def _word_tokenizer() -> transformers.PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[UNK]", "the", "of", "and", "in", "a", "to", "was", "is", "as", ",", "."]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def test_nan_perplexity_is_a_failed_run(home, tmp_path, capsys):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    folder = save_model(wrap_model(model, _word_tokenizer()), tmp_path / "nan-model", {})
    rc, out, lines = run_cli(capsys, "eval", "--model", str(folder), "--seqlen", "32", "--max-windows", "2",
                             "--device", "cpu", "--quiet")
    assert rc == 2 and out == "" and len(lines) == 1, lines
    assert "perplexity" in lines[0] and "nan" in lines[0] and "not finite" in lines[0]
    run = registry(home).query().iloc[-1]
    assert run["status"] == "failed" and "not finite" in run["error"]


# --- the dashboard's Allocation page ------------------------------------------------------

def test_allocation_page_says_when_alpha_is_missing_and_resets_for_the_next_model(home):
    from core.analysis import analyze
    from test_app_common import new_app

    good = analyze(wrap_model(tiny_model("llama", seed=5), label="tiny-good"), device="cpu")
    bad = copy.copy(good)
    bad.table = good.table.assign(alpha=np.nan, alpha_hat=np.nan)
    bad.identity = "tiny-without-alpha"
    at = new_app("allocation", analysis=bad)
    assert not at.exception, at.exception
    used = at.selectbox(key="a_metric").value
    assert used != "alpha" and pd.notna(good.table[used]).any()
    assert any("alpha is missing or NaN" in w.value and used in w.value for w in at.warning)
    at.run()                                         # the warning stays while the table is shown
    assert any("alpha is missing or NaN" in w.value for w in at.warning)
    at.session_state["analysis"] = good
    at.run()
    assert at.selectbox(key="a_metric").value == "alpha"
    assert not any("missing or NaN" in w.value for w in at.warning)
