"""Home / model page: choose a model, load and analyse it, clear errors for bad input."""
from test_app_common import new_app, texts


def test_home_starts_with_a_hint():
    at = new_app()
    assert not at.exception
    assert at.text_input(key="source").value == "demo"
    assert "Load and analyse" in texts(at)


def test_missing_path_gives_a_clear_message():
    at = new_app()
    at.text_input(key="source").set_value("/no/such/model.gguf")
    at.button[0].click().run()
    assert not at.exception
    assert "model path not found" in at.error[0].value


def test_folder_without_config_gives_a_clear_message(tmp_path):
    at = new_app()
    at.text_input(key="source").set_value(str(tmp_path))
    at.button[0].click().run()
    assert not at.exception
    assert "no config.json" in at.error[0].value


def test_load_and_analyse_demo_shows_summary(demo, demo_analysis_full):
    # full xmin: the session fixture already analysed the demo, so this reuses the disk cache
    at = new_app(timeout=180)
    at.selectbox(key="device").set_value("cpu")
    at.selectbox(key="xmin").set_value("full")
    at.button[0].click().run()
    assert not at.exception, at.exception
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Blocks"] == "30" and metrics["Matrices"] == "210"
    assert metrics["Family"] == "llama"
    assert metrics["Analysis"] == "from cache"
    assert at.session_state["analysis"].xmin == "full"


def test_a_fresh_analysis_reports_its_time_and_a_failed_load_keeps_the_old_model_labelled(demo):
    import shutil

    from core.analysis import cache_folder

    shutil.rmtree(cache_folder(demo.identity, "mid"), ignore_errors=True)   # nothing cached: computed now
    at = new_app(timeout=300)
    at.selectbox(key="device").set_value("cpu")
    at.selectbox(key="xmin").set_value("mid")
    at.button[0].click().run()
    assert not at.exception, at.exception
    took = {m.label: m.value for m in at.metric}["Analysis"]
    assert took != "from cache" and took.endswith(" s")
    assert not at.warning

    at.text_input(key="source").set_value("/no/such/model.gguf")
    at.button[0].click().run()
    assert "model path not found" in at.error[0].value
    assert "Still loaded" in at.warning[0].value and "SmolLM2" in at.warning[0].value
    assert at.session_state["analysis"].xmin == "mid"
