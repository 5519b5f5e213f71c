"""The prepared GPU check: one command, a few minutes on one GPU, one Markdown table.

1. the CUDA tests (``pytest -m cuda``; only when the device is CUDA);
2. a LLaMA-7B-shaped analysis: 224 matrices (32 blocks of q, k, v, o 4096x4096, gate, up
   11008x4096, down 4096x11008), random weights generated on the device (no download),
   through ``compute_spectra`` and ``build_table`` (eigenvalues, power-law fits, metrics),
   with the eigenvalues of a sample compared with float64 on the CPU;
3. Wanda and SparseGPT on one LLaMA-7B-shaped block with 128 x 2048 calibration tokens, and
   the projection to all 32 blocks;
4. the eigenvalue routes timed on one 4096x4096 matrix (float64 Gram + eigvalsh, the one in
   use; float32 Gram + eigvalsh; float64 singular values), with their errors;
5. Wanda on a whole LLaMA-7B-shaped model (32 blocks, random weights, float16), measured,
   not projected (``--no-full`` skips it);
6. peak GPU memory of each stage;
7. the projection (``benchmarks/projection.py``): the spectrum time of each distinct matrix
   shape of LLaMA-2-70B and LLaMA-3.1-405B on the device (the shapes / 32 with ``--small``),
   the read bandwidth of the temporary folder's disk (page cache dropped), and the analysis
   time projected to 1, 2, 4 and 8 GPUs;
8. streamed evaluation: a random 16-block LLaMA-7B-shaped checkpoint (2 with ``--small``)
   written to disk, its perplexity block by block from the shards (``eval --streaming``) on
   the device against the in-memory one, and the peak device memory against the checkpoint;
9. multi-device prune + eval (``multi_device``): Wanda and perplexity of a small LLaMA with its
   blocks placed across cuda:0 + cpu, and across every visible GPU when there are several,
   against one device (masks and perplexity must agree);
10. 2:4 deployment (``deploy_24``, ``benchmarks/bench_deploy.py``): each LLaMA-7B matrix shape's
   matmul with PyTorch's semi-structured sparse kernels against dense, end-to-end greedy
   generation tokens/s of a 4-block 2:4 LLaMA with and without them, and what zlib makes of a
   saved block (dense, 50% unstructured, 2:4). On the CPU it times dense only and says why.

Each stage prints its line as soon as it ends, so a run cut short still reports what it did.

    python benchmarks/gpu_check.py                       # on the GPU machine (device cuda)
    python benchmarks/gpu_check.py --small --device cpu  # scaled-down shapes, a CPU smoke test

Goals on one H200 (issue 14): the analysis under 60 s; Wanda on all 32 blocks under 5 min.
The JSON file (``--json``) has every number of the table.
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.analysis import build_table  # noqa: E402
from core.models import LoadedModel, MatrixInfo  # noqa: E402
from core.pruning import prune  # noqa: E402
from core.spectra import compute_spectra, eigenvalues  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_deploy  # noqa: E402  (benchmarks/bench_deploy.py)
from common import random_llama  # noqa: E402  (benchmarks/common.py)
import projection  # noqa: E402  (benchmarks/projection.py)

FULL = dict(hidden=4096, inter=11008, blocks=32, heads=32, vocab=32000, nsamples=128, seqlen=2048)
SMALL = dict(hidden=256, inter=688, blocks=4, heads=4, vocab=512, nsamples=8, seqlen=128)
KINDS = ("q", "k", "v", "o", "gate", "up", "down")


def shapes_of(s: dict) -> list[tuple[str, int, str, int, int]]:
    """(name, block, kind, rows, cols) of every matrix, LLaMA's order (rows = out features)."""
    h, f = s["hidden"], s["inter"]
    dims = {"q": (h, h), "k": (h, h), "v": (h, h), "o": (h, h), "gate": (f, h), "up": (f, h), "down": (h, f)}
    return [(f"model.layers.{b}.{k}", b, k, *dims[k]) for b in range(s["blocks"]) for k in KINDS]


def _weight(k: int, rows: int, cols: int, device: str) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(1000 + k)
    return torch.randn(rows, cols, generator=g, device=device) / cols ** 0.5


