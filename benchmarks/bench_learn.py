"""Rerun time of every Learn HT-SR control (AppTest, no browser): set a new value, time `.run()`.
Each control is measured with values never seen before in the session (cache misses) and once
more with a value already seen (cache hit). Prints one line per control and the load average.

``--training``: the "watch a network learn" lesson's settings instead (core, no page): for each
setting, alpha at the start and the end, the lowest alpha, test accuracy at the end and its best,
and the seconds it took (``python benchmarks/bench_learn.py --training``)."""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("SPECTRASCOPE_HOME", tempfile.mkdtemp())

LESSONS = ["1 · Random matrix", "2 · Heavy tails", "3 · Spikes", "4 · Phases of training", "5 · alpha → sparsity",
           "6 · Watch a network learn"]
# the lesson's settings compared in the README (the page's knobs: learning rate, batch, label noise, steps)
SETTINGS = [dict(), dict(steps=300), dict(lr=0.02), dict(lr=0.5), dict(label_noise=0.5), dict(batch=4),
            dict(batch=64), dict(lr=0.3, batch=4), dict(lr=0.3, batch=64), dict(seed=1)]
# (lesson, widget kind, key, new values): each new value is a cache miss
CONTROLS = [
    (0, "slider", "l_var", [2.0, 3.1]),
    (0, "slider", "l_n", [1000, 1250]),
    (0, "slider", "l_m", [450, 300]),
    (0, "number_input", "l_seed", [7, 8]),
    (1, "slider", "l_mu", [1.2, 2.7]),
    (2, "slider", "l_spike", [2.5, 0.75]),
    (2, "slider", "l_spike_var", [2.0, 0.6]),
    (4, "slider", "l_S", [0.5, 0.8]),
    (4, "slider", "l_eps", [0.5, 0.1]),
]


def timed(at) -> float:
    start = time.perf_counter()
    at.run()
    assert not at.exception, at.exception
    return time.perf_counter() - start


def main() -> None:
    from test_app_common import new_app

    at = new_app("learn")
    rows = []
    for i, name in enumerate(LESSONS[:5]):  # switching lessons (first visit of each; 6 trains on a click)
        at.button_group(key="l_lesson").set_value(name)
        rows.append((f"lesson -> {name}", timed(at)))
    for lesson, kind, key, values in CONTROLS:
        at.button_group(key="l_lesson").set_value(LESSONS[lesson]).run()
        for v in values:
            getattr(at, kind)(key=key).set_value(v)
            rows.append((f"{key}={v} (lesson {lesson + 1})", timed(at)))
        getattr(at, kind)(key=key).set_value(values[0])
        rows.append((f"{key}={values[0]} again (lesson {lesson + 1})", timed(at)))
    at.button_group(key="l_lesson").set_value(LESSONS[3]).run()
    at.button_group(key="l_lesson").set_value(LESSONS[3])
    rows.append(("lesson 4 rerun", timed(at)))
    # the largest matrices the sliders allow: 2000 x 1000
    for lesson, key, value in ((1, "l_n", 2000), (1, "l_m", 1000), (2, "l_spike", 1.25), (0, "l_var", 0.5)):
        at.button_group(key="l_lesson").set_value(LESSONS[lesson]).run()
        at.slider(key=key).set_value(value)
        rows.append((f"{key}={value} at N=2000 (lesson {lesson + 1})", timed(at)))
    width = max(len(r[0]) for r in rows)
    for name, s in rows:
        print(f"{name:<{width}}  {s:6.3f} s")
    print(f"slowest: {max(rows, key=lambda r: r[1])}")
    print("loadavg:", Path("/proc/loadavg").read_text().strip(), "cpus:", os.cpu_count())


def training() -> None:
    from core.lesson_training import TrainingSetup, train

    print("| setting | alpha start → end (lowest) | test accuracy end (best) | seconds |")
    print("|---|---|---|---|")
    for knobs in SETTINGS:
        r = train(TrainingSetup(**knobs))
        name = ", ".join(f"{k} {v}" for k, v in knobs.items()) or "default (lr 0.1, batch 16, 1200 steps)"
        print(f"| {name} | {r.alphas[0]:.2f} → {r.alphas[-1]:.2f} ({r.alphas.min():.2f}) | "
              f"{r.accuracies[-1]:.1%} ({r.accuracies.max():.1%}) | {r.seconds:.1f} |", flush=True)
    print("loadavg:", Path("/proc/loadavg").read_text().strip(), "cpus:", os.cpu_count())


if __name__ == "__main__":
    training() if "--training" in sys.argv else main()
