"""Peak memory of pruning and evaluating a model larger than memory (streamed from its shards)
against the checkpoint's size, and the check that the streamed output equals pruning the loaded model.

    .venv/bin/python benchmarks/bench_prune_memory.py [--layers 16] [--dir /tmp/spectrascope-bench-prune]
                                                      [--runs analysis,wanda,sparsegpt,eval,wanda+eval,demo]

Writes a random LLaMA-shaped float32 checkpoint (hidden 2048, intermediate 5632, ``--layers``
blocks, 32000-token vocabulary, 4 shards; ``bench_memory.write_checkpoint``), then in a fresh
child process each: the streaming analysis, and Wanda and SparseGPT at 50% with ``--streaming``
(8 x 256 random token ids: the weights are random too), the streamed perplexity (``eval``:
block by block from the shards, 8 windows of 256 random token ids) and Wanda with the
perplexity computed along (``wanda+eval``: each pruned block carries the evaluation windows as
it is written, as ``prune --streaming --eval`` does), each reporting its peak resident memory
(VmHWM); ``demo``: the streamed perplexity of the demo model on the embedded text (16 windows
of 2048 tokens) against the demo checkpoint's size. On a 2-block instance of the same shapes, every tensor of the streamed output
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

CHILD_EVAL = HWM + f"""
import sys, time, torch
from core.evaluation import StreamedPerplexity, perplexity
from core.models import load_skeleton
from core.pruning import prune_to_folder
from core.pruning.streaming import ShardBlocks
base = hwm()
t = time.perf_counter()
ids = torch.randint(0, {VOCAB}, ({NSAMPLES}, {SEQLEN}), generator=torch.Generator().manual_seed(0))
text = torch.randint(0, {VOCAB}, ({NSAMPLES * SEQLEN},), generator=torch.Generator().manual_seed(1))
skeleton = load_skeleton(sys.argv[1], tokenizer=False)
if sys.argv[2] == "-":
    ppl = perplexity(skeleton, ids=text, seqlen={SEQLEN}, device="cpu")
else:
    streamed = StreamedPerplexity(skeleton, ShardBlocks(skeleton), ids=text, seqlen={SEQLEN}, device="cpu")
    prune_to_folder(skeleton, sys.argv[2], 0.5, method="wanda", calibration=ids, device="cpu", along=streamed.block)
    ppl = streamed.result()
print(base, hwm(), time.perf_counter() - t, ppl.perplexity)
"""

CHILD_DEMO = HWM + """
import sys, time
from core.evaluation import perplexity
from core.models import load_skeleton
base = hwm()
t = time.perf_counter()
ppl = perplexity(load_skeleton(sys.argv[1]), seqlen=2048, max_windows=16, device="cpu")
print(base, hwm(), time.perf_counter() - t, ppl.perplexity)
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
    ap.add_argument("--runs", default="analysis,wanda,sparsegpt,eval,wanda+eval,demo",
                    help="which rows to measure (default all)")
    args = ap.parse_args()
    runs = args.runs.split(",")
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
        if set(runs) <= {"demo"}:
            return demo_row(say, start)
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

        if "analysis" in runs:
            row("analysis (streaming)", *child(CHILD_ANALYSIS, str(src))[:3])
        for method in [m for m in ("wanda", "sparsegpt") if m in runs]:
            out = root / f"out-{method}"
            base, peak, secs, sparsity = child(CHILD_PRUNE, str(src), str(out), method)
            row(f"{method} 50% (streaming)", base, peak, secs)
            written = sum(p.stat().st_size for p in out.glob("*.safetensors"))
            say(f"  [{method}: achieved sparsity {float(sparsity):.4f}, output {written / 1e9:.2f} GB]")
            shutil.rmtree(out)
        if "eval" in runs:
            base, peak, secs, ppl = child(CHILD_EVAL, str(src), "-")
            row("eval (streaming)", base, peak, secs)
            say(f"  [eval: perplexity {float(ppl):.1f} on {NSAMPLES} x {SEQLEN} random tokens]")
        if "wanda+eval" in runs:
            out = root / "out-wanda-eval"
            base, peak, secs, ppl = child(CHILD_EVAL, str(src), str(out))
            row("wanda 50% + eval along", base, peak, secs)
            say(f"  [wanda + eval: perplexity {float(ppl):.1f} of the pruned blocks as they were written]")
            shutil.rmtree(out)
        worst = max(peaks[1:] if "analysis" in runs else peaks, default=0.0)
        say(f"goal: pruning and evaluation peak under 1/3 of the checkpoint size: "
            f"{'met' if worst < 1 / 3 else 'NOT met'} (worst {worst:.2f}x)")
        shutil.rmtree(src)
        say("")
        small = root / "small"
        write_checkpoint(small, layers=2, shards=2, vocab=VOCAB)
        with tempfile.TemporaryDirectory(dir=root) as work:
            for method in [m for m in ("wanda", "sparsegpt") if m in runs]:
                same, count = same_as_loaded(small, Path(work), method)
                say(f"2-block instance, {method}: streamed output {'identical to' if same else 'DIFFERS from'} "
                    f"pruning the loaded model ({count} tensors compared bit for bit)")
        if "demo" in runs:
            demo_row(say, start)
            return
        say(f"total {time.perf_counter() - start:.0f} s")
    finally:
        write_results(args.runs, ap.get_default("runs"), lines)
        shutil.rmtree(root, ignore_errors=True)


def write_results(runs: str, default: str, lines: list[str]) -> None:
    partial = runs != default       # a subset goes beside the full table, not over it
    out = RESULTS.with_name(f"bench_prune_memory_{runs.replace(',', '_')}.txt") if partial else RESULTS
    out.write_text("\n".join(lines) + "\n")


def demo_row(say, start: float) -> None:
    """The streamed perplexity of the demo model against its checkpoint's size."""
    from core.models import gguf_to_folder, resolve_source

    folder = gguf_to_folder(resolve_source("demo").path)   # converted once, before the measured child
    base, peak, secs, ppl = child(CHILD_DEMO, str(folder))
    size = sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))
    say("")
    say(f"demo ({size / 1e6:.0f} MB checkpoint): streamed perplexity {float(ppl):.3f} (16 windows of 2048 "
        f"tokens) in {float(secs):.0f} s, peak {int(peak) / 2**10:.0f} MiB ({int(peak) * 1024 / size:.2f}x the "
        f"checkpoint), {int(base) / 2**10:.0f} MiB after imports: the evaluation added "
        f"{(int(peak) - int(base)) * 1024 / size:.2f}x")
    say(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
