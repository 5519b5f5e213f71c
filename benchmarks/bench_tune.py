"""Fast tuning against today's full ``tune`` on the demo: the same grid, the same held-out windows.

For each method and sparsity, ``core.tuning.tune`` (every candidate pruned block by block with
the real method and scored) and ``core.fasttune.fast_tune`` (masks from one pass of dense
statistics, the best and uniform confirmed with the full protocol) run in the same process on
the same loaded model; prints each one's time, winner and held-out perplexity, and the ratio.
The analysis is computed once before the timings (both read it from the cache).

    .venv/bin/python benchmarks/bench_tune.py [--methods wanda,magnitude] [--sparsities 0.5,0.7]
"""
from __future__ import annotations

import argparse
import sys
import time
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
    p.add_argument("--windows", type=int, default=8, help="held-out windows of every score (both routes)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="also write the table to this Markdown file")
    a = p.parse_args()
    epsilons = [float(e) for e in a.epsilons.split(",")]
    xmins = a.xmins.split(",")
    base = PruneSpec(device=a.device, calibration=CalibrationSpec(nsamples=a.nsamples, seqlen=a.seqlen))
    loaded = load_for(base)
    for x in xmins:
        analyze(loaded, xmin=x, device=a.device)
    rows = ["| method | S | full tune (s) | its winner | fast tune (s) | its choice | fast/full time | same winner |",
            "|---|---|---|---|---|---|---|---|"]
    for method in a.methods.split(","):
        for s in (float(x) for x in a.sparsities.split(",")):
            spec = PruneSpec(method=method, sparsity=s, allocation="alpha", epsilon=0.3, device=a.device,
                             calibration=base.calibration)
            t = time.perf_counter()
            full = tune(spec, epsilons=epsilons, xmins=xmins, metric_columns=["alpha"], holdout_windows=a.windows,
                        loaded=loaded)
            t_full = time.perf_counter() - t
            t = time.perf_counter()
            fast = fast_tune(spec, epsilons=epsilons, xmins=xmins, metric_columns=["alpha"], holdout_windows=a.windows,
                             confirm_windows=a.windows, loaded=loaded)
            t_fast = time.perf_counter() - t
            fb, qb = full.best, fast.best
            uniform = float(full.table.loc[full.table.epsilon == 0, "perplexity"].iloc[0])
            full_choice = (fb["epsilon"], fb["xmin"]) if fb["perplexity"] < uniform else (0.0, "-")
            fast_choice = (qb["epsilon"], qb["xmin"] if qb["epsilon"] > 0 else "-")
            same = full_choice == fast_choice
            rows.append(f"| {method} | {s:g} | {t_full:.0f} | eps {fb['epsilon']:g}, {fb['xmin']} "
                        f"({fb['perplexity']:.4g}; uniform {uniform:.4g}) | {t_fast:.0f} | eps {qb['epsilon']:g}"
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
