"""Issue 21, small items in core: an impossible allocation refused before any work, a hub id that
cannot be reached refused in seconds, a damaged .safetensors named by its file, and tuning's
progress saying which candidate of how many it is on."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

import core.experiments
import core.prepare
from conftest import byte_tokenizer, refused, saved_tiny, tiny_model
from core.registry import Registry

ROOT = Path(__file__).resolve().parent.parent
NO_SUCH_HUB_ID = "nobody-spectrascope/no-such-model-21"


def refused_after_load(capsys, argv: list[str], *names: str, within: float = 20.0) -> str:
    """``spectrascope --progress-json argv`` exits 2 within ``within`` seconds with one error event
    naming each of ``names`` and nothing else but progress and log events (the model loads first: the
    refusal needs its matrices)."""
    from core.cli import main as cli

    capsys.readouterr()
    start = time.perf_counter()
    rc = cli(["--progress-json", *argv])
    took = time.perf_counter() - start
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.strip()]
    errors = [e for e in lines if e["event"] == "error"]
    assert rc == 2 and len(errors) == 1, lines
    assert all(e["event"] in ("progress", "log") for e in lines if e is not errors[0]), lines
    for name in names:
        assert name in errors[0]["message"], (name, errors[0])
    assert took < within
    return errors[0]["message"]


@pytest.fixture
def work(monkeypatch):
    """Counts of the expensive stages a prune starts with (the real functions run)."""
    calls = []
    for module, name in ((core.experiments, "calibration_for"), (core.experiments, "auto_epsilon"),
                         (core.prepare, "alpha_metrics")):
        real = getattr(module, name)

        def counting(*args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, counting)
    return calls


@pytest.mark.parametrize("allocation", ["uniform", "alpha"])
def test_impossible_allocation_is_refused_before_any_work(capsys, work, allocation):
    folder = saved_tiny()
    before = len(Registry().query())
    argv = ["prune", "--model", str(folder), "--method", "wanda", "--allocation", allocation, "--sparsity", "0.95",
            "--dense-kinds", "gate,up,down", "--nsamples", "2", "--seqlen", "16"]
    argv += ["--epsilon", "0.3"] if allocation == "alpha" else []
    line = refused_after_load(capsys, argv, "0.95", "gate,up,down", "reachable")
    assert "lower sparsity" in line
    assert work == []                          # no calibration, tuning or analysis was started
    assert len(Registry().query()) == before   # nothing recorded


def test_impossible_sweep_is_refused_before_any_work(capsys, work, tmp_path):
    folder = saved_tiny()
    refused_after_load(capsys, ["sweep", "--model", str(folder), "--methods", "wanda", "--allocations", "uniform",
                     "--sparsities", "0.3,0.95", "--dense-kinds", "gate,up,down", "--nsamples", "2", "--seqlen", "16",
                     "--out", str(tmp_path / "s")], "0.95", "gate,up,down")
    assert work == []
    assert not (tmp_path / "s.csv").exists()


def test_offline_hub_id_is_refused_at_once_naming_the_setting(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    refused(capsys, ["analyze", "--model", NO_SUCH_HUB_ID], NO_SUCH_HUB_ID, "HF_HUB_OFFLINE", within=3)


def test_unreachable_hub_id_fails_in_seconds(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_HOME=str(tmp_path / "hf"), SPECTRASCOPE_HOME=str(tmp_path / "home"),
               HF_ENDPOINT="http://nowhere.invalid")      # .invalid never resolves (RFC 2606)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "core.cli", "--progress-json", "analyze", "--model", NO_SUCH_HUB_ID],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    took = time.perf_counter() - start
    errors = [json.loads(line) for line in done.stderr.splitlines() if line.startswith('{"event": "error"')]
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(errors) == 1 and NO_SUCH_HUB_ID in errors[0]["message"]
    assert "cannot be reached" in errors[0]["message"]
    assert took < 20, took            # python and torch start included; transformers' retries took 38 s


def _swap_shape(file: Path, key: str) -> None:
    """Reverse one tensor's shape in a safetensors header (same bytes: only the config disagrees)."""
    raw = file.read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + size])
    header[key]["shape"] = header[key]["shape"][::-1]
    text = json.dumps(header).encode()
    text += b" " * (size - len(text))
    file.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + size:])


def test_damaged_safetensors_is_named_by_its_file(capsys):
    folder = saved_tiny()
    _swap_shape(folder / "model.safetensors", "model.layers.0.mlp.up_proj.weight")
    line = refused(capsys, ["analyze", "--model", str(folder)], str(folder / "model.safetensors"),
                   "model.layers.0.mlp.up_proj.weight", within=20)
    assert "re-" in line


def test_tune_progress_says_which_candidate_of_how_many():
    from core.models import wrap_model
    from core.spec import CalibrationSpec, PruneSpec
    from core.tuning import tune

    loaded = wrap_model(tiny_model("llama", seed=3), byte_tokenizer())
    messages = []
    base = PruneSpec(method="magnitude", sparsity=0.5, epsilon=0.3, calibration=CalibrationSpec(nsamples=2, seqlen=32))
    result = tune(base, epsilons=[0.0, 0.2, 0.4], xmins=["peak"], metric_columns=["alpha"], holdout_windows=1,
                  loaded=loaded, progress=lambda d, t, m: messages.append(m))
    n = len(result.table["perplexity"].unique())
    assert n >= 2
    pruning = [m for m in messages if "block" in m]
    assert pruning and all("candidate" in m for m in pruning), pruning[:3]
    assert any(f"candidate {n} of {n}" in m for m in messages)
    assert any(f"candidate 1 of {n}" in m for m in messages)
