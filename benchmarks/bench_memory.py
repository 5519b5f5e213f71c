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
HWM = """
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
"""
CHILD = HWM + """
import sys, time
from core.analysis import analyze
base = hwm()
t = time.perf_counter()
res = analyze(sys.argv[1], streaming=True, use_cache=False, device="cpu")
print(base, hwm(), time.perf_counter() - t, len(res.table), res.table["alpha"].median())
"""


def write_checkpoint(folder: Path, layers: int = LAYERS, shards: int = SHARDS, vocab: int = 0,
                     heavy_tails: bool = True) -> int:
    """A random LLaMA-shaped float32 checkpoint in ``shards`` files (kept if already there);
    its size in bytes. ``vocab > 0``: a complete, loadable model (embeddings, every norm, head,
    a full config) as pruning needs; else only the blocks' matrices, as analysis reads.
    ``heavy_tails=False``: Gaussian entries (several times faster to draw)."""
    if (folder / "config.json").is_file():
        return sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    shapes = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, HIDDEN),
              "self_attn.v_proj": (HIDDEN, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
              "mlp.gate_proj": (INTER, HIDDEN), "mlp.up_proj": (INTER, HIDDEN), "mlp.down_proj": (HIDDEN, INTER)}
    norms = ["input_layernorm", "post_attention_layernorm"] if vocab else ["input_layernorm"]
    per = layers // shards + (layers % shards > 0)
    weight_map = {}
    for s in range(shards):
        tensors = {}
        if vocab and s == 0:
            tensors["model.embed_tokens.weight"] = torch.randn(vocab, HIDDEN) * 0.02
        for b in range(s * per, min(layers, (s + 1) * per)):
            for rel, shape in shapes.items():
                # heavy-ish tails: Student-t entries
                t = (torch.distributions.StudentT(4.0).sample(shape) if heavy_tails else torch.randn(shape)) * 0.02
                tensors[f"model.layers.{b}.{rel}.weight"] = t.contiguous()
            for norm in norms:
                tensors[f"model.layers.{b}.{norm}.weight"] = torch.ones(HIDDEN)
        if vocab and s == shards - 1:
            tensors["model.norm.weight"] = torch.ones(HIDDEN)
            tensors["lm_head.weight"] = torch.randn(vocab, HIDDEN) * 0.02
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors
    config = {"model_type": "llama", "hidden_size": HIDDEN, "intermediate_size": INTER, "num_hidden_layers": layers}
    if vocab:
        config.update(architectures=["LlamaForCausalLM"], vocab_size=vocab, num_attention_heads=HIDDEN // 128,
                      num_key_value_heads=HIDDEN // 128, max_position_embeddings=4096, rms_norm_eps=1e-5,
                      tie_word_embeddings=False, hidden_act="silu", torch_dtype="float32")
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config))
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