def _peak_reset(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # process peak (KiB -> GiB)


def cuda_tests(device: str) -> dict:
    if not device.startswith("cuda"):
        return {"status": "skipped (no CUDA device)"}
    # only the files that hold CUDA tests: collecting the whole suite would import the
    # dashboard's and the browser test's packages, which a bare GPU image need not have
    files = sorted(str(f.relative_to(ROOT)) for f in (ROOT / "tests").glob("test_*.py")
                   if "mark.cuda" in f.read_text())
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", *files],
                          cwd=ROOT, capture_output=True, text=True)
    last = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
    return {"status": "passed" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})", "summary": last,
            "seconds": time.perf_counter() - start, "tail": proc.stdout[-3000:]}


def analysis(s: dict, device: str, sample: int) -> dict:
    """Spectra + fits + metrics of every matrix, generated lazily on the device."""
    infos = [MatrixInfo(n, b, k, r, c) for n, b, k, r, c in shapes_of(s)]
    items = ((info, _weight(i, info.rows, info.cols, device)) for i, info in enumerate(infos))
    _peak_reset(device)
    start = time.perf_counter()
    spectra = compute_spectra(items, total=len(infos), device=device)
    spectra_s = time.perf_counter() - start
    table = build_table(spectra, device=device)
    seconds = time.perf_counter() - start
    peak = _peak_gib(device)
    # a sample (one matrix of each shape first) against float64 eigenvalues on the CPU
    picks = sorted({next(i for i, x in enumerate(infos) if (x.rows, x.cols) == shp)
                    for shp in {(x.rows, x.cols) for x in infos}})[:sample]
    rel, d_alpha = [], []
    for i in picks:
        ref = eigenvalues(_weight(i, infos[i].rows, infos[i].cols, device).cpu(), device="cpu")
        rel.append(float(np.max(np.abs(spectra[i].eigs - ref)) / ref[-1]))
        ref_alpha = build_table([type(spectra[i])(infos[i], ref, spectra[i].w_var)], device="cpu")["alpha"].iloc[0]
        d_alpha.append(abs(float(table["alpha"].iloc[i]) - float(ref_alpha)))
    return {"matrices": len(infos), "seconds": seconds, "spectra_seconds": spectra_s, "fit_seconds": seconds - spectra_s,
            "sample": len(picks), "max_rel_eig_error": max(rel), "max_alpha_diff": max(d_alpha),
            "fitted": int(table["alpha"].notna().sum()), "peak_gib": peak}


def per_shape(s: dict, device: str, repeat: int = 2) -> dict:
    """Time of one matrix's spectrum by shape (best of ``repeat``; batches of the same shape)."""
    out = {}
    for r, c in sorted({(x[3], x[4]) for x in shapes_of(s)}):
        items = [(MatrixInfo(f"m{k}", 0, "x", r, c), _weight(k, r, c, device)) for k in range(4)]
        best = float("inf")
        for _ in range(repeat):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            compute_spectra(items, device=device)
            best = min(best, (time.perf_counter() - start) / len(items))
        out[f"{r}x{c}"] = best * 1000
    return out


def routes(device: str, n: int) -> dict:
    """One ``n x n`` matrix's eigenvalues by three routes: seconds and error against float64 CPU."""
    w = _weight(7, n, n, device)
    ref = eigenvalues(w.cpu(), device="cpu")
    out = {}

    def timed(name, fn):
        fn()                                  # warm-up (kernels, workspace)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        got = np.sort(fn().double().cpu().numpy())
        out[name] = {"ms": (time.perf_counter() - start) * 1000,
                     "max_rel_error": float(np.max(np.abs(got - ref)) / ref[-1])}

    w64 = w.double()
    timed("float64 Gram + eigvalsh (in use)", lambda: torch.linalg.eigvalsh(w64.T @ w64))
    timed("float32 Gram + eigvalsh", lambda: torch.linalg.eigvalsh(w.T @ w))
    timed("float64 svdvals squared", lambda: torch.linalg.svdvals(w64) ** 2)
    return out


def _llama(s: dict, blocks: int, device: str, dtype: torch.dtype) -> LoadedModel:
    """A random LLaMA of these shapes, built on ``device``."""
    return random_llama(s, blocks, device, dtype, s["seqlen"])


