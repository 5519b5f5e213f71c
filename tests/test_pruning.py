"""The pruning engine: exact ratios, N:M patterns, SparseGPT's reconstruction, the block
pipeline's statistics against an independent full forward, OWL, cancellation, dtypes."""
from __future__ import annotations

import threading

import pytest
import torch

from conftest import FAMILIES, tiny_model
from core.calibration import sample_windows
from core.models import MatrixInfo, wrap_model
from core.progress import Cancelled
from core.pruning import (HessianCollector, NormCollector, owl_scores, parse_nm, prune, prune_magnitude,
                          prune_sparsegpt, prune_wanda)
from core.pruning.engine import BlockPipeline
from core.pruning.methods import check_nm, get_method


def _ids(n=4, seqlen=32, seed=0):
    return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def _mixed_ratios(loaded):
    # a different ratio for every matrix, including 0 and a high one
    return {m.name: [0.0, 0.3, 0.5, 0.7, 0.9, 0.45, 0.61][i % 7] for i, m in enumerate(loaded.matrices)}


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_achieved_sparsity_equals_requested_ratio(family, method):
    loaded = wrap_model(tiny_model(family))
    ratios = _mixed_ratios(loaded)
    result = prune(loaded, ratios, method=method, calibration=_ids(), device="cpu", copy=True)
    for row in result.matrices.itertuples():
        # one weight per row of rounding where the rule works per row (Wanda), else per matrix
        cols = next(m.cols for m in loaded.matrices if m.name == row.name)
        assert row.ratio == ratios[row.name]
        assert abs(row.achieved - row.ratio) <= 0.5 / cols + 1e-9, (row.name, row.achieved, row.ratio)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_prunes_and_the_original_stays_dense(family):
    model = tiny_model(family)
    loaded = wrap_model(model)
    ids = _ids(3, 16)
    with torch.no_grad():
        before = model(ids).logits.clone()
    result = prune(loaded, 0.5, method="wanda", calibration=ids, device="cpu", copy=True)
    assert abs(result.sparsity - 0.5) < 0.01
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)                     # copy=True: untouched
        assert not torch.allclose(result.model.model(ids).logits, before)  # the copy changed


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_nm_pattern_holds_in_every_group(method, pattern):
    n, m = parse_nm(pattern)
    loaded = wrap_model(tiny_model("llama"))
    result = prune(loaded, None, method=method, calibration=_ids(), nm=pattern, device="cpu", copy=True)
    for info in result.model.matrices:
        W = result.model.weight(info.name)
        nonzero = (W != 0).reshape(info.rows, info.cols // m, m).sum(-1)
        assert (nonzero <= n).all(), info.name
        assert nonzero.float().mean() > n - 0.01  # random weights: no accidental extra zeros
    assert result.matrices["achieved"].sub(1 - n / m).abs().max() < 1e-3


def test_rules_on_known_matrices():
    W = torch.tensor([[1.0, -4.0, 2.0, 3.0], [0.5, 0.1, -0.2, 9.0]])
    w = W.clone()
    prune_magnitude(w, 0.5)                       # 4 smallest |w| of 8: 0.1, 0.2, 0.5, 1
    assert torch.equal(w != 0, torch.tensor([[False, True, True, True], [False, False, False, True]]))
    w = W.clone()
    prune_wanda(w, torch.tensor([100.0, 1.0, 1.0, 1.0]), 0.5)  # column 0 has a large input norm
    assert torch.equal(w != 0, torch.tensor([[True, True, False, False], [True, False, False, True]]))
    w = W.clone()
    prune_magnitude(w, 0.0, nm=(2, 4))
    assert torch.equal(w != 0, torch.tensor([[False, True, False, True], [True, False, False, True]]))


def test_sparsegpt_reconstructs_better_than_magnitude():
    torch.manual_seed(0)
    rows, cols, tokens = 32, 256, 4096
    mix = torch.randn(cols, cols) / cols ** 0.5 + torch.eye(cols)
    X = torch.randn(tokens, cols) @ mix * torch.rand(cols).mul(3).add(0.2)  # correlated, uneven features
    W = torch.randn(rows, cols)
    H = HessianCollector(cols, torch.device("cpu"))
    for chunk in X.split(1000):
        H.add(chunk)
    assert torch.allclose(H.H, X.t() @ X / tokens, rtol=1e-4, atol=1e-3)
    for ratio, nm in [(0.5, None), (0.7, None), (0.0, (2, 4)), (0.0, (4, 8))]:
        wm, ws = W.clone(), W.clone()
        prune_magnitude(wm, ratio, nm=nm)
        prune_sparsegpt(ws, H.H, ratio, nm=nm, blocksize=32)   # several column blocks
        err_m = ((X @ (W - wm).t()) ** 2).sum()
        err_s = ((X @ (W - ws).t()) ** 2).sum()
        assert abs(int((wm == 0).sum()) - int((ws == 0).sum())) <= cols // 32  # rounding per column block
        assert err_s < 0.6 * err_m, (ratio, nm, float(err_s), float(err_m))


def test_hessian_from_upper_panels_equals_the_full_product():
    torch.manual_seed(2)
    cols = 1000                                   # three panels of ~333 rows
    X = torch.randn(700, cols) * torch.linspace(0.1, 3.0, cols)
    H = HessianCollector(cols, torch.device("cpu"))
    assert len(H.edges) == 4
    for chunk in X.split([1, 299, 400]):
        H.add(chunk)
    assert H.tokens == 700
    assert torch.equal(H.H, H.H.t())
    assert torch.allclose(H.H, X.t() @ X / 700, rtol=1e-4, atol=1e-4)


def _reference_sparsegpt(W, H, ratio, nm=None, blocksize=128, damp=0.01):
    """SparseGPT as the paper's published code writes it (explicit H^-1, one column at a time,
    ``w - q`` spread over the later columns), except that an unstructured block prunes exactly
    round(ratio * entries) (the published threshold ``<= sorted[int(r n)]`` takes one more)."""
    W, H = W.clone().double(), H.clone().double()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.diagonal(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    cols = W.shape[1]
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        if nm is None:
            tmp = (W1 ** 2 / torch.diagonal(Hinv1).reshape(1, -1) ** 2).flatten()
            mask1.view(-1)[torch.sort(tmp).indices[:int(round(ratio * tmp.numel()))]] = True
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]
            if nm is not None and i % nm[1] == 0:
                tmp = W1[:, i:i + nm[1]] ** 2 / torch.diagonal(Hinv1)[i:i + nm[1]].reshape(1, -1) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, nm[1] - nm[0], dim=1, largest=False).indices, True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W.float()


