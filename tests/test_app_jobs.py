"""Dashboard jobs read the CLI's machine-readable channel: JSON progress and error events on
stderr (other lines ignored), the ``--json`` result on stdout; a job that died without an error
event shows its last stderr lines."""
import json

from test_app_common import ROOT  # noqa: F401  (puts the repository on sys.path)

from dashboard.jobs import Job


def job(tmp_path, stderr: str, stdout: str = "", rc: int | None = None) -> Job:
    (tmp_path / "stderr").write_text(stderr)
    (tmp_path / "stdout").write_text(stdout)
    if rc is not None:
        (tmp_path / "rc").write_text(str(rc))
    return Job("test", tmp_path, {"title": "t", "pid": 0})


def event(**fields) -> str:
    return json.dumps(fields) + "\n"


def test_progress_is_the_last_progress_event_and_ignores_other_lines(tmp_path):
    j = job(tmp_path, "UserWarning: something about torch\n"
            + event(event="progress", done=1, total=30, message="spectra")
            + "{not json at all\n"
            + event(event="progress", done=12, total=48, message="pruning block 3")
            + "  warnings.warn(\n")
    frac, text = j.progress()
    assert frac == 0.25
    assert text == "pruning block 3 (12/48)"


def test_no_progress_event_yet_means_starting(tmp_path):
    assert job(tmp_path, "some warning\n").progress() == (0.0, "starting (loading the model)")


def test_error_event_gives_the_one_line_message(tmp_path):
    j = job(tmp_path, event(event="progress", done=0, total=2, message="loading")
            + "a warning line that mentions error handling\n"
            + event(event="error", message="could not load model /x: unknown model_type 'nonsense'", exit=2),
            rc=2)
    assert j.status() == "failed"
    assert j.error() == "could not load model /x: unknown model_type 'nonsense'"


def test_death_without_error_event_shows_the_last_stderr_lines(tmp_path):
    lines = [f"  File \"x.py\", line {i}" for i in range(8)] + ["MemoryError"]
    j = job(tmp_path, event(event="progress", done=1, total=2, message="x") + "\n".join(lines) + "\n", rc=-9)
    assert j.error().splitlines() == lines[-5:]
    (tmp_path / "log").mkdir()
    j = job(tmp_path / "log", event(event="log", level="WARNING", message="low memory") + "Killed\n", rc=-9)
    assert j.error().splitlines() == ["WARNING: low memory", "Killed"]
    (tmp_path / "empty").mkdir()
    assert job(tmp_path / "empty", "", rc=1).error() == "the job ended without a result"


def test_result_is_the_json_line_of_stdout(tmp_path):
    j = job(tmp_path, "", stdout="loading...\n" + json.dumps({"run_id": 7, "perplexity": 12.5}) + "\n", rc=0)
    assert j.status() == "done"
    assert j.result() == {"run_id": 7, "perplexity": 12.5}