def pruned(s: dict, device: str, dtype: torch.dtype, method: str, blocks: int = 1) -> dict:
    """``method`` at 50% on a ``blocks``-block LLaMA of these shapes, ``nsamples x seqlen`` random tokens."""
    loaded = _llama(s, blocks, device, dtype)
    ids = torch.randint(0, s["vocab"], (s["nsamples"], s["seqlen"]), generator=torch.Generator().manual_seed(0))
    _peak_reset(device)
    result = prune(loaded, 0.5, method=method, calibration=ids, device=device)
    peak = _peak_gib(device)
    del loaded
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"seconds": result.seconds, "achieved": float(result.sparsity), "peak_gib": peak, "blocks": blocks,
            "projected_32_blocks_s": result.seconds * 32 / blocks, "tokens": s["nsamples"] * s["seqlen"]}


MULTI = dict(hidden=512, inter=1376, blocks=8, heads=8, vocab=4096, nsamples=16, seqlen=256)


def multi_device(s: dict, device: str) -> dict:
    """Wanda (in memory) and perplexity with the blocks placed across several devices against
    one device (``device``), float32: per placement the seconds of both, the share of equal
    mask entries and the perplexities' relative difference. Placements: cuda:0 + cpu and every
    visible GPU (several), or cpu + cpu (two positions of one device) on the CPU."""
    from core.evaluation import perplexity

    if device.startswith("cuda"):
        n = torch.cuda.device_count()
        placements = [["cuda:0", "cpu"]] + ([[f"cuda:{i}" for i in range(n)]] if n > 1 else [])
        ref = "cuda:0"
    else:
        placements, ref = [["cpu", "cpu"]], "cpu"
    loaded = _llama(s, s["blocks"], "cpu", torch.float32)
    gen = torch.Generator().manual_seed(0)
    calib = torch.randint(0, s["vocab"], (s["nsamples"], s["seqlen"]), generator=gen)
    text = torch.randint(0, s["vocab"], (8 * s["seqlen"],), generator=gen)

    def run(**where) -> tuple:
        start = time.perf_counter()
        result = prune(loaded, 0.5, method="wanda", calibration=calib, copy=True, **where)
        prune_s = time.perf_counter() - start
        masks = {m.name: result.model.weight(m.name) == 0 for m in loaded.matrices}
        ppl = perplexity(loaded, ids=text, seqlen=s["seqlen"], **where)
        return masks, prune_s, ppl, result.device

    masks, prune_s, ppl, _ = run(device=ref)
    out = {"reference": ref, "prune_seconds": prune_s, "eval_seconds": ppl.seconds, "perplexity": ppl.perplexity,
           "placements": {}}
    for devices in placements:
        got, p_s, p_ppl, where = run(devices=devices)
        agree = sum(int((got[k] == masks[k]).sum()) for k in masks) / sum(v.numel() for v in masks.values())
        out["placements"][",".join(devices)] = {
            "placement": where, "prune_seconds": p_s, "eval_seconds": p_ppl.seconds, "mask_agreement": agree,
            "perplexity": p_ppl.perplexity, "ppl_rel_diff": abs(p_ppl.perplexity / ppl.perplexity - 1)}
    bad = [k for k, v in out["placements"].items() if v["mask_agreement"] < 0.999 or v["ppl_rel_diff"] > 1e-3]
    if bad:
        out["error"] = f"placements {bad} differ from one device"
    out["rows"] = [(f"multi-device prune + eval ({k}: {v['placement']})",
                    f"wanda {v['prune_seconds']:.1f} s (one device {prune_s:.1f} s), masks agree "
                    f"{v['mask_agreement']:.5f}; perplexity {v['eval_seconds']:.1f} s (one device "
                    f"{ppl.seconds:.1f} s), relative difference {v['ppl_rel_diff']:.1e}", "identical")
                   for k, v in out["placements"].items()]
    return out
def projected(small: bool, device: str) -> dict:
    """Per-shape spectrum times of the 70B and 405B shapes here, the read bandwidth, the projection."""
    return projection.measure(small, device, (64 << 20) if small else (4 << 30))


