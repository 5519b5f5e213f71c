"""What pruning buys at deployment, measured, not assumed.

1. matmul: each LLaMA-7B matrix shape (q/k/v/o 4096x4096, gate/up 11008x4096, down
   4096x11008) with 2:4 weights, at 1, 16 and 2048 tokens: dense ``F.linear`` against PyTorch's
   semi-structured sparse kernel (``torch.sparse.to_sparse_semi_structured``), median of N
   runs, with the output's relative error;
2. generation: a random LLaMA of those shapes (4 blocks) pruned 2:4 by magnitude with
   ``core.pruning.prune``, greedy generation after a 128-token prompt at batch 1 and 16,
   tokens/s dense against the same model after ``core.deploy.to_semi_structured``, and the
   relative difference of one forward pass's logits;
3. on disk: one block's tensors as ``--save`` writes them (dense float16 with zeros) for the
   dense, 50%-unstructured and 2:4 models: the same bytes, and what zlib makes of them.

Where the kernels cannot run (no CUDA GPU of compute capability 8.0+, or float32), parts 1 and
2 time dense only and say why: that is the CPU smoke test (``--small --device cpu``).
``benchmarks/gpu_check.py`` runs it as its ``deploy_24`` stage.

    python benchmarks/bench_deploy.py                       # on a GPU machine
    python benchmarks/bench_deploy.py --small --device cpu  # the smoke test
    python benchmarks/bench_deploy.py --demo-disk           # part 3 on the demo model's own weights
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from core.deploy import is_2of4, to_semi_structured, unsupported  # noqa: E402
from core.models import LoadedModel  # noqa: E402
from core.pruning import prune  # noqa: E402
from common import random_llama  # noqa: E402  (benchmarks/common.py)

FULL = dict(hidden=4096, inter=11008, blocks=4, heads=32, vocab=32000, tokens=(1, 16, 2048), batches=(1, 16),
            prompt=128, new=64)
SMALL = dict(hidden=256, inter=688, blocks=2, heads=4, vocab=512, tokens=(1, 16, 128), batches=(1, 4),
             prompt=16, new=8)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_ms(fn, device: str, repeat: int) -> float:
    fn()                                       # warm-up (kernel selection, workspace)
    times = []
    for _ in range(repeat):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def two_of_four(w: torch.Tensor) -> torch.Tensor:
    """``w`` with the 2 smallest magnitudes of every 4 consecutive inputs zeroed."""
    rows, cols = w.shape
    g = w.reshape(rows, cols // 4, 4)
    keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, g.abs().topk(2, dim=-1).indices, True)
    return (g * keep).reshape(rows, cols)


def matmuls(s: dict, device: str, dtype: torch.dtype, repeat: int = 20) -> list[dict]:
    """Dense against semi-structured matmul per matrix shape and token count."""
    reason = unsupported(device, dtype)
    h, f = s["hidden"], s["inter"]
    out = []
    for kinds, (rows, cols) in {"q/k/v/o": (h, h), "gate/up": (f, h), "down": (h, f)}.items():
        gen = torch.Generator(device=device).manual_seed(rows + cols)
        w = two_of_four(torch.randn(rows, cols, generator=gen, device=device, dtype=dtype) / cols ** 0.5)
        sparse = None
        if reason is None:
            from torch.sparse import to_sparse_semi_structured
            sparse = to_sparse_semi_structured(w)
        for tokens in s["tokens"]:
            x = torch.randn(tokens, cols, generator=gen, device=device, dtype=dtype)
            row = {"kinds": kinds, "shape": f"{rows}x{cols}", "tokens": tokens,
                   "dense_ms": median_ms(lambda: F.linear(x, w), device, repeat)}
            if sparse is not None:
                row["sparse_ms"] = median_ms(lambda: F.linear(x, sparse), device, repeat)
                ref = F.linear(x.float(), w.float())
                row["rel_error"] = float((F.linear(x, sparse).float() - ref).norm() / ref.norm())
                row["speedup"] = row["dense_ms"] / row["sparse_ms"]
            out.append(row)
    return out


def _llama(s: dict, device: str, dtype: torch.dtype) -> LoadedModel:
    return random_llama(s, s["blocks"], device, dtype, s["prompt"] + s["new"] + 8)


@torch.no_grad()
def _tokens_per_s(model, ids: torch.Tensor, new: int, device: str) -> float:
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
              attention_mask=torch.ones_like(ids))
    model.generate(ids, **{**kw, "max_new_tokens": 2, "min_new_tokens": 2})      # warm-up
    _sync(device)
    start = time.perf_counter()
    model.generate(ids, **kw)
    _sync(device)
    return ids.shape[0] * new / (time.perf_counter() - start)


@torch.no_grad()
def generation(s: dict, device: str, dtype: torch.dtype) -> dict:
    """Greedy generation tokens/s of a 2:4 model, dense kernels against semi-structured ones."""
    loaded = _llama(s, device, dtype)
    prune(loaded, method="magnitude", nm="2:4", device=device)
    two4 = sum(is_2of4(loaded.module(m.name).weight.data) for m in loaded.matrices)
    gen = torch.Generator().manual_seed(0)
    prompts = {b: torch.randint(0, s["vocab"], (b, s["prompt"]), generator=gen).to(device) for b in s["batches"]}
    res = {"blocks": s["blocks"], "matrices": len(loaded.matrices), "two_of_four": two4, "prompt": s["prompt"],
           "new_tokens": s["new"], "dense_tok_s": {b: _tokens_per_s(loaded.model, ids, s["new"], device)
                                                  for b, ids in prompts.items()}}
    reason = unsupported(device, dtype)
    if reason:
        res["sparse"] = reason
        return res
    logits = loaded.model(prompts[s["batches"][0]]).logits.float()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    conv = to_semi_structured(loaded)
    torch.cuda.synchronize()
    dense_bytes = sum(m.rows * m.cols for m in loaded.matrices) * torch.finfo(dtype).bits // 8
    res["matrix_memory_fraction"] = (dense_bytes - (before - torch.cuda.memory_allocated())) / dense_bytes
    res["converted"], res["skipped"] = len(conv.converted), conv.skipped
    res["sparse_tok_s"] = {b: _tokens_per_s(loaded.model, ids, s["new"], device) for b, ids in prompts.items()}
    got = loaded.model(prompts[s["batches"][0]]).logits.float()
    res["logits_rel_diff"] = float((got - logits).norm() / logits.norm())
    res["speedup"] = {b: res["sparse_tok_s"][b] / res["dense_tok_s"][b] for b in prompts}
    return res


def on_disk(s: dict) -> list[dict]:
    """One block as ``--save`` writes it (float16, zeros kept), raw and zlib-compressed (level 1)."""
    out = []
    for label, ratio, nm in (("dense", 0.0, None), ("50% unstructured", 0.5, None), ("2:4", None, "2:4")):
        loaded = _llama({**s, "blocks": 1}, "cpu", torch.float32)
        if ratio or nm:
            prune(loaded, ratio if nm is None else None, method="magnitude", nm=nm, device="cpu")
        raw = b"".join(loaded.module(m.name).weight.data.half().numpy().tobytes() for m in loaded.matrices)
        out.append({"model": label, "bytes": len(raw), "zlib_bytes": len(zlib.compress(raw, 1))})
    return out


def demo_on_disk() -> list[dict]:
    """Part 3 on the demo model's 210 matrices as ``--save`` writes them (float32): dense,
    50% and 70% unstructured and 2:4 (magnitude), raw and zlib-compressed (level 1)."""
    from core.models import load_model

    out = []
    for label, ratio, nm in (("dense", None, None), ("50% unstructured", 0.5, None),
                             ("70% unstructured", 0.7, None), ("2:4", None, "2:4")):
        loaded = load_model("demo", device="cpu")
        if ratio or nm:
            prune(loaded, ratio, method="magnitude", nm=nm, device="cpu")
        raw = b"".join(loaded.module(m.name).weight.data.numpy().tobytes() for m in loaded.matrices)
        out.append({"model": label, "bytes": len(raw), "zlib_bytes": len(zlib.compress(raw, 1))})
    return out


def run(small: bool, device: str, dtype: torch.dtype | None = None) -> dict:
    s = SMALL if small else FULL
    dtype = dtype or (torch.float16 if device.startswith("cuda") else torch.float32)
    return {"device": device, "dtype": str(dtype)[6:], "kernels": unsupported(device, dtype) or "semi-structured",
            "matmul": matmuls(s, device, dtype), "generation": generation(s, device, dtype), "disk": on_disk(s)}


def rows(r: dict) -> list[tuple[str, str, str]]:
    """Rows of the GPU check's table: (check, result, goal)."""
    if "error" in r:
        return [("2:4 deployment", r["error"], "")]
    out = [("2:4 sparse kernels", r["kernels"], "")]
    for m in r["matmul"]:
        speed = (f"sparse {m['sparse_ms']:.3f} ms = {m['speedup']:.2f}x, rel. error {m['rel_error']:.1e}"
                 if "sparse_ms" in m else "sparse: not run")
        out.append((f"2:4 matmul {m['kinds']} {m['shape']}, {m['tokens']} tokens",
                    f"dense {m['dense_ms']:.3f} ms; {speed}", "> 1x"))
    g = r["generation"]
    for b, dense in g["dense_tok_s"].items():
        sparse = (f"2:4 kernels {g['sparse_tok_s'][b]:.1f} tok/s = {g['speedup'][b]:.2f}x"
                  if "sparse_tok_s" in g else "2:4 kernels: not run")
        out.append((f"generation, {g['blocks']}-block 2:4 LLaMA, batch {b}, {g['new_tokens']} new tokens",
                    f"dense {dense:.1f} tok/s; {sparse}", "> 1x"))
    if "logits_rel_diff" in g:
        out.append(("2:4 kernels vs dense, logits", f"rel. diff {g['logits_rel_diff']:.1e}; "
                    f"{g['converted']} of {g['matrices']} matrices converted", "< 1e-2"))
        out.append(("2:4 matrices' GPU memory after the swap", f"{g['matrix_memory_fraction']:.2f}x dense", ""))
    dense = r["disk"][0]["zlib_bytes"]
    out.append(("one block on disk as saved (float16): raw / zlib",
                "; ".join(f"{d['model']} {d['bytes'] / 2**20:.1f} / {d['zlib_bytes'] / 2**20:.1f} MiB"
                          f" ({d['zlib_bytes'] / dense:.2f}x dense)" for d in r["disk"]), ""))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--small", action="store_true", help="scaled-down shapes (a CPU smoke test)")
    p.add_argument("--json", metavar="FILE", help="also write every number here")
    p.add_argument("--demo-disk", action="store_true", help="only part 3, on the demo model's weights")
    a = p.parse_args(argv)
    if a.demo_disk:
        rows_ = demo_on_disk()
        print("| matrices as saved | raw | zlib | zlib vs dense |\n|---|---|---|---|")
        for d in rows_:
            print(f"| {d['model']} | {d['bytes'] / 2**20:.0f} MiB | {d['zlib_bytes'] / 2**20:.0f} MiB | "
                  f"{d['zlib_bytes'] / rows_[0]['zlib_bytes']:.2f}x |")
        return 0
    r = run(a.small, a.device)
    print("| check | result | goal |\n|---|---|---|")
    for row in rows(r):
        print("| " + " | ".join(row) + " |")
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
