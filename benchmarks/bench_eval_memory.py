"""Evaluation memory and speed: the full-logits loss against the chunked loss.

    .venv/bin/python benchmarks/bench_eval_memory.py [--windows 3] [--seqlen 2048] [--repeat 3]

1. Peak memory: a tiny random LLaMA-shaped model (2 blocks, hidden 256) with a 262,144-token
   vocabulary (Gemma-3-sized), ``--windows`` windows of ``--seqlen`` tokens. Each variant runs
   in a fresh child process; after the model is built its peak resident memory is reset
   (``5 > /proc/self/clear_refs``) so VmHWM after the perplexity minus VmRSS before it is what
   the evaluation added above the resident model (weights, imports).
2. Speed: tokens per second of ``perplexity`` on the demo model, full logits
   (``chunk_tokens=None``, the old path) and chunked (default), interleaved ``--repeat`` times,
   the best of each (this machine's speed drifts by tens of percent over minutes).
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys

import torch

CHILD = """
import gc, json, sys, torch
import transformers as tf
from core.evaluation import perplexity
from core.models import wrap_model
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
chunk, windows, seqlen = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
cfg = tf.LlamaConfig(vocab_size=262144, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=seqlen)
model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
weights = sum(p.numel() * p.element_size() for p in model.parameters())
loaded = wrap_model(model)
ids = torch.randint(0, 262144, (windows * seqlen,), generator=torch.Generator().manual_seed(0))
gc.collect()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")                          # VmHWM := VmRSS
base = status("VmRSS:")
res = perplexity(loaded, ids=ids, seqlen=seqlen, device="cpu", chunk_tokens=None if chunk == "full" else "auto")
print(json.dumps({"weights": weights, "base": base, "peak": status("VmHWM:"), "ppl": res.perplexity,
                  "tps": res.tokens_per_second}))
"""


def memory_variant(chunk: str, windows: int, seqlen: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, chunk, str(windows), str(seqlen)], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--demo-seqlen", type=int, default=256)
    ap.add_argument("--demo-windows", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    gib = 2**30
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"\n1. tiny LLaMA-shaped model, vocabulary 262,144, {args.windows} windows x {args.seqlen} tokens (CPU)")
    rows = {v: memory_variant(v, args.windows, args.seqlen) for v in ("full", "chunked")}
    print(f"   model weights {rows['full']['weights'] / gib:.2f} GiB (float32); resident before the evaluation "
          f"{rows['full']['base'] / gib:.2f} GiB (weights, imports)")
    print(f"   {'loss':<14}{'peak GiB':>10}{'added GiB':>11}{'tokens/s':>10}{'perplexity':>14}")
    for v, r in rows.items():
        print(f"   {v:<14}{r['peak'] / gib:>10.2f}{(r['peak'] - r['base']) / gib:>11.2f}{r['tps']:>10.0f}"
              f"{r['ppl']:>14.2f}")
    full, chunked = (rows[v]["peak"] - rows[v]["base"] for v in ("full", "chunked"))
    print(f"   memory added by the evaluation: full / chunked = {full / max(chunked, 1):.1f}x; "
          f"chunked adds {chunked / gib:.2f} GiB (goal < 1 GiB); speed chunked / full = "
          f"{rows['chunked']['tps'] / rows['full']['tps']:.2f}x")

    from core.evaluation import perplexity
    from core.models import load_model

    loaded = load_model("demo", device="cpu")
    best = {"full": None, "chunked": None}
    for _ in range(max(1, args.repeat)):
        for v in best:
            r = perplexity(loaded, seqlen=args.demo_seqlen, max_windows=args.demo_windows, device="cpu",
                           chunk_tokens=None if v == "full" else "auto")
            if best[v] is None or r.tokens_per_second > best[v].tokens_per_second:
                best[v] = r
    print(f"\n2. demo model (SmolLM2-135M, vocabulary 49,152), {args.demo_windows} windows x {args.demo_seqlen} "
          f"tokens, best of {args.repeat}")
    print(f"   {'loss':<14}{'tokens/s':>10}{'perplexity':>14}")
    for v, r in best.items():
        print(f"   {v:<14}{r.tokens_per_second:>10.0f}{r.perplexity:>14.6f}")
    print(f"   speed chunked / full = {best['chunked'].tokens_per_second / best['full'].tokens_per_second:.2f}x; "
          f"perplexities differ by {abs(best['chunked'].perplexity / best['full'].perplexity - 1):.1e} (relative)")


if __name__ == "__main__":
    main()
