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

Larger than memory, through the CLI (``--size-gb auto``, or a size in GB)::

    .venv/bin/python benchmarks/bench_prune_memory.py --size-gb auto [--dir /tmp/spectrascope-bench-prune]

writes a random LLaMA-7B-shaped bfloat16 checkpoint (hidden 4096, intermediate 11008, 32
heads; the demo model's tokenizer and 49152-token vocabulary) of as many blocks as make it
``--factor`` (1.1) x this machine's MemAvailable (``auto``), tensor by tensor into shards of
at most ``--shard-gb`` (5, Hugging Face's default), so writing never holds more than one
tensor; then, each in a fresh child process, ``spectrascope prune --streaming --eval``
(Wanda 50%, ``--nsamples`` x ``--seqlen`` calibration tokens, ``--max-windows`` windows) and
``spectrascope eval --streaming``, each child's peak resident memory taken twice (its
``ru_maxrss`` from ``wait4`` and ``VmHWM`` sampled from ``/proc/<pid>/status``), and its wall
time. The checkpoint, the pruned output and the children's Spectrascope home are removed at
the end, also on failure; the Markdown table goes to
``benchmarks/results/bench_prune_memory_larger_than_ram.md`` (``--results``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import struct
import threading
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


# ---- larger than memory: a LLaMA-7B-shaped bfloat16 checkpoint through the CLI ----------------

LARGE = dict(hidden=4096, inter=11008, heads=32, vocab=49152)      # vocabulary: the demo's tokenizer
LARGE_RESULTS = RESULTS.with_name("bench_prune_memory_larger_than_ram.md")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
BLOCK = {"self_attn.q_proj": ("h", "h"), "self_attn.k_proj": ("h", "h"), "self_attn.v_proj": ("h", "h"),
         "self_attn.o_proj": ("h", "h"), "mlp.gate_proj": ("f", "h"), "mlp.up_proj": ("f", "h"),
         "mlp.down_proj": ("h", "f")}


def mem_available() -> int:
    """MemAvailable of /proc/meminfo in bytes: what this machine can hold without swapping."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable")


def tensor_specs(layers: int, hidden: int, inter: int, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of a LLaMA of these shapes, in checkpoint order."""
    dims = {"h": hidden, "f": inter}
    out = [("model.embed_tokens.weight", (vocab, hidden))]
    for b in range(layers):
        out += [(f"model.layers.{b}.{rel}.weight", (dims[r], dims[c])) for rel, (r, c) in BLOCK.items()]
        out += [(f"model.layers.{b}.{n}.weight", (hidden,)) for n in ("input_layernorm", "post_attention_layernorm")]
    return out + [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]


def checkpoint_bytes(layers: int, hidden: int, inter: int, vocab: int, itemsize: int = 2) -> int:
    """Bytes of the tensors of ``tensor_specs`` (the shards' headers not counted)."""
    return itemsize * sum(math.prod(shape) for _, shape in tensor_specs(layers, hidden, inter, vocab))


def layers_for(target: int, hidden: int, inter: int, vocab: int, itemsize: int = 2) -> int:
    """The fewest blocks whose checkpoint is at least ``target`` bytes."""
    outside = checkpoint_bytes(0, hidden, inter, vocab, itemsize)
    per_block = checkpoint_bytes(1, hidden, inter, vocab, itemsize) - outside
    return max(1, math.ceil((target - outside) / per_block))


def write_safetensors(path: Path, specs: list[tuple[str, tuple[int, ...]]], fill) -> None:
    """A safetensors file of bfloat16 tensors written one tensor at a time (``fill(name, shape)``
    makes each just before it is written), so no more than one tensor is ever in memory."""
    header, offset = {}, 0
    for name, shape in specs:
        size = 2 * math.prod(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape in specs:
            f.write(fill(name, shape).to(torch.bfloat16).contiguous().view(torch.int16).numpy())
        f.flush()
        os.fsync(f.fileno())


def write_large_checkpoint(folder: Path, layers: int, hidden: int, inter: int, heads: int, vocab: int,
                           shard_bytes: int, tokenizer: Path | None) -> int:
    """A random LLaMA-shaped bfloat16 checkpoint in shards of at most ``shard_bytes`` (a block
    is never split: a larger block has a shard of its own), written tensor by tensor, with
    ``tokenizer``'s files; its size in bytes."""
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)

    def fill(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if len(shape) == 1:
            return torch.ones(shape)
        return torch.randn(shape, generator=gen) * 0.02

    units: list[list] = []                 # the embeddings, each block, the final norm with the head
    for name, shape in tensor_specs(layers, hidden, inter, vocab):
        if not units or name.endswith("q_proj.weight") or name == "model.norm.weight":
            units.append([])
        units[-1].append((name, shape))
    groups, size = [[]], 0
    for unit in units:
        nbytes = sum(2 * math.prod(shape) for _, shape in unit)
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1] += unit
        size += nbytes
    weight_map = {}
    for i, specs in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        write_safetensors(folder / name, specs, fill)
        weight_map.update(dict.fromkeys((n for n, _ in specs), name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": heads, "vocab_size": vocab, "max_position_embeddings": 2048,
              "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "hidden_act": "silu", "torch_dtype": "bfloat16",
              "bos_token_id": 1, "eos_token_id": 2}
    (folder / "config.json").write_text(json.dumps(config))
    for f in TOKENIZER_FILES:
        if tokenizer is not None and (tokenizer / f).is_file():
            shutil.copyfile(tokenizer / f, folder / f)
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def measure(cmd: list[str], env: dict, log: Path, poll: float = 0.2) -> dict:
    """Run ``cmd`` as a child; its wall time, its peak resident memory twice (``ru_maxrss``
    from ``wait4``, and ``VmHWM`` read from ``/proc/<pid>/status`` while it runs), its stdout."""
    start = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env,
                                cwd=Path(__file__).resolve().parent.parent)
        hwm = [0]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(poll):
                try:
                    for line in open(f"/proc/{proc.pid}/status"):
                        if line.startswith("VmHWM:"):
                            hwm[0] = max(hwm[0], int(line.split()[1]))
                except OSError:       # gone (or a zombie without memory figures)
                    pass

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        stdout = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        stop.set()
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if proc.returncode:
        tail = log.read_text()[-2000:]
        raise RuntimeError(f"{' '.join(cmd[2:5])} ... failed with exit {proc.returncode}:\n{tail}")
    return {"seconds": seconds, "maxrss_kib": usage.ru_maxrss, "vmhwm_kib": hwm[0], "stdout": stdout.decode()}


def large_run(args: argparse.Namespace, say) -> None:
    """Prune and evaluate a checkpoint larger than this machine's free memory, through the CLI."""
    available = mem_available()
    target = int(args.factor * available) if args.size_gb == "auto" else int(float(args.size_gb) * 1e9)
    dims = {k: getattr(args, k) for k in LARGE}
    layers = layers_for(target, dims["hidden"], dims["inter"], dims["vocab"])
    size = checkpoint_bytes(layers, dims["hidden"], dims["inter"], dims["vocab"])
    root = Path(args.dir)
    free = shutil.disk_usage(root.parent if not root.exists() else root).free
    if free < 2 * size + 2**30:       # the checkpoint, the pruned output (same dtype) and 1 GiB to spare
        raise SystemExit(f"{root.parent}: {free / 1e9:.1f} GB free, the {size / 1e9:.1f} GB checkpoint and its pruned "
                         f"copy need {(2 * size + 2**30) / 1e9:.1f} GB: give --dir on a larger disk or a smaller "
                         "--size-gb")
    if root.exists():
        raise SystemExit(f"{root} exists: give a --dir that does not exist yet (this benchmark deletes it at the end)")
    from core.models import gguf_to_folder, resolve_source

    tokenizer = (Path(args.tokenizer) if Path(args.tokenizer).is_dir() else
                 Path(gguf_to_folder(resolve_source(args.tokenizer).path)))
    src, out, home = root / "checkpoint", root / "pruned", root / "home"
    root.mkdir(parents=True)
    home.mkdir()
    t = time.perf_counter()
    written = write_large_checkpoint(src, layers, dims["hidden"], dims["inter"], dims["heads"], dims["vocab"],
                                     int(args.shard_gb * 1e9), tokenizer)
    shards = len(list(src.glob("*.safetensors")))
    write_s = time.perf_counter() - t
    gib = written / 2**30
    say(f"checkpoint: {written / 1e9:.2f} GB ({gib:.2f} GiB) bfloat16 Gaussian, {layers} blocks of hidden "
        f"{dims['hidden']} / intermediate {dims['inter']} / {dims['heads']} heads, vocabulary {dims['vocab']}, "
        f"{shards} shards of <= {args.shard_gb:g} GB, written tensor by tensor in {write_s:.0f} s "
        f"({written / write_s / 1e6:.0f} MB/s with fsync)")
    say(f"this machine: MemAvailable {available / 1e9:.2f} GB before writing, so the checkpoint is "
        f"{written / available:.2f}x the free memory; {os.cpu_count()} CPUs; torch {torch.__version__}")
    env = {**os.environ, "SPECTRASCOPE_HOME": str(home), "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    cli = [sys.executable, "-m", "core.cli"]
    common = ["--model", str(src), "--device", "cpu", "--dtype", "bfloat16", "--quiet", "--json"]
    prune_cmd = cli + ["prune", *common, "--streaming", "--method", "wanda", "--sparsity", "0.5",
                       "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--save", str(out),
                       "--eval", "--max-windows", str(args.windows)]
    eval_cmd = cli + ["eval", *common, "--streaming", "--seqlen", str(args.seqlen), "--max-windows", str(args.windows)]
    rows = []
    for name, cmd in (("prune --streaming --eval (wanda 50%)", prune_cmd), ("eval --streaming", eval_cmd)):
        r = measure(cmd, env, root / "child.log")
        rows.append((name, r))
        out_json = json.loads(r["stdout"])
        found = {k: out_json.get(k) for k in ("achieved_sparsity", "perplexity") if out_json.get(k) is not None}
        say(f"  [{name}: {r['seconds']:.0f} s, ru_maxrss {r['maxrss_kib'] / 2**20:.2f} GiB, "
            f"VmHWM {r['vmhwm_kib'] / 2**20:.2f} GiB; {found or r['stdout'].strip()[:300]}]")
        if cmd is prune_cmd:
            out_gb = sum(p.stat().st_size for p in out.glob("*.safetensors")) / 1e9
            say(f"  [pruned output: {out_gb:.2f} GB]")
            shutil.rmtree(out)
    say("")
    say(f"command: `python benchmarks/bench_prune_memory.py {' '.join(sys.argv[1:])}`")
    say(f"calibration {args.nsamples} x {args.seqlen} tokens of the embedded text, evaluation {args.windows} "
        f"windows of {args.seqlen} tokens; cpu bfloat16, {torch.get_num_threads()} threads")
    say("")
    say("| run (child process, CLI) | peak RSS (ru_maxrss) | VmHWM sampled | x checkpoint | wall time |")
    say("|---|---|---|---|---|")
    worst = 0.0
    for name, r in rows:
        peak = max(r["maxrss_kib"], r["vmhwm_kib"]) / 2**20
        worst = max(worst, peak / gib)
        say(f"| `{name}` | {r['maxrss_kib'] / 2**20:.2f} GiB | {r['vmhwm_kib'] / 2**20:.2f} GiB | "
            f"{peak / gib:.3f} | {r['seconds'] / 60:.1f} min |")
    say("")
    say(f"checkpoint {gib:.2f} GiB = {written / available:.2f}x MemAvailable; goal: each peak under 1/3 of the "
        f"checkpoint: {'met' if worst < 1 / 3 else 'NOT met'} (worst {worst:.3f}x)")


def large_main(args: argparse.Namespace) -> None:
    lines: list[str] = []

    def say(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    root = Path(args.dir)
    created = not root.exists()
    start = time.perf_counter()
    try:
        large_run(args, say)
        say(f"total {time.perf_counter() - start:.0f} s")
        Path(args.results).write_text("\n".join(lines) + "\n")
    finally:
        if created:                  # only what this run made: never a folder that was there before
            shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/spectrascope-bench-prune")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--runs", default="analysis,wanda,sparsegpt,eval,wanda+eval,demo",
                    help="which rows to measure (default all)")
    big = ap.add_argument_group("larger than memory (--size-gb)")
    big.add_argument("--size-gb", help="'auto' (--factor x MemAvailable) or GB: the CLI on a checkpoint this large")
    big.add_argument("--factor", type=float, default=1.1, help="checkpoint / MemAvailable with --size-gb auto")
    big.add_argument("--shard-gb", type=float, default=5.0, help="largest shard (GB, default 5)")
    big.add_argument("--nsamples", type=int, default=4, help="calibration windows (default 4)")
    big.add_argument("--seqlen", type=int, default=128, help="calibration and evaluation window (default 128)")
    big.add_argument("--windows", type=int, default=4, help="evaluation windows (default 4)")
    big.add_argument("--tokenizer", default="demo", help="model (or folder) whose tokenizer files are copied (default demo; --vocab must match)")
    big.add_argument("--results", default=str(LARGE_RESULTS), help="where the Markdown table goes")
    for k, v in LARGE.items():
        big.add_argument(f"--{k}", type=int, default=v, help=argparse.SUPPRESS)     # tests: tiny shapes
    args = ap.parse_args()
    if args.size_gb:
        return large_main(args)
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