@pytest.mark.parametrize("nm", [None, (2, 4), (4, 8)])
def test_sparsegpt_equals_the_published_algorithm(nm):
    """Same pruned entries and same updated weights as the published column-by-column code,
    for a group of matrices sharing one input (each with its own ratio) and a partial last block."""
    torch.manual_seed(1)
    cols, tokens = 200, 2000
    X = torch.randn(tokens, cols) @ (torch.randn(cols, cols) / cols ** 0.5 + torch.eye(cols))
    X[:, 7] = 0                                                   # a dead input
    H = X.t() @ X / tokens
    Ws = [torch.randn(rows, cols) for rows in (24, 8, 40)]
    ratios = [0.5, 0.0, 0.8]
    got = [w.clone() for w in Ws]
    prune_sparsegpt(got, H, ratios, nm=nm, blocksize=64)       # one stacked pass
    for w, g, r in zip(Ws, got, ratios):
        want = _reference_sparsegpt(w, H, r, nm=nm, blocksize=64)
        assert torch.equal(g == 0, want == 0)
        assert torch.allclose(g, want, rtol=1e-3, atol=1e-4), float((g - want).abs().max())


def test_sparsegpt_beats_magnitude_on_a_model_layer():
    """Same layer, same ratio, its real calibration inputs (collected by the engine)."""
    loaded = wrap_model(tiny_model("llama"))
    name = loaded.matrices[7 + 5].name            # block 1's up_proj: inputs come through block 0
    pipeline = BlockPipeline(loaded, _ids(8, 32), collector=HessianCollector, device=torch.device("cpu"))
    H = pipeline.run(lambda b, stats: stats[name].H.clone() if b == 1 else None, forward_after=True)[1]
    W = loaded.weight(name).detach().clone()
    errs = {}
    for method in ("magnitude", "sparsegpt"):
        w = W.clone()
        prune_magnitude(w, 0.6) if method == "magnitude" else prune_sparsegpt(w, H, 0.6)
        D = W - w
        errs[method] = float(torch.einsum("ij,jk,ik->", D, H, D))  # mean ||(W - W') x||^2
    assert errs["sparsegpt"] < errs["magnitude"]


