"""Issue 18, part 6: the dashboard never shows a traceback and never signals a process it does not own.

Damaged background-job folders are shown as damaged jobs (the other jobs still show); Cancel signals a
job's process group only while its pid and process start time are still the job's; a source the Compare
page cannot use is one error naming it, and the page stays usable."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import tiny_model
from test_app_common import new_app, texts

#: job folders sort by name, newest first: these sort above every real job (and are removed after each test)
PREFIX = "29991231-2359"


@pytest.fixture
def jobs_home():
    """The jobs folder; the folders a test forges in it are removed afterwards (the session's home is shared)."""
    from dashboard import jobs

    root = jobs.jobs_dir()
    yield root
    for folder in root.glob(f"{PREFIX}*"):
        shutil.rmtree(folder, ignore_errors=True)


def forge(root, name: str, info=None, *, raw: bytes | None = None, rc: str | None = None, stdout: str = "",
          stderr: str = ""):
    folder = root / f"{PREFIX}{name}"
    folder.mkdir()
    if raw is None and info is None:
        (folder / "job.json").mkdir()                 # unreadable: a folder where the file should be
    else:
        (folder / "job.json").write_bytes(raw if raw is not None else json.dumps(info).encode())
    (folder / "stdout").write_text(stdout)
    (folder / "stderr").write_text(stderr)
    if rc is not None:
        (folder / "rc").write_text(rc)
    return folder


def good_job(root):
    """A finished dense evaluation: its card must still show beside a damaged job."""
    forge(root, "00-good", {"title": "good baseline", "command": "eval", "pid": 0, "started": time.time()},
          rc="0", stdout=json.dumps({"run_id": 1, "perplexity": 12.5}) + "\n")


NOW = time.time()
DAMAGED = {
    "pid_text": dict(info={"title": "t", "command": "eval", "pid": "abc", "started": NOW}),
    "pid_negative": dict(info={"title": "t", "command": "eval", "pid": -1, "started": NOW}),
    "rc_text": dict(info={"title": "t", "command": "eval", "pid": 0, "started": NOW}, rc="oops"),
    "bad_json": dict(raw=b"{not json"),
    "not_utf8": dict(raw=b"\xff\xfe{\x00"),
    "json_list": dict(raw=b"[1, 2]"),
    "no_started": dict(info={"title": "t", "command": "eval", "pid": 0}),
    "started_text": dict(info={"title": "t", "command": "eval", "pid": 0, "started": "yesterday"}),
    "owner_not_a_tag": dict(info={"title": "t", "command": "eval", "pid": 0, "started": NOW, "owner": "x"}),
    "deeply_nested": dict(raw=b"[" * 100000 + b"]" * 100000),
    "job_json_folder": dict(raw=None),
    "cmd_not_list": dict(info={"title": "t", "cmd": 5, "pid": 0, "started": NOW}),
    "result_list": dict(info={"title": "t", "command": "eval", "pid": 0, "started": NOW}, rc="0", stdout="[1, 2]\n"),
    "result_wrong_types": dict(info={"title": "t", "command": "eval", "pid": 0, "started": NOW}, rc="0",
                               stdout=json.dumps({"run_id": 2, "perplexity": "high"}) + "\n"),
    "progress_text": dict(info={"title": "t", "command": "eval", "pid": os.getpid(), "started": NOW},
                          stderr=json.dumps({"event": "progress", "done": "x", "total": None}) + "\n"),
}


@pytest.mark.parametrize("case", list(DAMAGED))
def test_a_damaged_job_folder_is_a_damaged_job_not_a_traceback(jobs_home, case):
    good_job(jobs_home)
    folder = forge(jobs_home, "50-" + case, **DAMAGED[case])
    at = new_app("prune", source="demo")
    assert not at.exception, at.exception
    shown = texts(at)
    assert "good baseline" in shown and "perplexity 12.50" in shown, shown     # the other job still shows
    if case in ("result_list", "result_wrong_types", "progress_text"):
        return                      # a damaged output file: the card shows what it can
    assert f"{folder.name}** · damaged" in shown, shown
    assert not [b for b in at.button if b.label == "Cancel"]


def test_a_damaged_job_folder_does_not_break_sweep_and_tune(jobs_home):
    forge(jobs_home, "50-sweep", {"title": "t", "command": "sweep", "pid": "abc", "started": NOW})
    forge(jobs_home, "51-tune", {"title": "t", "command": "tune", "pid": 0, "started": NOW}, rc="two")
    at = new_app("sweep", source="demo")
    assert not at.exception, at.exception
    assert "50-sweep** · damaged" in texts(at) and "51-tune** · damaged" in texts(at)


def sleeper() -> subprocess.Popen:
    """An unrelated process group (a sleeping process in a session of its own) that SIGINT ends,
    even where this test run inherited SIGINT ignored (started in the background by a shell)."""
    return subprocess.Popen([sys.executable, "-c", "import signal, time; "
                             "signal.signal(signal.SIGINT, signal.SIG_DFL); time.sleep(60)"], start_new_session=True)


@pytest.mark.parametrize("recorded", ["wrong_start", "no_start", "other_host"])
def test_cancel_never_signals_a_process_group_the_job_does_not_own(jobs_home, recorded):
    """A stale job whose pid now belongs to another process group reads as interrupted and Cancel signals
    nothing; a job whose pid and start time match is still cancelled (its process group gets SIGINT)."""
    from core.housekeeping import owner_tag

    stranger, own = sleeper(), sleeper()
    try:
        host, _, start = owner_tag(stranger.pid).split("~")
        stale = {"title": "stale job", "command": "prune", "pid": stranger.pid, "started": NOW - 3600}
        if recorded == "wrong_start":
            stale["owner"] = f"{host}~{stranger.pid}~{int(start) - 100}"
        if recorded == "other_host":       # the same pid and start time, on another machine sharing the home
            stale["owner"] = f"elsewhere.example~{stranger.pid}~{start}"
        forge(jobs_home, "60-stale", stale)
        forge(jobs_home, "61-own", {"title": "own job", "command": "prune", "pid": own.pid, "started": NOW,
                                    "owner": owner_tag(own.pid)})
        at = new_app("prune", source="demo")
        assert not at.exception, at.exception
        for key in [b.key for b in at.button if b.label == "Cancel"]:
            at.button(key=key).click().run()
            assert not at.exception, at.exception
        time.sleep(0.5)
        assert stranger.poll() is None, "Cancel signalled a process group the job does not own"
        assert own.wait(timeout=5) == -signal.SIGINT
        at.run()
        status = "elsewhere" if recorded == "other_host" else "interrupted"
        assert f"stale job** · {status}" in texts(at), texts(at)
    finally:
        for p in (stranger, own):
            if p.poll() is None:
                p.kill()
            p.wait()


def test_a_started_job_records_its_process_start_time(jobs_home):
    from core.housekeeping import owner_tag
    from dashboard import jobs

    job = jobs.start(["runs"], "records its owner")
    try:
        assert job.info["owner"] == owner_tag(job.info["pid"])
        saved = json.loads((job.folder / "job.json").read_text())
        assert saved["owner"] == job.info["owner"] and not saved["owner"].endswith("~0")
    finally:
        jobs._processes()[job.id].wait(timeout=60)
        shutil.rmtree(job.folder)


# --- Compare: a source that cannot be compared ----------------------------------------------

@pytest.fixture(scope="module")
def reference_label():
    from core.analysis import analyze
    from core.compare_sources import cached_analyses
    from core.models import wrap_model

    model = tiny_model("llama", seed=11)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(1.5)
    a = analyze(wrap_model(model, label="tiny-ref"), device="cpu")
    return cached_analyses().set_index("identity").loc[a.identity, "label"]


def _parquet_without_block(path):
    import pandas as pd

    pd.DataFrame({"name": ["model.layers.0.self_attn.q_proj"], "alpha": [3.0]}).to_parquet(path)


BAD_SOURCES = {
    "malformed.csv": ("name,block,kind,alpha\nmodel.layers.0.self_attn.q_proj,x,q,abc\n", "malformed.csv"),
    "block_text.csv": ("name,block,kind,alpha,status\nmodel.layers.0.self_attn.q_proj,first,q,3.1,ok\n",
                       "block_text.csv"),
    "no_columns.csv": ("name,alpha\nmodel.layers.0.self_attn.q_proj,3.0\n", "no_columns.csv"),
    "no_name.csv": ("a,b\n1,2\n", "no_name.csv"),
    "ragged.csv": ('a,b\n1,2,3,4\n"unterminated\n', "ragged.csv"),
    "empty.csv": ("", "empty.csv"),
    "binary.csv": (b"\x00\x01\x02\xff" * 50, "binary.csv"),
    "fake.parquet": ("hello, not parquet\n", "fake.parquet"),
    "no_block.parquet": (_parquet_without_block, "no_block.parquet"),
}


@pytest.mark.parametrize("name", list(BAD_SOURCES))
def test_a_bad_table_on_compare_is_one_error_naming_it(tmp_path, reference_label, name):
    content, shown_name = BAD_SOURCES[name]
    path = tmp_path / name
    if callable(content):
        content(path)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    at = new_app("compare", cmp_sources=[reference_label])
    at.text_input(key="cmp_add").set_value(str(path)).run()
    [b for b in at.button if b.label == "Analyse and add"][0].click().run()
    assert not at.exception, at.exception
    assert len(at.error) == 1, [e.value for e in at.error]
    assert shown_name in at.error[0].value and "Traceback" not in at.error[0].value
    # the page is still usable: the bad table was not added, the reference is still chosen, a rerun is clean
    assert at.multiselect(key="cmp_sources").value == [reference_label]
    at.run()
    assert not at.exception, at.exception
    assert not at.error


def test_a_damaged_adapter_on_compare_is_one_error_naming_it(tmp_path, reference_label):
    """A LoRA adapter folder whose weights file is not safetensors (the reader's own error type)."""
    adapter = tmp_path / "my-adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16,
                                                             "base_model_name_or_path": "demo"}))
    (adapter / "adapter_model.safetensors").write_bytes(b"\xff" * 64)
    at = new_app("compare", cmp_sources=[reference_label])
    at.text_input(key="cmp_add").set_value(str(adapter)).run()
    [b for b in at.button if b.label == "Analyse and add"][0].click().run()
    assert not at.exception, at.exception
    assert len(at.error) == 1 and "my-adapter" in at.error[0].value, [e.value for e in at.error]
    assert at.multiselect(key="cmp_sources").value == [reference_label]


@pytest.fixture
def jobs_folder_unusable(jobs_home):
    """The jobs folder replaced by a file (as a full or read-only disk would refuse it); restored after."""
    aside = jobs_home.with_name("dashboard-jobs.aside")
    jobs_home.rename(aside)
    jobs_home.write_text("not a folder")
    yield jobs_home
    jobs_home.unlink()
    aside.rename(jobs_home)


@pytest.mark.parametrize("page, button", [("prune", "Evaluate the dense baseline"), ("sweep", "Start the sweep"),
                                          ("prune", "Prune and evaluate")])
def test_a_job_that_cannot_start_is_one_error(jobs_folder_unusable, page, button):
    at = new_app(page, source="demo", p_method="magnitude", a_method="uniform")
    assert not at.exception, at.exception
    [b for b in at.button if b.label == button][0].click().run()
    assert not at.exception, at.exception
    assert len(at.error) == 1 and "dashboard-jobs" in at.error[0].value, [e.value for e in at.error]
