#!/usr/bin/env bash
# Issue 20's check on the demo: `--allocation alpha` with its defaults (epsilon auto: fast tuning
# on held-out calibration text per method and sparsity) against uniform at 50, 60 and 70% for
# magnitude, Wanda and SparseGPT, evaluated on the first 24 windows of 256 tokens (the README's
# results settings: calibration 16 x 256, seed 0), plus the calibration-seed noise of uniform
# (seed 1) for Wanda and SparseGPT. Writes benchmarks/results/demo-auto.md.
# Usage: bash benchmarks/demo_auto.sh [PYTHON]       (about 45-60 minutes on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
export SPECTRASCOPE_HOME=${SPECTRASCOPE_HOME:-$(mktemp -d -t spectrascope-auto.XXXXXX)}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
R=benchmarks/results
CAL=(--nsamples 16 --seqlen 256 --bos auto --seed 0)
start=$(date +%s)
for m in magnitude wanda sparsegpt; do
  t0=$(date +%s)
  $PY -m core.cli sweep --methods "$m" --allocations uniform,alpha --sparsities 0.5,0.6,0.7 "${CAL[@]}" \
      --max-windows 24 --out "$R/demo-auto-$m" --overwrite --quiet > /dev/null
  echo "$m: swept in $(( $(date +%s) - t0 )) s"
done
for m in wanda sparsegpt; do
  $PY -m core.cli sweep --methods "$m" --allocations uniform --sparsities 0.5,0.7 --nsamples 16 --seqlen 256 \
      --bos auto --seed 1 --max-windows 24 --out "$R/demo-auto-seed1-$m" --overwrite --quiet > /dev/null
done
$PY - "$R" "$(( $(date +%s) - start ))" "$SPECTRASCOPE_HOME" <<'PY'
import json, sys
from pathlib import Path
import pandas as pd
from core.markdown import to_markdown
from core.registry import Registry
from core.sweeps import pivot
r, seconds, home = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
tables = {m: pd.read_csv(r / f"demo-auto-{m}.csv") for m in ("magnitude", "wanda", "sparsegpt")}
reg = Registry(home / "runs.sqlite")
rows = []
for m, t in tables.items():
    for s in (0.5, 0.6, 0.7):
        u = t[(t.allocation == "uniform") & (t.sparsity == s)].iloc[0]
        a = t[(t.allocation == "alpha") & (t.sparsity == s)].iloc[0]
        tuning = reg.get(int(a.run_id))["allocation_params"].get("tuning", {})
        rows.append({"method": m, "S": s, "uniform": u.perplexity, "alpha (auto)": a.perplexity,
                     "auto vs uniform %": 100 * (a.perplexity / u.perplexity - 1), "epsilon chosen": a.epsilon,
                     "xmin": tuning.get("xmin"), "tuning s": tuning.get("seconds"), "why": tuning.get("reason")})
table = pd.DataFrame(rows)
noise = []
for m in ("wanda", "sparsegpt"):
    t1 = pd.read_csv(r / f"demo-auto-seed1-{m}.csv")
    for s in (0.5, 0.7):
        a = tables[m][(tables[m].allocation == "uniform") & (tables[m].sparsity == s)].perplexity.iloc[0]
        b = t1[(t1.allocation == "uniform") & (t1.sparsity == s)].perplexity.iloc[0]
        noise.append({"method": m, "S": s, "uniform seed 0": a, "uniform seed 1": b, "difference %": 100 * (b / a - 1)})
dense = tables["magnitude"].iloc[0].perplexity
lines = [f"Re-measured by `bash benchmarks/demo_auto.sh` in {seconds / 60:.1f} min; dense perplexity {dense:.2f}.", "",
         "`--allocation alpha` with its defaults (epsilon auto) against uniform, evaluation text 24 x 256:", "",
         to_markdown(table.drop(columns=["why"])), "", "Why each choice:", ""]
lines += [f"- {r_['method']} S={r_['S']:g}: {r_['why']}" for r_ in rows]
lines += ["", "Noise: uniform with calibration seed 1 against seed 0:", "", to_markdown(pd.DataFrame(noise))]
(r / "demo-auto.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
