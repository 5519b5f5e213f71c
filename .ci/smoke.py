"""Smoke test of the dashboard on a fresh install: open app.py, press the Home page's
"Load and analyse" button (found by its label) and check that the analysis summary appears
without an exception or an error. Run by .ci/run in a clean clone set up by the README."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parents[1]
LABEL = "Load and analyse"


def main() -> int:
    start = time.perf_counter()
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=900).run()
    if at.exception:
        print(f"smoke: opening the dashboard raised: {at.exception}")
        return 1
    buttons = [b for b in at.button if b.label == LABEL]
    if not buttons:
        print(f"smoke: no {LABEL!r} button on the first page; buttons: {[b.label for b in at.button]}")
        return 1
    buttons[0].click().run()
    problems = [f"exception: {e.value}" for e in at.exception] + [f"error: {e.value}" for e in at.error]
    metrics = {m.label: m.value for m in at.metric}
    if not problems and not (metrics.get("Matrices", "0") != "0" and "Median alpha" in metrics):
        problems.append(f"no analysis summary shown; metrics: {metrics}")
    for p in problems:
        print(f"smoke: {p}")
    print(f"smoke: {'FAILED' if problems else 'ok'} in {time.perf_counter() - start:.0f} s; summary: {metrics}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
