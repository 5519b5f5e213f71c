"""Eigenvalues: accurate against float64 SVD, batched, streaming equals in-memory, bad matrices."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import tiny_model
from core.checkpoints import open_checkpoint
from core.models import MatrixInfo, wrap_model
from core.spectra import compute_spectra, eigenvalues


def _svd_eigs(w: torch.Tensor) -> np.ndarray:
    s = np.linalg.svd(w.double().numpy(), compute_uv=False)
    return np.sort(s**2)


@pytest.mark.parametrize("shape", [(40, 40), (30, 70), (90, 25)])
def test_eigenvalues_match_float64_svd(shape):
    torch.manual_seed(1)
    w = torch.randn(shape) * 0.05
    e = eigenvalues(w)
    ref = _svd_eigs(w)
    assert e.shape == (min(shape),)
    assert np.all(np.diff(e) >= 0)
    upper = ref >= np.median(ref)
    np.testing.assert_allclose(e[upper], ref[upper], rtol=1e-12)
    np.testing.assert_allclose(e, ref, rtol=0, atol=1e-12 * ref.max())


def test_batched_and_threaded_results_equal_one_by_one():
    torch.manual_seed(2)
    ws = [torch.randn(s) for s in [(20, 30)] * 3 + [(30, 30)] * 2 + [(50, 12)]]
    items = [(MatrixInfo(f"m{i}", 0, "x", *w.shape), w) for i, w in enumerate(ws)]
    many = compute_spectra(items, workers=2)
    assert [s.info.name for s in many] == [f"m{i}" for i in range(len(ws))]
    for s, w in zip(many, ws):
        np.testing.assert_allclose(s.eigs, eigenvalues(w), rtol=1e-13, atol=1e-13)
        assert s.w_var == pytest.approx(float(w.double().var(unbiased=False)), rel=1e-12)


def test_rank_deficient_zero_and_nonfinite_matrices():
    torch.manual_seed(3)
    low = torch.randn(30, 4) @ torch.randn(4, 20)          # rank 4
    e = eigenvalues(low)
    assert (e > 0).sum() == 4 and (e == 0).sum() == 16
    assert np.all(eigenvalues(torch.zeros(12, 15)) == 0)
    bad = torch.randn(10, 10)
    bad[3, 4] = float("nan")
    spec = compute_spectra([(MatrixInfo("bad", 0, "x", 10, 10), bad)])[0]
    assert spec.reason == "non-finite weights (NaN/Inf)" and np.isnan(spec.eigs).all()


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gpt_neox"])
def test_streaming_checkpoint_equals_loaded_model(tmp_path, family):
    model = tiny_model(family)
    model.save_pretrained(tmp_path, max_shard_size="40KB")   # several shards
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    ckpt = open_checkpoint(tmp_path)
    loaded = wrap_model(model)
    assert ckpt.matrices == loaded.matrices
    streamed = compute_spectra(ckpt.iter_weights(), workers=1, budget_bytes=1)   # one tensor at a time
    in_memory = compute_spectra([(i, loaded.weight(i.name)) for i in loaded.matrices])
    for a, b in zip(streamed, in_memory):
        np.testing.assert_array_equal(a.eigs, b.eigs)


def test_streaming_reads_half_precision_and_rejects_corrupt_files(tmp_path):
    w = torch.randn(24, 16)
    save_file({"model.layers.0.mlp.down_proj.weight": w.to(torch.bfloat16),
               "model.layers.0.input_layernorm.weight": torch.ones(16)}, str(tmp_path / "model.safetensors"))
    ckpt = open_checkpoint(tmp_path / "model.safetensors")
    assert [m.name for m in ckpt.matrices] == ["model.layers.0.mlp.down_proj"]
    torch.testing.assert_close(ckpt.read("model.layers.0.mlp.down_proj"), w.to(torch.bfloat16))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    with pytest.raises(ValueError, match="corrupt safetensors header"):
        open_checkpoint(tmp_path / "broken")
    with pytest.raises(FileNotFoundError):
        open_checkpoint(tmp_path / "nowhere")
