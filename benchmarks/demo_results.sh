#!/usr/bin/env bash
# Re-measures the README's "Results on the demo model" on a fresh SPECTRASCOPE_HOME:
#   1. per method, `tune` at S = 0.7 over epsilon x xmin (peak, full), metric alpha, scored on
#      held-out calibration text (never the evaluation text);
#   2. per method, a sweep uniform / alpha (with that method's winning epsilon and xmin) / owl
#      at 50, 60 and 70%, evaluated on the first 24 windows of 256 tokens;
#   3. one Markdown table of all three (benchmarks/results/demo-results.md).
# About 45-60 minutes on 2 CPU cores.   Usage: bash benchmarks/demo_results.sh [PYTHON]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
export SPECTRASCOPE_HOME=${SPECTRASCOPE_HOME:-$(mktemp -d -t spectrascope-results.XXXXXX)}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
R=benchmarks/results
CAL=(--nsamples 16 --seqlen 256 --bos auto --seed 0)
start=$(date +%s)
for m in wanda sparsegpt magnitude; do
  t0=$(date +%s)
  $PY -m core.cli tune --method "$m" --sparsity 0.7 --epsilons 0,0.1,0.2,0.3,0.4,0.5 --xmins peak,full \
      --metrics-cols alpha "${CAL[@]}" --holdout-windows 8 --out "$R/demo-tune-$m.csv" --overwrite --json --quiet \
      > "$R/demo-tune-$m.json"
  read -r eps xmin < <($PY -c "import json,sys; b=json.load(open(sys.argv[1]))['best']; print(b['epsilon'], b['xmin'])" \
      "$R/demo-tune-$m.json")
  echo "$m: tuned in $(( $(date +%s) - t0 )) s: epsilon $eps, xmin $xmin"
  t0=$(date +%s)
  $PY -m core.cli sweep --methods "$m" --allocations uniform,alpha,owl --sparsities 0.5,0.6,0.7 \
      --epsilons "$eps" --xmin "$xmin" "${CAL[@]}" --max-windows 24 --out "$R/demo-sweep-$m" --overwrite --quiet > /dev/null
  echo "$m: swept in $(( $(date +%s) - t0 )) s"
done
$PY - "$R" "$(( $(date +%s) - start ))" <<'PY'
import json, sys
from pathlib import Path
import pandas as pd
from core.sweeps import pivot, to_markdown
r, seconds = Path(sys.argv[1]), int(sys.argv[2])
tables = [pd.read_csv(r / f"demo-sweep-{m}.csv") for m in ("magnitude", "wanda", "sparsegpt")]
keys = {k for t in tables for k in t["key"]}
dense = tables[0].iloc[:1]
both = pd.concat([dense] + [t[t.method != "dense"] for t in tables], ignore_index=True)
tuned = {m: json.loads((r / f"demo-tune-{m}.json").read_text()) for m in ("magnitude", "wanda", "sparsegpt")}
lines = [f"Re-measured by `bash benchmarks/demo_results.sh` in {seconds / 60:.1f} min.", "",
         "Comparison key(s) of the sweeps: " + "; ".join(sorted(set(both["settings"]))), "",
         "Tuning (S = 0.7, held-out calibration text): " + "; ".join(
             f"{m} epsilon {t['best']['epsilon']:g}, xmin {t['best']['xmin']} (held-out perplexity {t['best']['perplexity']:.4g})"
             for m, t in tuned.items()), "",
         f"Distinct sweep keys: {len(keys)} (one per method's calibration: magnitude uses none)", "",
         to_markdown(pivot(both)), "", "Every run:", "", to_markdown(both.drop(columns=["key", "settings"]))]
(r / "demo-results.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