def streamed_eval(s: dict, device: str, dtype: torch.dtype, blocks: int, windows: int = 4) -> dict:
    """Perplexity of a ``blocks``-block checkpoint on disk, block by block from its shards (as
    ``eval --streaming``), against the same model's in-memory perplexity; the peak device
    memory of the streamed run against the checkpoint's size (CUDA; on the CPU the figure is
    the whole process's peak so far, not the stage's)."""
    from core.evaluation import perplexity
    from core.models import load_skeleton

    text = torch.randint(0, s["vocab"], (windows * s["seqlen"],), generator=torch.Generator().manual_seed(1))
    loaded = _llama(s, blocks, device, dtype)
    dense = perplexity(loaded, ids=text, seqlen=s["seqlen"], device=device).perplexity
    with tempfile.TemporaryDirectory(prefix="gpu-check-streamed-") as tmp:
        loaded.model.save_pretrained(tmp, max_shard_size="2GB")
        del loaded
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        size = sum(f.stat().st_size for f in Path(tmp).glob("*.safetensors")) / 2**30
        skeleton = load_skeleton(tmp, dtype=str(dtype)[6:], tokenizer=False)
        _peak_reset(device)
        start = time.perf_counter()
        streamed = perplexity(skeleton, ids=text, seqlen=s["seqlen"], device=device).perplexity
        seconds = time.perf_counter() - start
        peak = _peak_gib(device)
    return {"blocks": blocks, "windows": windows, "checkpoint_gib": size, "seconds": seconds, "peak_gib": peak,
            "peak_fraction": peak / size if device.startswith("cuda") else None, "perplexity": streamed,
            "in_memory_perplexity": dense, "rel_diff": abs(streamed - dense) / dense}


def _guard(fn, *args) -> dict:
    try:
        return fn(*args)
    except Exception as exc:   # one failed stage still leaves the rest of the table
        logging.exception("stage failed")
        return {"error": f"{type(exc).__name__}: {exc}"}


def table(res: dict) -> str:
    a, t = res["analysis"], res["cuda_tests"]
    rows = [("CUDA tests (pytest -m cuda)", f"{t['status']} {t.get('summary', '')}".strip(), "pass")]
    if "error" in a:
        rows.append(("analysis", a["error"], ""))
    else:
        rows += [(f"analysis: {a['matrices']} matrices (spectra + fits + metrics)",
                  f"{a['seconds']:.1f} s (spectra {a['spectra_seconds']:.1f} s, fits {a['fit_seconds']:.1f} s)",
                  "< 60 s" if not res["small"] else "-"),
                 (f"eigenvalues vs float64 CPU ({a['sample']} matrices)",
                  f"max error {a['max_rel_eig_error']:.1e} of lambda_max; max alpha difference {a['max_alpha_diff']:.1e}",
                  "< 1e-10"),
                 ("analysis peak memory", f"{a['peak_gib']:.2f} GiB", "")]
    for shape, ms in res.get("per_matrix_ms", {}).items():
        rows.append((f"one spectrum {shape}", f"{ms:.1f} ms" if shape != "error" else ms, ""))
    for name, r in res.get("routes", {}).items():
        rows.append((f"route: {name}", r if isinstance(r, str) else
                     f"{r['ms']:.0f} ms, max error {r['max_rel_error']:.1e} of lambda_max", ""))
    for m in ("wanda", "sparsegpt"):
        r = res[m]
        if "error" in r:
            rows.append((f"{m}, one block", r["error"], ""))
            continue
        rows += [(f"{m}, one block, {r['tokens']} calibration tokens",
                  f"{r['seconds']:.1f} s, sparsity {r['achieved']:.3f}, peak {r['peak_gib']:.2f} GiB", ""),
                 (f"{m}, all 32 blocks (projected)", f"{r['projected_32_blocks_s'] / 60:.1f} min",
                  "< 5 min" if m == "wanda" and not res["small"] else "-")]
    full = res.get("wanda_full")
    if full:
        rows.append(("wanda, whole model, measured", full["error"] if "error" in full else
                     f"{full['blocks']} blocks in {full['seconds'] / 60:.1f} min, sparsity {full['achieved']:.3f}, "
                     f"peak {full['peak_gib']:.1f} GiB", "< 5 min" if not res["small"] else "-"))
    multi = res.get("multi_device", {})
    rows += [tuple(r) for r in multi.get("rows", [])] or \
        ([("multi-device prune + eval", multi.get("error", "no result"), "identical")] if multi else [])
    rows += _projection_rows(res.get("projection"), res["small"]) + _streamed_rows(res.get("streamed_eval"))
    if "deploy_24" in res:
        rows += bench_deploy.rows(res["deploy_24"])
    head = (f"GPU check {res['date']} on {res['device_name']} ({res['device']}, {res['dtype']}; "
            f"{'small shapes' if res['small'] else 'LLaMA-7B shapes'}; torch {res['torch']})")
    lines = [head, "", "| check | result | goal |", "|---|---|---|"]
    lines += [f"| {a_} | {b} | {c} |" for a_, b, c in rows]
    return "\n".join(lines)


