"""Fast tuning against today's full ``tune`` on the demo: the same grid, the same held-out windows.

For each method and sparsity, ``core.tuning.tune`` (every candidate pruned block by block with
the real method and scored) and ``core.fasttune.fast_tune`` (masks from one pass of dense
statistics, the best and uniform confirmed with the full protocol) run in the same process on
the same loaded model; prints each one's time, winner and held-out perplexity, and the ratio.
The analysis is computed once before the timings (both read it from the cache). Each route
scores with its own defaults (``tune``: 16 held-out windows per candidate; fast: 8, and 16 for
the two confirmations, as ``--epsilon auto`` runs it) unless ``--windows`` sets one count for all.

Times are CPU seconds of this process (``time.process_time``) with torch on ``--threads``
threads (default 1), so that other work on a shared machine does not bias the ratio, and the
two routes alternate which runs first; the wall-clock seconds are printed beside them.

    .venv/bin/python benchmarks/bench_tune.py [--methods wanda,magnitude] [--sparsities 0.5,0.7]
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.analysis import analyze  # noqa: E402
from core.prepare import load_for  # noqa: E402
from core.fasttune import fast_tune  # noqa: E402
from core.spec import CalibrationSpec, PruneSpec  # noqa: E402
from core.tuning import tune  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="wanda,magnitude")
    p.add_argument("--sparsities", default="0.7")
    p.add_argument("--epsilons", default="0,0.1,0.2,0.3,0.4,0.5")
    p.add_argument("--xmins", default="peak,full")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--windows", type=int, help="held-out windows of every score, both routes (default: each "
                   "route's own)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: CPU seconds = work)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="also write the table to this Markdown file")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    epsilons = [float(e) for e in a.epsilons.split(",")]
    xmins = a.xmins.split(",")
    base = PruneSpec(device=a.device, calibration=CalibrationSpec(nsamples=a.nsamples, seqlen=a.seqlen))
    loaded = load_for(base)
    for x in xmins:
        analyze(loaded, xmin=x, device=a.device)
    rows = ["| method | S | full tune, CPU s (wall) | its winner | fast tune, CPU s (wall) | its choice | "
            "fast/full CPU time | same winner |", "|---|---|---|---|---|---|---|---|"]
    full_w = {} if a.windows is None else {"holdout_windows": a.windows}
    fast_w = {} if a.windows is None else {"holdout_windows": a.windows, "confirm_windows": a.windows}
    order = 0
    for method in a.methods.split(","):
        for s in (float(x) for x in a.sparsities.split(",")):
            spec = PruneSpec(method=method, sparsity=s, allocation="alpha", epsilon=0.3, device=a.device,
                             calibration=base.calibration)
            grid = dict(epsilons=epsilons, xmins=xmins, metric_columns=["alpha"], loaded=loaded)
            routes = {"full": lambda: tune(spec, **grid, **full_w), "fast": lambda: fast_tune(spec, **grid, **fast_w)}
            got, cpu, wall = {}, {}, {}
            for name in (("full", "fast") if order % 2 == 0 else ("fast", "full")):
                c, t = time.process_time(), time.perf_counter()
                got[name] = routes[name]()
                cpu[name], wall[name] = time.process_time() - c, time.perf_counter() - t
            order += 1
            full, fast = got["full"], got["fast"]
            t_full, t_fast = cpu["full"], cpu["fast"]
            fb, qb = full.best, fast.best
            uniform = float(full.table.loc[full.table.epsilon == 0, "perplexity"].iloc[0])
            full_choice = (fb["epsilon"], fb["xmin"]) if fb["perplexity"] < uniform else (0.0, "-")
            fast_choice = (qb["epsilon"], qb["xmin"] if qb["epsilon"] > 0 else "-")
            same = full_choice == fast_choice
            rows.append(f"| {method} | {s:g} | {t_full:.0f} ({wall['full']:.0f}) | eps {fb['epsilon']:g}, {fb['xmin']} "
                        f"({fb['perplexity']:.4g}; uniform {uniform:.4g}) | {t_fast:.0f} ({wall['fast']:.0f}) | eps {qb['epsilon']:g}"
                        f"{', ' + qb['xmin'] if qb['epsilon'] > 0 else ' (uniform)'} ({qb['perplexity']:.4g}) | "
                        f"{t_fast / t_full:.2f} | {'yes' if same else 'no'} |")
            print(rows[-1], flush=True)
    text = "\n".join(rows)
    print("\n" + text)
    if a.out:
        Path(a.out).write_text(f"`python benchmarks/bench_tune.py {' '.join(sys.argv[1:])}`\n\n{text}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
