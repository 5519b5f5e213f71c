"""Spectrascope's Wanda / SparseGPT against llm-compressor's own one-shot pruners, with the
recipe ``spectrascope allocate --recipe`` writes, on the demo model: the same per-matrix
ratios, the same calibration token ids, the same evaluation windows.

Two virtual environments (llm-compressor pins other transformers / compressed-tensors
versions than ours): this script runs in ours, writes the recipe, the calibration ids and the
dense model's folder name to a work folder, and runs itself again in ``.venv-llmc``
(``bash benchmarks/llmcompressor_env.sh`` creates it) as ``--llmc-step``, which loads the same
dense folder, calls ``llmcompressor.oneshot`` with a DataLoader of exactly those ids and writes
the pruned matrices. Back here it prunes with ``core.pruning.prune`` under the same ratios and
compares: per-matrix and per-block sparsity, the Jaccard index of the two sets of zeroed
weights per matrix kind, perplexity on the same evaluation windows, and seconds.

    .venv/bin/python benchmarks/bench_llmcompressor.py [--methods wanda,sparsegpt] [--sparsity 0.5]
        [--mapping matrix] [--nsamples 16] [--seqlen 256] [--windows 16] [--out benchmarks/results/llmcompressor.md]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LLMC_PYTHON = ROOT / ".venv-llmc" / "bin" / "python"


def llmc_step(folder: str, recipe: str, calib: str, out: str) -> None:
    """In .venv-llmc: llm-compressor's oneshot with ``recipe`` on ``folder`` over the ids in ``calib``."""
    import torch
    import yaml
    from llmcompressor import __version__ as llmc_version
    from llmcompressor import oneshot
    from safetensors.torch import load_file, save_file
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = load_file(calib)["input_ids"]
    rows = [{"input_ids": row, "attention_mask": torch.ones_like(row)} for row in ids]
    loader = DataLoader(rows, batch_size=1, shuffle=False)
    start = time.perf_counter()
    oneshot(model=model, tokenizer=AutoTokenizer.from_pretrained(folder), recipe=recipe, dataset=loader,
            num_calibration_samples=len(rows))
    seconds = time.perf_counter() - start
    spec = yaml.safe_load(Path(recipe).read_text())["sparsity_stage"]["sparsity_modifiers"]
    targets = next(iter(spec.values()))["targets"]
    modules = dict(model.named_modules())
    save_file({n: modules[n].weight.detach().contiguous() for n in targets}, out,
              metadata={"seconds": f"{seconds:.3f}", "llmcompressor": llmc_version})


def mask_stats(ratios: dict, dense: dict, ours: dict, theirs: dict) -> dict[str, dict[str, float]]:
    """Per matrix: its ratio, parameters, zeros of ours / theirs, their intersection and union,
    and how far apart the kept weights are (relative Frobenius distance, for SparseGPT's updates)."""
    out = {}
    for name, ratio in ratios.items():
        a, b = ours[name] == 0, theirs[name] == 0
        out[name] = {"ratio": float(ratio), "params": a.numel(), "ours": int(a.sum()), "theirs": int(b.sum()),
                     "inter": int((a & b).sum()), "union": int((a | b).sum()),
                     "dense_zeros": int((dense[name] == 0).sum()),
                     "dist": float((ours[name] - theirs[name]).norm() / dense[name].norm())}
    return out


