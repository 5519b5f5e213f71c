"""Prune & compare page: a real prune + eval job in a separate process, its progress, its result
in the comparison; clear messages for a bad model and a failing job."""
import json
import shutil
import time

import pytest
from test_app_common import arr, figures, new_app, texts


def wait_for_jobs(at, timeout=240):
    """Rerun the page until no job is running (the browser does this with a 1 s fragment)."""
    from dashboard import jobs

    deadline = time.time() + timeout
    while time.time() < deadline:
        if not any(j.status() in ("running", "cancelling") for j in jobs.list_jobs(5)):
            return at.run()
        time.sleep(1.0)
    raise AssertionError("job did not finish: " + "; ".join(j.error() for j in jobs.list_jobs(5)))


def test_bad_model_is_a_message():
    at = new_app("prune", source="/no/such/folder/model.gguf")
    assert not at.exception
    assert "model path not found" in at.error[0].value


def test_failing_job_shows_its_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "nonsense"}))
    at = new_app("prune", source=str(tmp_path), p_method="magnitude", p_eval_windows=1, p_seqlen=64)
    at.button[0].click().run()
    at = wait_for_jobs(at)
    assert not at.exception, at.exception
    assert any("could not load model" in e.value for e in at.error), [e.value for e in at.error]
    from dashboard import jobs

    for job in jobs.list_jobs(5):          # leave no failed job behind for the other tests' pages
        if job.status() == "failed":
            shutil.rmtree(job.folder)


def test_prune_uses_the_loaded_model_not_the_text_box(demo, demo_analysis_full):
    at = new_app("prune", analysis=demo_analysis_full, loaded=demo, source="/no/such/folder/model.gguf")
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    assert f"`{demo.source}`" in texts(at)


def test_prune_and_eval_job_saves_and_reaches_the_comparison(demo, demo_analysis_full, home):
    """Saving works on a home without a pruned/ folder; the card shows the folder and its report."""
    from pathlib import Path

    from core.models import REPORT_NAME

    pruned_root = Path(home) / "pruned"
    if pruned_root.exists():
        shutil.rmtree(pruned_root)
    from core.registry import Registry

    known = set(Registry().query()["id"])   # the session's home may hold other tests' runs
    at = new_app("prune", analysis=demo_analysis_full, loaded=demo, a_method="alpha", a_sparsity=0.4, a_auto=False,
                 p_method="magnitude", p_eval_windows=2, p_seqlen=128, p_save=True)
    assert not at.exception, at.exception
    if not known:
        assert "No finished run" in texts(at)
    at.button[0].click().run()                         # Prune and evaluate
    assert "magnitude alpha S=0.40" in texts(at)
    at = wait_for_jobs(at)
    assert not at.exception, at.exception
    assert not any("failed" in m.value for m in at.markdown), texts(at)
    table = at.dataframe[0].value
    new = table[~table["id"].isin(known)]
    assert len(new) == 1, new                          # this job's run, whatever else the registry holds
    row = new.iloc[0]
    assert row["method"] == "magnitude" and row["allocation"] == "alpha" and abs(row["achieved_sparsity"] - 0.4) < 0.01
    assert row["perplexity"] > 1
    saved = Path(row["output_dir"])
    assert saved.parent == pruned_root and (saved / REPORT_NAME).is_file() and (saved / "config.json").is_file()
    assert f"saved to `{saved}`" in texts(at)
    assert any(REPORT_NAME in e.label for e in at.expander)
    report = json.loads((saved / REPORT_NAME).read_text())
    assert report["method"] == "magnitude" and report["output_dir"] == str(saved)
    # the output was analysed (on by default here): one click opens Compare, dense vs pruned preselected
    params = Registry().get(int(row["id"]))["allocation_params"]
    assert params["analysis"]["identity"]                       # recorded by --analyze-output
    assert "How did pruning change each layer's spectrum?" in [h.value for h in at.subheader]
    button = next(b for b in at.button if b.label == f"Compare run {int(row['id'])} with the dense model")
    button.click().run()
    assert not at.exception, at.exception
    assert at.title[0].value == "Compare"
    assert len(at.session_state["cmp_sources"]) == 2                # the dense analysis and the pruned one


@pytest.mark.parametrize("auto", [True, False])
def test_alpha_prunes_with_epsilon_auto_unless_turned_off(demo, demo_analysis_full, fresh_home, auto):
    """The default (auto) is what the job runs with; the toggle off sends the slider's epsilon."""
    from dashboard import jobs

    at = new_app("prune", analysis=demo_analysis_full, loaded=demo, a_method="alpha", a_epsilon=0.25,
                 **({} if auto else {"a_auto": False}))
    assert ("ε = auto" in texts(at)) == auto and ("ε = 0.25" in texts(at)) != auto
    at.button[0].click().run()
    job = jobs.list_jobs(1)[0]
    cmd = job.info["cmd"]
    job.cancel()
    assert cmd[cmd.index("--epsilon") + 1] == ("auto" if auto else "0.25")