def _projection_rows(r: dict | None, small: bool) -> list[tuple[str, str, str]]:
    if not r:
        return []
    if "error" in r:
        return [("projection (per-shape times, read bandwidth)", r["error"], "")]
    scaled = " (shapes / 32)" if small else ""
    rows = [(f"spectrum time by shape{scaled}", ", ".join(f"{k} {v:.0f} ms" for k, v in r["per_shape_ms"].items()), ""),
            ("read bandwidth (page cache dropped)", f"{r['read_gb_per_s']:.2f} GB/s", "")]
    for p in r["projection"]:
        rows.append((f"projected analysis, {p['model']}{'' if small else ' (measured shapes)'}, {p['gpus']} GPU(s)",
                     f"{projection.fmt(p['overlapped_s'])} = max(compute {projection.fmt(p['compute_s'])}, read "
                     f"{projection.fmt(p['read_s'])}); serial {projection.fmt(p['serial_s'])}", ""))
    return rows


def _streamed_rows(r: dict | None) -> list[tuple[str, str, str]]:
    if not r:
        return []
    if "error" in r:
        return [("streamed evaluation", r["error"], "")]
    frac = f" = {r['peak_fraction']:.2f}x the checkpoint" if r["peak_fraction"] is not None else " (process peak)"
    return [(f"streamed evaluation, {r['blocks']} blocks ({r['checkpoint_gib']:.2f} GiB on disk), "
             f"{r['windows']} windows",
             f"{r['seconds']:.1f} s, peak {r['peak_gib']:.2f} GiB{frac}; perplexity {r['perplexity']:.4g} vs "
             f"{r['in_memory_perplexity']:.4g} in memory (rel. diff {r['rel_diff']:.1e})", "< 1/3; < 1e-3")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    p.add_argument("--small", action="store_true", help="scaled-down shapes (a CPU smoke test)")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"],
                   help="the pruned block's dtype (default float16 on CUDA, float32 on the CPU)")
    p.add_argument("--sample", type=int, default=3, help="matrices compared with float64 on the CPU (default 3)")
    p.add_argument("--no-full", action="store_true", help="skip Wanda on the whole 32-block model")
    p.add_argument("--json", metavar="FILE", help="write every number (default benchmarks/results/gpu_check.json)")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible; run with --device cpu --small for the smoke test", file=sys.stderr)
        return 2
    s = SMALL if args.small else FULL
    dtype = getattr(torch, args.dtype or ("float16" if args.device.startswith("cuda") else "float32"))
    res = {"date": time.strftime("%Y-%m-%d"), "device": args.device, "small": args.small, "dtype": str(dtype)[6:],
           "torch": torch.__version__, "python": platform.python_version(), "shapes": s,
           "device_name": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda")
           else platform.processor() or "CPU"}
    def stage(key, fn, *a):
        res[key] = fn(*a)
        print(f"[{time.strftime('%H:%M:%S')}] {key}: {json.dumps(res[key], default=str)[:1500]}", flush=True)

    stage("analysis", _guard, analysis, s, args.device, args.sample)
    stage("cuda_tests", cuda_tests, args.device)
    for method in ("wanda", "sparsegpt"):
        stage(method, _guard, pruned, s, args.device, dtype, method)
    stage("per_matrix_ms", _guard, per_shape, s, args.device)
    stage("routes", _guard, routes, args.device, s["hidden"])
    if not args.no_full:
        stage("wanda_full", _guard, pruned, s, args.device, dtype, "wanda", s["blocks"])
    stage("projection", _guard, projected, args.small, args.device)
    stage("streamed_eval", _guard, streamed_eval, s, args.device, dtype, 2 if args.small else 16)
    stage("multi_device", _guard, multi_device, SMALL if args.small else MULTI, args.device)
    stage("deploy_24", _guard, bench_deploy.run, args.small, args.device)
    text = table(res)
    res["table"] = text
    out = Path(args.json or ROOT / "benchmarks" / "results" / f"gpu_check{'_small' if args.small else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1, default=str))
    print(text)
    print(f"\nwrote {out}")
    stages = ("analysis", "wanda", "sparsegpt", "routes", "wanda_full", "projection", "streamed_eval",
              "multi_device", "deploy_24")
    failed = any("error" in res.get(k, {}) for k in stages) or "FAILED" in res["cuda_tests"]["status"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
