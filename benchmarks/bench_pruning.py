"""Pruning time as a multiple of one forward pass over the same calibration data, and
evaluation throughput, on the demo model (targets on 2 CPU cores: Wanda within 2x,
SparseGPT within 4x).

The forward pass is the whole model (embeddings, every block, head) over the calibration
windows in the batches the pruning engine uses (``core.config.window_batches``: about
``BATCH_TOKENS`` tokens per call), so both sides get the same batching. Pruning time is ``prune(...)``'s own
clock (capture, statistics, pruning, the second pass through each pruned block), without
the deep copy of the dense model. With ``--repeat N`` the forward pass and every method run
N times, interleaved, and the best of each is used (the least disturbed run: this machine's
speed drifts by tens of percent over minutes). Evaluation throughput is tokens per second of the
perplexity protocol over ``--windows`` windows of ``--seqlen`` tokens.

    .venv/bin/python benchmarks/bench_pruning.py [--nsamples 16] [--seqlen 256] [--repeat 2] [--device cpu] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from core.calibration import calibration_data
from core.config import BATCH_TOKENS, window_batches
from core.evaluation import perplexity
from core.models import load_model
from core.pruning import prune

TARGETS = {"magnitude": None, "wanda": 2.0, "sparsegpt": 4.0}


@torch.no_grad()
def forward_seconds(model: torch.nn.Module, ids: torch.Tensor, device: torch.device) -> float:
    start = time.perf_counter()
    for rows in window_batches(ids.shape[0], ids.shape[1]):
        model(input_ids=ids[rows].to(device), use_cache=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=2, help="runs of each, interleaved; the best counts")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--windows", type=int, default=4, help="evaluation windows")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--methods", default="magnitude,wanda,sparsegpt")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()

    loaded = load_model("demo", device=args.device, dtype=args.dtype)
    dev = next(loaded.model.parameters()).device
    calib = calibration_data(loaded.tokenizer, nsamples=args.nsamples, seqlen=args.seqlen, model=loaded.model)
    forward_seconds(loaded.model, calib.input_ids[:1], dev)          # warm-up
    methods = [m for m in args.methods.split(",") if m]
    runs: dict[str, list[float]] = {"forward": [], **{m: [] for m in methods}}
    print(f"demo model, {args.nsamples} x {args.seqlen} calibration tokens (batches of {BATCH_TOKENS} tokens), "
          f"{args.device} {args.dtype}, "
          f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs, {platform.processor() or '?'}")
    for r in range(args.repeat):
        runs["forward"].append(forward_seconds(loaded.model, calib.input_ids, dev))
        for method in methods:
            result = prune(loaded, args.sparsity, method=method, calibration=calib, device=args.device, copy=True)
            runs[method].append(result.seconds)
            del result
        print(f"run {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in runs.items()))
    best = {k: min(v) for k, v in runs.items()}
    fwd = best["forward"]
    print(f"one forward pass over the calibration data: {fwd:.2f} s (best of {args.repeat})")
    ok = True
    for method in methods:
        ratio = best[method] / fwd
        target = TARGETS.get(method)
        verdict = "" if target is None else (" (target <= %.0fx: %s)" % (target, "met" if ratio <= target else
                                                                          "MISSED"))
        ok &= target is None or ratio <= target
        print(f"{method:<10} {best[method]:8.2f} s = {ratio:5.2f} x forward{verdict}")
    ppl = perplexity(loaded, seqlen=args.seqlen, max_windows=args.windows, device=args.device)
    print(f"evaluation: {ppl.tokens_per_second:.0f} tokens/s ({ppl.windows} windows of {ppl.seqlen}, "
          f"perplexity {ppl.perplexity:.3f})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"settings": vars(args), "runs": runs, "best": best,
                       "ratios": {k: v / fwd for k, v in best.items() if k != "forward"},
                       "eval_tokens_per_second": ppl.tokens_per_second}, fh, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
