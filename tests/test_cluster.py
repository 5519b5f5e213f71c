"""Ray (core.executor.OnRay): a local instance with 2 worker processes gives exactly the
single-process analysis and sweep; a killed worker's run is retried; failures are recorded."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM

ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")

from conftest import tiny_config, tiny_model  # noqa: E402
from core.analysis import analyze  # noqa: E402
from core.analysis import Weights, spectra_on  # noqa: E402
from core.executor import OnRay  # noqa: E402
from core.spec import CalibrationSpec, EvaluationSpec, PruneSpec  # noqa: E402
from core.models import iter_weights, load_model, resolve_source, wrap_model  # noqa: E402
from core.registry import Registry  # noqa: E402
from core.spectra import compute_spectra  # noqa: E402
from core.sweeps import sweep  # noqa: E402
from core.tuning import tune  # noqa: E402

pytestmark = pytest.mark.slow
COMPARED = ["method", "allocation", "sparsity", "epsilon", "achieved", "perplexity"]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,   # the workers import this checkout's core
             runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, demo):
    """A tiny random llama with the demo tokenizer, saved as a folder the workers see."""
    cfg = tiny_config("llama")
    cfg.vocab_size = len(demo.tokenizer)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny")
    AutoModelForCausalLM.from_config(cfg).eval().save_pretrained(folder)
    demo.tokenizer.save_pretrained(folder)
    return folder


def test_analysis_on_ray_equals_one_process_and_fills_the_same_cache(local_ray, tiny_folder):
    one = analyze(tiny_folder, device="cpu", use_cache=False)
    on_ray = analyze(tiny_folder, device="cpu", ray=True)          # workers read the shared folder
    pd.testing.assert_frame_equal(on_ray.table, one.table)
    for name, eigs in one.eigs.items():
        np.testing.assert_array_equal(on_ray.eigs[name], eigs)
    again = analyze(tiny_folder, device="cpu")                     # the local run finds Ray's cache
    assert again.cached
    pd.testing.assert_frame_equal(again.table, one.table)


def test_spectra_through_the_object_store_when_workers_do_not_see_the_files(local_ray, tiny_folder):
    loaded = wrap_model(tiny_model("llama", seed=3))
    want = compute_spectra(iter_weights(loaded), device="cpu")
    src = resolve_source(str(tiny_folder))
    from_folder = compute_spectra(iter_weights(load_model(tiny_folder, tokenizer=False)), device="cpu")
    for weights, ref in ((Weights.of_model(loaded), want),
                         (Weights.of_checkpoint(src.path, label=src.label, identity=src.identity()), from_folder)):
        got = spectra_on(OnRay(True, "cpu"), weights, ship=True, groups=3)
        assert [s.info.name for s in got] == [s.info.name for s in ref]
        for a, b in zip(got, ref):
            np.testing.assert_array_equal(a.eigs, b.eigs)


def _base(model) -> PruneSpec:
    return PruneSpec(model=str(model), device="cpu", calibration=CalibrationSpec(nsamples=2, seqlen=64),
                     evaluation=EvaluationSpec(dataset="wiki", seqlen=64, max_windows=2))


GRID = dict(methods=["magnitude", "wanda"], allocations=["uniform", "alpha"], sparsities=[0.5], epsilons=[0.3])


@pytest.fixture(scope="module")
def reference(tiny_folder, tmp_path_factory):
    reg = Registry(tmp_path_factory.mktemp("ref") / "runs.sqlite")
    return sweep(_base(tiny_folder), registry=reg, **GRID)


def _check_registry(reg: Registry, table: pd.DataFrame) -> None:
    runs = reg.query()
    assert len(runs) == len(table) and set(runs["status"]) == {"done"}
    for row in table.itertuples():
        run = reg.get(int(row.run_id))
        assert run["perplexity"] == row.perplexity
        if row.method != "dense":
            assert len(reg.matrices(int(row.run_id))) == 14          # 2 blocks x 7 matrices


def test_sweep_on_ray_equals_one_process(local_ray, tiny_folder, reference, tmp_path):
    reg = Registry(tmp_path / "runs.sqlite")
    table = sweep(_base(tiny_folder), executor=OnRay(), registry=reg, **GRID)
    pd.testing.assert_frame_equal(table[COMPARED], reference[COMPARED])
    _check_registry(reg, table)


def test_a_killed_worker_is_retried_and_the_registry_is_complete(local_ray, tiny_folder, reference, tmp_path):
    reg = Registry(tmp_path / "runs.sqlite")
    out: dict = {}
    thread = threading.Thread(target=lambda: out.update(table=sweep(_base(tiny_folder), executor=OnRay(),
                                                                    registry=reg, **GRID)))
    thread.start()
    killed = None
    deadline = time.time() + 120
    while killed is None and thread.is_alive() and time.time() < deadline:
        for proc in psutil.process_iter(["pid", "cmdline"]):
            if any("_Slot.run" in part for part in (proc.info["cmdline"] or [])):
                proc.kill()                                       # the worker dies mid-run
                killed = proc.info["pid"]
                break
        time.sleep(0.05)
    thread.join(timeout=600)
    assert killed is not None, "no sweep task was seen running"
    table = out["table"]
    pd.testing.assert_frame_equal(table[COMPARED], reference[COMPARED])
    _check_registry(reg, table)


def test_a_task_failing_twice_is_recorded_as_failed_with_its_error(local_ray, tiny_folder, tmp_path):
    reg = Registry(tmp_path / "runs.sqlite")
    loaded = load_model(tiny_folder)
    missing = PruneSpec(model=str(tmp_path / "not-here"), device="cpu",
                        evaluation=EvaluationSpec(dataset="wiki", seqlen=64, max_windows=2))
    with pytest.raises(ValueError, match="every run of the sweep failed") as failed:
        sweep(missing, executor=OnRay(), registry=reg, loaded=loaded, ship_model=False, dense=False,
              methods=["magnitude"], allocations=["uniform"], sparsities=[0.5, 0.6])
    assert "spectrascope runs --status failed" in str(failed.value)
    runs = reg.query()
    assert runs["status"].tolist() == ["failed", "failed"]
    assert all("model path not found" in e and "after 2 attempts" in e for e in runs["error"])
    assert sorted(runs["sparsity"]) == [0.5, 0.6]


def test_tune_on_ray_equals_one_process(local_ray, tiny_folder):
    base = PruneSpec(model=str(tiny_folder), method="wanda", sparsity=0.6, allocation="alpha", device="cpu",
                     calibration=CalibrationSpec(nsamples=2, seqlen=64))
    grid = dict(epsilons=[0.0, 0.4], xmins=["peak", "mid"], metric_columns=["alpha", "alpha_hat"], holdout_windows=2)
    one = tune(base, **grid)
    got = tune(base, executor=OnRay(), **grid)
    pd.testing.assert_frame_equal(got.table, one.table)
    assert got.best == one.best and got.calibration == one.calibration
    assert got.holdout_tokens == one.holdout_tokens
