"""Several devices (core.devices, core.executor.Devices): plans on fake device lists, spectra
and sweeps on a device list, and the CUDA path (skipped without CUDA)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import tiny_config, tiny_model
from core.analysis import Weights, analyze, spectra_on
from core.cli import main
from core.executor import Devices
from core.spec import EvaluationSpec, PruneSpec
from core.registry import Registry
from core.sweeps import sweep
from core.devices import matrix_cost, parse_devices, plan_devices, plan_loads
from core.models import MatrixInfo, wrap_model
from core.spectra import compute_spectra

EIGHT = [f"cuda:{i}" for i in range(8)]
LLAMA_7B = [(4096, 4096)] * 4 * 32 + [(11008, 4096)] * 2 * 32 + [(4096, 11008)] * 32


def test_parse_devices_names_numbers_and_errors():
    assert parse_devices("0,1") == ["cuda:0", "cuda:1"]
    assert parse_devices("cuda:3, cuda:1") == ["cuda:3", "cuda:1"]
    assert parse_devices(["cpu"]) == ["cpu"]
    for bad, message in [("gpu0", "'gpu0' is not a device"), ("", "at least one device"), ("0,cuda:0", "twice")]:
        with pytest.raises(ValueError, match=message):
            parse_devices(bad)


def test_plan_is_longest_first_onto_the_least_loaded_device():
    # costs: 8x8 -> 8*64 + 512 = 1024; 4x4 -> 128. The big one goes first to cuda:0, the
    # four small ones then all fit on cuda:1 (512 < 1024).
    assert matrix_cost(8, 8) == 1024 and matrix_cost(4, 4) == 128
    assert matrix_cost(2, 8) == matrix_cost(8, 2) == 8 * 4 + 8
    assert plan_devices([(4, 4)] * 4 + [(8, 8)], ["cuda:0", "cuda:1"]) == ["cuda:1"] * 4 + ["cuda:0"]
    assert plan_devices([(4, 4)] * 3, ["cuda:0"]) == ["cuda:0"] * 3
    with pytest.raises(ValueError, match="at least one device"):
        plan_devices([(4, 4)], [])


def test_llama_7b_plan_is_balanced_on_eight_devices():
    plan = plan_devices(LLAMA_7B, EIGHT)
    loads = plan_loads(LLAMA_7B, EIGHT)
    assert set(plan) == set(EIGHT)
    assert max(loads.values()) / min(loads.values()) < 1.02
    assert sum(loads.values()) == pytest.approx(sum(matrix_cost(*s) for s in LLAMA_7B))
    # each device gets few distinct shapes: same-shaped batches
    assert all(len({s for s, d in zip(LLAMA_7B, plan) if d == dev}) <= 3 for dev in EIGHT)


def test_spectra_on_several_devices_keep_the_input_order():
    torch.manual_seed(0)
    shapes = [(8, 8), (16, 8), (8, 16), (8, 8), (32, 16)]
    infos = [MatrixInfo(f"m{i}", i, "x", r, c) for i, (r, c) in enumerate(shapes)]
    weights = {i.name: torch.randn(i.rows, i.cols) for i in infos}
    got = spectra_on(Devices(["cpu", "cpu"]), Weights(infos, "fake", "fake:order", read=weights.__getitem__))
    want = compute_spectra(((i, weights[i.name]) for i in infos), device="cpu", workers=1)
    assert [s.info.name for s in got] == [f"m{i}" for i in range(5)]
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a.eigs, b.eigs)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_analysis_on_all_gpus_equals_cpu():
    loaded = wrap_model(tiny_model("llama"))
    cpu = analyze(loaded, device="cpu", use_cache=False)
    gpus = analyze(loaded, devices=parse_devices("cuda"), use_cache=False)
    for name, eigs in cpu.eigs.items():
        np.testing.assert_allclose(gpus.eigs[name][-5:], eigs[-5:], rtol=1e-9)


def test_cli_analyze_on_a_device_list(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECTRASCOPE_HOME", str(tmp_path / "home"))
    src = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(src)
    assert main(["analyze", "--model", str(src), "--devices", "cpu", "--out", str(tmp_path / "a.csv"), "--quiet",
                 "--no-cache"]) == 0
    assert main(["analyze", "--model", str(src), "--device", "cpu", "--out", str(tmp_path / "b.csv"), "--quiet",
                 "--no-cache"]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "a.csv"), pd.read_csv(tmp_path / "b.csv"))
    assert main(["analyze", "--model", str(src), "--devices", "gpu7", "--quiet"]) == 2


@pytest.mark.slow
def test_sweep_with_one_run_per_device_equals_the_sequential_sweep(demo, tmp_path):
    cfg = tiny_config("llama")
    cfg.vocab_size = len(demo.tokenizer)
    torch.manual_seed(0)
    loaded = wrap_model(AutoModelForCausalLM.from_config(cfg).eval(), demo.tokenizer)
    calib = demo.tokenizer("The river flows north through the valley. " * 40, return_tensors="pt").input_ids[:, :64]
    base = PruneSpec(device="cpu", evaluation=EvaluationSpec(dataset="wiki", seqlen=64, max_windows=2))
    grid = dict(methods=["magnitude", "wanda"], allocations=["uniform"], sparsities=[0.5, 0.6], calibration=calib,
                loaded=loaded)
    want = sweep(base, registry=Registry(tmp_path / "a.sqlite"), **grid)
    reg = Registry(tmp_path / "b.sqlite")
    got = sweep(base, executor=Devices(["cpu", "cpu"]), registry=reg, **grid)
    cols = ["method", "allocation", "sparsity", "achieved", "perplexity"]
    pd.testing.assert_frame_equal(got[cols], want[cols])
    assert set(reg.query()["status"]) == {"done"} and len(reg.query()) == len(got)