def report(args: argparse.Namespace, alloc: object, dense_ppl: float, results: list[dict]) -> str:
    """The Markdown of ``benchmarks/results/llmcompressor.md``."""
    import platform

    import torch

    lines = ["# Spectrascope against llm-compressor's own one-shot pruners", "",
             f"`benchmarks/bench_llmcompressor.py --methods {args.methods} --sparsity {args.sparsity} --mapping "
             f"{args.mapping} --nsamples {args.nsamples} --seqlen {args.seqlen} --windows {args.windows}` on the demo "
             f"model (SmolLM2-135M, float32), CPU ({os.cpu_count()} cores, shared; torch {torch.__version__}, "
             f"{platform.python_version()}), llm-compressor {results[0]['version'] if results else '?'} in its own "
             "virtual environment.", "",
             f"Allocation: {alloc.summary().splitlines()[0]}, target {args.sparsity:g}, ratios "
             f"{alloc.ratios['ratio'].min():.3f}-{alloc.ratios['ratio'].max():.3f}; the recipe names each matrix as a "
             "target with its own sparsity. Both sides prune the same dense float32 folder with the same "
             f"{args.nsamples} x {args.seqlen} calibration token ids, and perplexity is measured by Spectrascope's "
             f"protocol on the same {args.windows} evaluation windows of {args.seqlen} tokens.", "",
             "| method | perplexity Spectrascope | perplexity llm-compressor | dense | sparsity ours / theirs | "
             "mask Jaccard (all) | seconds ours / theirs (oneshot) |", "|---|---|---|---|---|---|---|"]
    for r in results:
        st = r["stats"]
        tot = lambda k: sum(v[k] for v in st.values())   # noqa: E731
        lines.append(f"| {r['method']} | {r['ours_ppl']:.3f} | {r['their_ppl']:.3f} | {dense_ppl:.3f} | "
                     f"{tot('ours') / tot('params'):.4f} / {tot('theirs') / tot('params'):.4f} | "
                     f"{tot('inter') / tot('union'):.4f} | {r['ours_seconds']:.1f} / {r['their_seconds']:.1f} |")
    for r in results:
        st = r["stats"]
        lines += ["", f"## {r['method']}: per kind", "",
                  "| kind | matrices | requested | ours | theirs | Jaccard of the zeroed sets | largest per-matrix "
                  "sparsity gap | kept weights apart (rel. Frobenius, mean) |", "|---|---|---|---|---|---|---|---|"]
        by_kind: dict[str, list[str]] = {}
        for name in st:
            by_kind.setdefault(r["kinds"][name], []).append(name)
        for kind, names in by_kind.items():
            s = [st[n] for n in names]
            p = sum(x["params"] for x in s)
            gap = max(abs(x["ours"] - x["theirs"]) / x["params"] for x in s)
            lines.append(f"| {kind} | {len(s)} | {sum(x['ratio'] * x['params'] for x in s) / p:.4f} | "
                         f"{sum(x['ours'] for x in s) / p:.4f} | {sum(x['theirs'] for x in s) / p:.4f} | "
                         f"{sum(x['inter'] for x in s) / sum(x['union'] for x in s):.4f} | {gap:.5f} | "
                         f"{sum(x['dist'] for x in s) / len(s):.4f} |")
        lines += ["", f"## {r['method']}: per block (parameter-weighted sparsity)", "",
                  "| block | requested | ours | theirs | Jaccard |", "|---|---|---|---|---|"]
        by_block: dict[int, list[str]] = {}
        for name in st:
            by_block.setdefault(int(r["blocks"][name]), []).append(name)
        for block in sorted(by_block):
            s = [st[n] for n in by_block[block]]
            p = sum(x["params"] for x in s)
            lines.append(f"| {block} | {sum(x['ratio'] * x['params'] for x in s) / p:.4f} | "
                         f"{sum(x['ours'] for x in s) / p:.4f} | {sum(x['theirs'] for x in s) / p:.4f} | "
                         f"{sum(x['inter'] for x in s) / sum(x['union'] for x in s):.4f} |")
    zeros = sum(v["dense_zeros"] for v in results[0]["stats"].values()) if results else 0
    params = sum(v["params"] for v in results[0]["stats"].values()) if results else 1
    lines += ["", f"The dense matrices already hold {zeros / params:.4%} exact zeros (dequantized GGUF); they count "
              "as zeroed on both sides. Seconds: each side's own pruning clock (ours: `PruneResult.seconds`, capture "
              "to last block; theirs: the `oneshot` call), on a CPU shared with other jobs."]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="wanda,sparsegpt")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--mapping", default="matrix", choices=("block", "matrix"),
                    help="the alpha allocation's mapping (matrix: every matrix its own ratio, the harder check)")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--windows", type=int, default=16, help="evaluation windows of --seqlen tokens")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "llmcompressor.md"))
    ap.add_argument("--llmc-python", default=str(LLMC_PYTHON))
    args = ap.parse_args()
    if not Path(args.llmc_python).is_file():
        sys.exit(f"{args.llmc_python} not found: run `bash benchmarks/llmcompressor_env.sh` first")

    import torch
    from safetensors.torch import load_file, save_file

    from core.allocation import allocate
    from core.analysis import analyze
    from core.calibration import calibration_data
    from core.evaluation import perplexity
    from core.models import demo_gguf, gguf_to_folder, load_model
    from core.pruning import prune
    from core.recipes import build_recipe

    folder = gguf_to_folder(demo_gguf())
    loaded = load_model("demo")
    table = analyze("demo").table
    alloc = allocate(table, sparsity=args.sparsity, method="alpha", mapping=args.mapping)
    ratios = alloc.ratio_by_name()
    calib = calibration_data(loaded.tokenizer, nsamples=args.nsamples, seqlen=args.seqlen, model=loaded.model)
    dense_ppl = perplexity(loaded, seqlen=args.seqlen, max_windows=args.windows, device="cpu")
    kinds = dict(zip(alloc.ratios["name"], alloc.ratios["kind"]))
    blocks = dict(zip(alloc.ratios["name"], alloc.ratios["block"]))
    dense = {m.name: loaded.weight(m.name).detach() for m in loaded.matrices}    # prune(copy=True) leaves these
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-llmc-") as work:
        work = Path(work)
        save_file({"input_ids": calib.input_ids.contiguous()}, str(work / "calib.safetensors"))
        for method in [m for m in args.methods.split(",") if m]:
            recipe = build_recipe(alloc, method)
            recipe_path = recipe.write(work / f"{method}.yaml")
            theirs_path = work / f"{method}-llmc.safetensors"
            t = time.perf_counter()
            proc = subprocess.run([args.llmc_python, __file__, "--llmc-step", str(folder), str(recipe_path),
                                   str(work / "calib.safetensors"), str(theirs_path)],
                                  cwd=str(work), capture_output=True, text=True, env={**os.environ})
            wall = time.perf_counter() - t
            if proc.returncode != 0:
                sys.exit(f"llm-compressor failed ({method}):\n{proc.stderr[-4000:]}")
            theirs = load_file(str(theirs_path))
            with open(theirs_path, "rb") as fh:    # the safetensors header holds our metadata
                n = int.from_bytes(fh.read(8), "little")
                meta = json.loads(fh.read(n))["__metadata__"]

            ours = prune(loaded, ratios, method=method, calibration=calib, device="cpu", copy=True)
            ours_ppl = perplexity(ours.model, seqlen=args.seqlen, max_windows=args.windows, device="cpu")
            stats = mask_stats(ratios, dense, {n: ours.model.weight(n).detach() for n in ratios}, theirs)
            with torch.no_grad():              # the same copy, now with their weights, on the same windows
                for name, w in theirs.items():
                    ours.model.weight(name).copy_(w)
            their_ppl = perplexity(ours.model, seqlen=args.seqlen, max_windows=args.windows, device="cpu")
            results.append({"method": method, "recipe": recipe, "stats": stats, "kinds": kinds, "blocks": blocks,
                             "ours_seconds": ours.seconds, "their_seconds": float(meta["seconds"]),
                             "their_wall": wall, "version": meta["llmcompressor"], "ours_ppl": ours_ppl.perplexity,
                             "their_ppl": their_ppl.perplexity, "windows": ours_ppl.windows})
            print(f"{method}: perplexity ours {ours_ppl.perplexity:.3f}, llm-compressor {their_ppl.perplexity:.3f} "
                  f"(dense {dense_ppl.perplexity:.3f}); seconds ours {ours.seconds:.1f}, theirs {meta['seconds']}",
                  flush=True)
            del ours
    text = report(args, alloc, dense_ppl.perplexity, results)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--llmc-step":
        llmc_step(*sys.argv[2:])
    else:
        raise SystemExit(main())
