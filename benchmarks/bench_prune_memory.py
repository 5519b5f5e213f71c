"""Peak memory of pruning a model larger than memory (streamed from its shards) against the
checkpoint's size, and the check that the streamed output equals pruning the loaded model.

    .venv/bin/python benchmarks/bench_prune_memory.py [--layers 16] [--dir /tmp/spectrascope-bench-prune]

Writes a random LLaMA-shaped float32 checkpoint (hidden 2048, intermediate 5632, ``--layers``
blocks, 32000-token vocabulary, 4 shards; ``bench_memory.write_checkpoint``), then in a fresh
child process each: the streaming analysis, and Wanda and SparseGPT at 50% with ``--streaming``
(8 x 256 random token ids: the weights are random too), each reporting its peak resident
memory (VmHWM). On a 2-block instance of the same shapes, every tensor of the streamed output
is compared with pruning the fully loaded model. Everything written is deleted at the end;
the table goes to ``benchmarks/results/bench_prune_memory.txt``.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from bench_memory import CHILD as CHILD_ANALYSIS
from bench_memory import HIDDEN, HWM, INTER, write_checkpoint

VOCAB, NSAMPLES, SEQLEN = 32000, 8, 256
RESULTS = Path(__file__).parent / "results" / "bench_prune_memory.txt"

CHILD_PRUNE = HWM + f"""
import sys, time, torch
from core.models import load_skeleton
from core.pruning import prune_to_folder
base = hwm()
t = time.perf_counter()
ids = torch.randint(0, {VOCAB}, ({NSAMPLES}, {SEQLEN}), generator=torch.Generator().manual_seed(0))
res = prune_to_folder(load_skeleton(sys.argv[1], tokenizer=False), sys.argv[2], 0.5, method=sys.argv[3],
                      calibration=ids, device="cpu")
print(base, hwm(), time.perf_counter() - t, res.sparsity)
"""


def child(code: str, *args: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent.parent)
    if out.returncode:
        raise RuntimeError(f"child failed:\n{out.stderr[-3000:]}")
    return out.stdout.split()


def same_as_loaded(folder: Path, work: Path, method: str) -> tuple[bool, int]:
    """Prune ``folder`` loaded and streamed; True if every output tensor is identical."""
    from core.models import load_model, load_skeleton, save_model
    from core.pruning import prune, prune_to_folder

    ids = torch.randint(0, VOCAB, (NSAMPLES, SEQLEN), generator=torch.Generator().manual_seed(0))
    full = prune(load_model(folder, tokenizer=False), 0.5, method=method, calibration=ids, device="cpu")
    save_model(full.model, work / "full", {})
    del full
    prune_to_folder(load_skeleton(folder, tokenizer=False), work / "streamed", 0.5, method=method, calibration=ids,
                    device="cpu")
    tensors = [{k: v for p in sorted((work / w).glob("*.safetensors")) for k, v in load_file(p).items()}
               for w in ("full", "streamed")]
    same = sorted(tensors[0]) == sorted(tensors[1]) and all(torch.equal(v, tensors[1][k])
                                                             for k, v in tensors[0].items())
    shutil.rmtree(work / "full")
    shutil.rmtree(work / "streamed")
    return same, len(tensors[0])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/spectrascope-bench-prune")
    ap.add_argument("--layers", type=int, default=16)
    args = ap.parse_args()
    root = Path(args.dir)
    lines: list[str] = []

    def say(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    free = shutil.disk_usage(root.parent).free
    need = 2.3 * args.layers * (4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTER) * 4
    if free < need:
        sys.exit(f"{root.parent}: {free / 1e9:.1f} GB free, this benchmark needs about {need / 1e9:.1f} GB")
    start = time.perf_counter()
    try:
        src = root / "src"
        t = time.perf_counter()
        size = write_checkpoint(src, layers=args.layers, vocab=VOCAB, heavy_tails=False)
        gib = size / 2**30
        say(f"checkpoint: {size / 1e9:.2f} GB ({gib:.2f} GiB) float32 Gaussian, {args.layers} blocks of hidden {HIDDEN} / "
            f"intermediate {INTER}, vocabulary {VOCAB}, 4 shards (written in {time.perf_counter() - t:.0f} s)")
        say(f"calibration {NSAMPLES} x {SEQLEN} random token ids, cpu float32, {torch.get_num_threads()} threads")
        say("")
        say(f"{'run':<24}{'peak GiB':>10}{'after imports':>15}{'x checkpoint':>14}{'seconds':>10}")
        peaks = []

        def row(name: str, base: str, peak: str, secs: str) -> None:
            peaks.append(int(peak) / 2**20 / gib)
            say(f"{name:<24}{int(peak) / 2**20:>10.2f}{int(base) / 2**20:>15.2f}{peaks[-1]:>14.2f}{float(secs):>10.0f}")

        row("analysis (streaming)", *child(CHILD_ANALYSIS, str(src))[:3])
        for method in ("wanda", "sparsegpt"):
            out = root / f"out-{method}"
            base, peak, secs, sparsity = child(CHILD_PRUNE, str(src), str(out), method)
            row(f"{method} 50% (streaming)", base, peak, secs)
            written = sum(p.stat().st_size for p in out.glob("*.safetensors"))
            say(f"  [{method}: achieved sparsity {float(sparsity):.4f}, output {written / 1e9:.2f} GB]")
            shutil.rmtree(out)
        worst = max(peaks[1:])
        say(f"goal: pruning peak under 1/3 of the checkpoint size: {'met' if worst < 1 / 3 else 'NOT met'} "
            f"(worst {worst:.2f}x)")
        shutil.rmtree(src)
        say("")
        small = root / "small"
        write_checkpoint(small, layers=2, shards=2, vocab=VOCAB)
        with tempfile.TemporaryDirectory(dir=root) as work:
            for method in ("wanda", "sparsegpt"):
                same, count = same_as_loaded(small, Path(work), method)
                say(f"2-block instance, {method}: streamed output {'identical to' if same else 'DIFFERS from'} "
                    f"pruning the loaded model ({count} tensors compared bit for bit)")
        say(f"total {time.perf_counter() - start:.0f} s")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    RESULTS.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
