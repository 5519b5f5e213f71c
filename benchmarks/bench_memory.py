"""Peak memory of the bounded-memory (streaming) analysis of a >= 2 GB safetensors checkpoint.

    .venv/bin/python benchmarks/bench_memory.py [--dir /tmp/spectrascope-bench-ckpt] [--keep]

Writes a random LLaMA-shaped checkpoint (float32, 4 shards, ~2.1 GB) once, then analyses
it in a child process with ``--streaming`` and reports the child's peak resident memory
(VmHWM) against the checkpoint size and against a bare ``import core.analysis``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

HIDDEN, INTER, LAYERS, SHARDS = 2048, 5632, 11, 4

# VmHWM (this process's own peak resident set, in kB): unlike ru_maxrss it starts afresh at
# exec, so the parent that wrote the checkpoint does not leak into the figure.
CHILD = """
import sys, time
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
from core.analysis import analyze
base = hwm()
t = time.perf_counter()
res = analyze(sys.argv[1], streaming=True, use_cache=False, device="cpu")
print(base, hwm(), time.perf_counter() - t, len(res.table), res.table["alpha"].median())
"""


def write_checkpoint(folder: Path) -> int:
    if (folder / "config.json").is_file():
        return sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    shapes = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, HIDDEN),
              "self_attn.v_proj": (HIDDEN, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
              "mlp.gate_proj": (INTER, HIDDEN), "mlp.up_proj": (INTER, HIDDEN), "mlp.down_proj": (HIDDEN, INTER)}
    per = LAYERS // SHARDS + (LAYERS % SHARDS > 0)
    for s in range(SHARDS):
        tensors = {}
        for b in range(s * per, min(LAYERS, (s + 1) * per)):
            for rel, shape in shapes.items():
                # heavy-ish tails: Student-t entries
                t = torch.distributions.StudentT(4.0).sample(shape) * 0.02
                tensors[f"model.layers.{b}.{rel}.weight"] = t.contiguous()
            tensors[f"model.layers.{b}.input_layernorm.weight"] = torch.ones(HIDDEN)
        save_file(tensors, str(folder / f"model-{s + 1:05d}-of-{SHARDS:05d}.safetensors"))
        del tensors
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": HIDDEN,
                                                    "intermediate_size": INTER, "num_hidden_layers": LAYERS}))
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/spectrascope-bench-ckpt")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint for the next run")
    args = ap.parse_args()
    folder = Path(args.dir)
    t = time.perf_counter()
    size = write_checkpoint(folder)
    print(f"checkpoint: {size / 1e9:.2f} GB ({size / 2**30:.2f} GiB) in {SHARDS} shards, {LAYERS * 7} matrices "
          f"(written in {time.perf_counter() - t:.0f} s)")
    out = subprocess.run([sys.executable, "-c", CHILD, str(folder)], capture_output=True, text=True, check=True)
    base_kb, peak_kb, secs, n, med = out.stdout.split()
    base, peak = int(base_kb) / 2**20, int(peak_kb) / 2**20
    print(f"streaming analysis: {n} matrices in {float(secs):.0f} s, median alpha {float(med):.2f}")
    print(f"peak resident memory {peak:.2f} GiB (after imports {base:.2f} GiB, so the analysis added "
          f"{peak - base:.2f} GiB) = {peak / (size / 2**30):.2f}x the checkpoint size")
    largest = INTER * HIDDEN * 8 / 2**30
    print(f"largest matrix in float64: {largest:.3f} GiB; the streaming path holds at most 256 MiB of weights "
          "(counted as float64) at once")
    if not args.keep:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