@pytest.fixture
def fresh_home(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECTRASCOPE_HOME", str(tmp_path))
    return tmp_path


def add_run(registry, identity, kind, ppl, windows, *, method="dense", allocation=None, sparsity=None,
            calib=None):
    run_id = registry.start(kind, model="demo", model_identity=identity, method=method, allocation=allocation,
                            sparsity=sparsity, calibration=calib)
    registry.finish(run_id, perplexity=ppl, eval_dataset="wiki", eval_seqlen=128, eval_windows=windows)
    return run_id


def test_results_compare_like_with_like(fresh_home, demo, demo_analysis_full):
    """vs dense and vs uniform only against runs of the same settings; one chart per setting with
    the dense baseline drawn at its perplexity; buttons for the missing baselines."""
    from core.registry import Registry

    reg, ident = Registry(), demo.identity
    c8 = {"dataset": "wiki", "nsamples": 8, "seqlen": 128, "seed": 0}
    c16 = {**c8, "nsamples": 16}
    add_run(reg, ident, "eval", 13.4, 8)
    add_run(reg, ident, "prune", 30.0, 8, method="wanda", allocation="uniform", sparsity=0.5, calib=c8)
    add_run(reg, ident, "prune", 27.0, 8, method="wanda", allocation="alpha", sparsity=0.5, calib=c8)
    add_run(reg, ident, "prune", 24.0, 8, method="wanda", allocation="uniform", sparsity=0.5, calib=c16)
    add_run(reg, ident, "eval", 20.0, 2)                                # latest dense, other windows
    add_run(reg, ident, "prune", 50.0, 2, method="magnitude", allocation="alpha", sparsity=0.6)
    add_run(reg, ident, "prune", 33.0, 4, method="wanda", allocation="alpha", sparsity=0.5, calib=c8)
    at = new_app("prune", analysis=demo_analysis_full, loaded=demo)
    assert not at.exception, at.exception
    table = at.dataframe[0].value
    alpha8 = table[(table["method"] == "wanda") & (table["allocation"] == "alpha") & (table["perplexity"] == 27.0)]
    assert alpha8["vs uniform %"].iloc[0] == pytest.approx(-10.0)
    assert alpha8["vs dense %"].iloc[0] == pytest.approx(100 * (27.0 / 13.4 - 1))
    mag = table[table["method"] == "magnitude"].iloc[0]
    assert mag["vs dense %"] == pytest.approx(150.0) and mag["vs uniform %"] != mag["vs uniform %"]   # NaN
    alpha4 = table[table["perplexity"] == 33.0].iloc[0]
    assert alpha4["vs dense %"] != alpha4["vs dense %"]                # no dense run with 4 windows
    assert len(set(table["settings"])) == 6                               # 2 evaluation + 4 pruned settings
    figs = figures(at)
    assert len(figs) == 4                                                 # one chart per pruned setting
    for fig in figs:
        lines = {t["name"]: arr(t["y"]).astype(float) for t in fig["data"]}
        dense = [y for name, y in lines.items() if name.startswith("dense")]
        pruned_y = {float(v) for name, y in lines.items() if not name.startswith("dense") for v in y}
        if pruned_y & {27.0, 30.0, 24.0}:
            assert len(dense) == 1 and set(dense[0]) == {13.4}
        elif 50.0 in pruned_y:
            assert len(dense) == 1 and set(dense[0]) == {20.0}
        else:
            assert pruned_y == {33.0} and not dense
        assert fig["layout"]["yaxis"]["type"] == "log"
    labels = [b.label for b in at.button]
    assert "Evaluate the dense baseline with these settings" in labels
    assert "Run the uniform baseline (magnitude uniform S=0.60) with these settings" in labels
    assert any("runs" in b.proto.label for b in at.get("download_button"))


def test_cancel_a_running_job():
    from dashboard import jobs

    at = new_app("prune", p_method="wanda", p_calib_n=4, p_seqlen=64, p_eval_windows=1)
    at.button[0].click().run()
    cancel = [b for b in at.button if b.label == "Cancel"]
    assert cancel, [b.label for b in at.button]
    cancel[0].click().run()
    at = wait_for_jobs(at, timeout=60)
    assert not at.exception, at.exception
    job = jobs.list_jobs(1)[0]
    assert job.status() == "cancelled"
    assert "cancelled" in texts(at)
    shutil.rmtree(job.folder)