def _dense_norms(model, loaded, ids):
    """Wanda's column norms from hooks in plain dense forwards, one window at a time."""
    expected: dict[str, torch.Tensor] = {}
    hooks = []
    for info in loaded.matrices:
        def hook(mod, args, out, name=info.name):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            expected[name] = expected.get(name, 0) + (x * x).sum(0)
        hooks.append(loaded.module(info.name).register_forward_hook(hook))
    with torch.no_grad():
        for i in range(ids.shape[0]):
            model(ids[i:i + 1], use_cache=False)
    for h in hooks:
        h.remove()
    return expected


def _engine_norms(loaded, ids, forward_after=True):
    pipeline = BlockPipeline(loaded, ids, collector=NormCollector, device=torch.device("cpu"))
    per_block = pipeline.run(lambda b, s: {k: v.sq for k, v in s.items()}, forward_after=forward_after)
    return {name: sq for block in per_block for name, sq in block.items()}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("batch_tokens", [24, 48, 1024])   # 1, 2 (2, 2, 1) and all 5 windows per call
def test_engine_statistics_match_a_full_forward(family, batch_tokens, monkeypatch):
    """Wanda's column norms from the block pipeline (windows in batches, each block's pass
    cut short after its last matrix) equal those of hooks in a dense forward per window."""
    monkeypatch.setattr("core.pruning.engine.BATCH_TOKENS", batch_tokens)
    model = tiny_model(family)
    loaded = wrap_model(model)
    ids = _ids(5, 24)
    expected = _dense_norms(model, loaded, ids)
    for forward_after in (True, False):
        got = _engine_norms(loaded, ids, forward_after)
        assert set(got) == set(expected)
        for name in got:
            assert torch.allclose(got[name], expected[name], rtol=1e-4, atol=1e-4), (name, forward_after)


def test_engine_falls_back_to_one_window_per_call(caplog):
    """A block that cannot take a batch (as a family whose recorded arguments do not broadcast
    would) makes the engine go one window at a time, without counting the failed batch: the
    failure comes after q, k and v have already seen the batch."""
    model = tiny_model("llama")
    loaded = wrap_model(model)
    ids = _ids(4, 16)
    expected = _dense_norms(model, loaded, ids)

    def single_only(module, args):
        if args[0].shape[0] > 1:
            raise RuntimeError("The size of tensor a (4) must match the size of tensor b (1)")

    o_proj = next(m.name for m in loaded.matrices if m.block == 1 and m.kind == "o")
    handle = loaded.module(o_proj).register_forward_pre_hook(single_only)
    try:
        with caplog.at_level("WARNING", logger="core.pruning"):
            got = _engine_norms(loaded, ids)
    finally:
        handle.remove()
    assert "one at a time" in caplog.text
    for name in got:
        assert torch.allclose(got[name], expected[name], rtol=1e-4, atol=1e-4), name


def test_progress_and_cancel():
    loaded = wrap_model(tiny_model("llama"))
    calls = []
    prune(loaded, 0.3, method="wanda", calibration=_ids(2, 16), device="cpu", copy=True,
          progress=lambda d, t, m: calls.append((d, t)))
    assert calls[-1] == (2, 2)
    stop = threading.Event()
    stop.set()
    with pytest.raises(Cancelled):
        prune(loaded, 0.3, method="sparsegpt", calibration=_ids(2, 16), device="cpu", cancel=stop)
    n = {"blocks": 0}

    def cancel_after_one():
        return n["blocks"] >= 1

    with pytest.raises(Cancelled):
        prune(loaded, 0.3, method="magnitude", device="cpu", copy=True, cancel=cancel_after_one,
              progress=lambda d, t, m: n.update(blocks=d))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    model = tiny_model("llama").to(dtype)
    loaded = wrap_model(model)
    result = prune(loaded, 0.5, method="sparsegpt", calibration=_ids(2, 16), device="cpu", copy=True)
    assert result.dtype == str(dtype).replace("torch.", "")
    assert next(result.model.model.parameters()).dtype == dtype
    assert abs(result.sparsity - 0.5) < 0.01
    with torch.no_grad():
        assert torch.isfinite(result.model.model(_ids(1, 16)).logits).all()


