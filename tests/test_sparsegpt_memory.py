"""SparseGPT's memory: the Hessian is built in its statistics' memory and factorised in place,
so that no second n x n matrix is ever alive (issue 14: streamed pruning under a third of the
checkpoint). Bytes are counted by the PyTorch profiler's allocator events, not the resident
set, so the figures do not depend on the machine's load."""
from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from core.pruning import HessianCollector, prune_sparsegpt
from core.pruning.methods import SparseGPT
from core.pruning.sparsegpt import _reversed_cholesky

N, ROWS = 1024, 64
MATRIX = N * N * 4                                   # bytes of one n x n float32 matrix


def _peak_bytes(fn) -> int:
    """Peak of the bytes allocated minus freed while ``fn`` runs (each op's own allocations at
    its start, in time order: transients inside one op are netted, never over-counted)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    current = peak = 0
    for _, delta in sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events()):
        current += delta
        peak = max(peak, current)
    return peak


def _collector() -> HessianCollector:
    c = HessianCollector(N, torch.device("cpu"))
    c.add(torch.randn(3 * N, N, generator=torch.Generator().manual_seed(0)))
    return c


def test_hessian_is_built_in_the_running_sum():
    c = _collector()
    expected = c.H                                    # a copy, the sum is left as it is
    sum_ptr = c.sum.data_ptr()
    holder = {}
    peak = _peak_bytes(lambda: holder.update(H=c.take_hessian()))
    assert holder["H"].data_ptr() == sum_ptr and c.sum is None
    assert torch.equal(holder["H"], expected)
    assert peak < MATRIX / 2, f"take_hessian allocated {peak / MATRIX:.2f} n x n matrices"


def test_sparsegpt_keeps_no_second_hessian():
    # the factorisation needs a packed half of H (for damping retries) and the walk the
    # transposed weights and one block of rows of U: well under one n x n matrix. The
    # former code held H's reversed and damped copies and the factor (3 matrices) at once.
    W = torch.randn(ROWS, N, generator=torch.Generator().manual_seed(1))
    want = W.clone()
    prune_sparsegpt(want, _collector().H, 0.5, blocksize=64)
    H = _collector().take_hessian()
    peak = _peak_bytes(lambda: prune_sparsegpt(W, H, 0.5, blocksize=64, overwrite_H=True))
    assert peak < 0.75 * MATRIX, f"prune_sparsegpt allocated {peak / MATRIX:.2f} n x n matrices"
    assert torch.equal(W, want)                       # the in-place path prunes exactly as the copying one
    H = _collector().H
    kept = H.clone()
    peak = _peak_bytes(lambda: prune_sparsegpt(W.clone(), H, 0.5, blocksize=64))
    assert torch.equal(H, kept)                       # without overwrite_H the caller's H is left as it is
    assert peak < 1.75 * MATRIX, f"prune_sparsegpt (copying H) allocated {peak / MATRIX:.2f} n x n matrices"


def test_the_rule_frees_each_groups_statistics():
    c = _collector()
    Ws = [torch.randn(ROWS, N), torch.randn(ROWS // 2, N)]
    SparseGPT().rule(Ws, c, [0.5, 0.5], None)
    assert c.sum is None                              # freed before the next group's walk


def test_a_damping_retry_factorises_the_original_matrix():
    # indefinite by 0.3 on a unit diagonal: the first damping (1%) fails, the factor made in
    # place after restoring the packed triangle must be the plain Cholesky of the reversed,
    # more damped matrix (as the former copying code computed it)
    B = torch.randn(200, 100, generator=torch.Generator().manual_seed(2))
    A = B @ B.t() / 100
    A = torch.triu(A) + torch.triu(A, 1).t()
    A.diagonal().sub_(0.3)
    flipped = A.flip(0, 1)
    mean = float(flipped.diagonal().mean())
    for attempt in range(6):
        damped = flipped.clone()
        damped.diagonal().add_(0.01 * 10 ** attempt * mean)
        want, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            break
    assert attempt >= 1
    L, dead = _reversed_cholesky(A.clone(), 0.01)
    assert torch.equal(L, want) and not dead.any()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_in_place_factorisation_on_cuda():
    """The in-place path (cholesky_ex writing into its own input's transpose, the reversal in
    chunks, the compacted factor) on the GPU: equal to the copying path there, a damping retry
    included, and the masks as the CPU's up to float order."""
    dev = torch.device("cuda")
    X = torch.randn(3 * N, N, generator=torch.Generator().manual_seed(0))
    W = torch.randn(ROWS, N, generator=torch.Generator().manual_seed(1))
    c = HessianCollector(N, dev)
    c.add(X.to(dev))
    copied, in_place = W.to(dev), W.to(dev)
    prune_sparsegpt(copied, c.H, 0.5, blocksize=64)
    prune_sparsegpt(in_place, c.take_hessian(), 0.5, blocksize=64, overwrite_H=True)
    assert torch.equal(copied, in_place)
    on_cpu = W.clone()
    prune_sparsegpt(on_cpu, _collector().H, 0.5, blocksize=64)
    assert ((in_place.cpu() == 0) == (on_cpu == 0)).float().mean() > 0.99
    B = torch.randn(200, 100, generator=torch.Generator().manual_seed(2), device="cpu").to(dev)
    A = B @ B.t() / 100
    A = torch.triu(A) + torch.triu(A, 1).t()
    A.diagonal().sub_(0.3)                            # the first damping fails
    L, _ = _reversed_cholesky(A.clone(), 0.01)
    LLt, F = L @ L.t(), A.flip(0, 1)
    off = ~torch.eye(200, dtype=torch.bool, device=dev)
    assert torch.allclose(LLt[off], F[off], atol=1e-4)   # the reversed matrix, damped on its diagonal
    assert (torch.diagonal(LLt) > torch.diagonal(F) + 0.05).all()
