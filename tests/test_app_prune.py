"""Prune & compare page: a real prune + eval job in a separate process, its progress, its result
in the comparison; clear messages for a bad model and a failing job."""
import json
import shutil
import time

from test_app_common import new_app, texts


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


def test_prune_and_eval_job_reaches_the_comparison(demo, demo_analysis_full):
    at = new_app("prune", analysis=demo_analysis_full, loaded=demo, a_method="alpha", a_sparsity=0.4,
                 p_method="magnitude", p_eval_windows=2, p_seqlen=128)
    assert not at.exception, at.exception
    assert "No finished run" in texts(at)
    at.button[0].click().run()                         # Prune and evaluate
    assert "magnitude alpha S=0.40" in texts(at)
    at = wait_for_jobs(at)
    assert not at.exception, at.exception
    table = at.dataframe[0].value
    row = table[table["method"] == "magnitude"].iloc[-1]
    assert row["allocation"] == "alpha" and abs(row["achieved_sparsity"] - 0.4) < 0.01
    assert row["perplexity"] > 1


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