def test_owl_scores_are_the_outlier_share_of_dense_wanda_scores():
    """Per block, the share of |W_ij| ||X_j|| above 5x the block's mean, with norms from hooks in
    a plain dense forward."""
    model = tiny_model("llama")
    loaded = wrap_model(model)
    ids = _ids(2, 16)
    scores = owl_scores(loaded, ids, device="cpu")
    norms = _dense_norms(model, loaded, ids)
    assert set(scores) == {0, 1}
    for b in (0, 1):
        s = torch.cat([(loaded.weight(m.name).detach().abs() * norms[m.name].sqrt()).reshape(-1)
                       for m in loaded.matrices if m.block == b])
        want = float((s > 5.0 * s.mean()).float().mean())
        assert 0 < scores[b] < 0.2
        assert scores[b] == pytest.approx(want, abs=3 / s.numel())   # a score or two at the threshold
    with pytest.raises(ValueError, match="m="):
        owl_scores(loaded, ids, m=0.0, device="cpu")


def test_bad_arguments_name_themselves():
    loaded = wrap_model(tiny_model("llama"))
    with pytest.raises(ValueError, match="method"):
        prune(loaded, 0.5, method="obs")
    with pytest.raises(ValueError, match="calibration"):
        prune(loaded, 0.5, method="wanda")
    with pytest.raises(ValueError, match="ratios"):
        prune(loaded, {"nope": 0.5}, method="magnitude")
    with pytest.raises(ValueError, match="ratio"):
        prune(loaded, 1.0, method="magnitude")
    with pytest.raises(ValueError, match="nm"):
        prune(loaded, None, method="magnitude", nm="4:2")
    with pytest.raises(ValueError, match=r"--nm 2:3: .* M can be 2, 4, 8, 16, 32 .*--nm 2:4") as err:
        prune(loaded, None, method="sparsegpt", nm="2:3", calibration=_ids())   # inputs of 64 and 96
    assert "blocksize" not in str(err.value)
    with pytest.raises(ValueError, match="nsamples"):
        sample_windows(torch.arange(100), nsamples=0, seqlen=10)
    with pytest.raises(ValueError, match="seqlen"):
        sample_windows(torch.arange(100), nsamples=2, seqlen=200)


def test_nm_groups_must_tile_the_inputs_and_sparsegpts_column_blocks():
    matrices = [MatrixInfo("a", 0, "q", 8, 96), MatrixInfo("b", 0, "down", 8, 192)]
    check_nm((2, 3), get_method("magnitude"), matrices)            # 3 divides 96 and 192
    with pytest.raises(ValueError, match=r"--nm 2:3: .*blocks of 128 columns, so M can be 2, 4, 8, 16, 32 "):
        check_nm((2, 3), get_method("sparsegpt"), matrices)
    choices = "2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 96"               # wanda has no column blocks: divisors of 96
    with pytest.raises(ValueError, match=rf"--nm 1:5: .*every matrix \(96, 192\), so M can be {choices} "):
        check_nm((1, 5), get_method("wanda"), matrices)
    with pytest.raises(ValueError, match="without --nm"):
        check_nm((1, 2), get_method("wanda"), [MatrixInfo("c", 0, "q", 8, 75), MatrixInfo("d", 0, "o", 8, 64)])


def test_calibration_windows_are_seeded():
    ids = torch.arange(10_000)
    a = sample_windows(ids, nsamples=5, seqlen=64, seed=0)
    b = sample_windows(ids, nsamples=5, seqlen=64, seed=0)
    c = sample_windows(ids, nsamples=5, seqlen=64, seed=1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (5, 64) and ((a[:, 1:] - a[:, :-1]) == 1).all()
