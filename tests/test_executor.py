"""Issue 19, one home for where work runs (``core.executor``): one ``map()`` over this thread,
several devices and Ray, each slot with its device resolved once; analysis, sweep and tune take
an executor, and give the same tables column for column whichever it is; each device reads its
own tensors and keeps what finished; Ray actors load the model once; sweeps stream with
--devices/--ray; the module graph has no cycle."""
from __future__ import annotations

import ast
import os
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import byte_tokenizer, tiny_model
from core.cli import main as cli
from test_trust_results import text_file  # noqa: F401  (the river text as a file: a fixture)

ROOT = Path(__file__).resolve().parents[1]




@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "model"
    tiny_model("llama", seed=2).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def _base(tiny, text_file, **changes):
    from core.spec import CalibrationSpec, EvaluationSpec, PruneSpec

    return PruneSpec(model=str(tiny), device="cpu", calibration=CalibrationSpec(dataset=str(text_file), nsamples=2,
                     seqlen=32), evaluation=EvaluationSpec(dataset=str(text_file), seqlen=32, max_windows=2),
                     **changes)


GRID = dict(methods=["magnitude", "wanda"], allocations=["uniform", "alpha"], sparsities=[0.5])
TIMING = ["prune_seconds", "eval_seconds", "run_id"]


# --- map -----------------------------------------------------------------------------------------

def _work(item, device):
    if item == 3:
        raise RuntimeError("item 3 broke")
    time.sleep(0.01)
    return item * 10, device, threading.current_thread().name


@pytest.mark.parametrize("kind", ["local", "devices"])
def test_map_gives_every_index_once_with_exceptions_as_results_and_resolved_devices(kind):
    from core.executor import Devices, Local

    executor = Local("auto") if kind == "local" else Devices(["cpu", "cpu", "cpu"])
    got = list(executor.map(_work, (i for i in range(9))))          # a generator: read as slots free
    out = dict(got)
    assert sorted(out) == list(range(9)) and len(got) == 9
    assert isinstance(out[3], RuntimeError) and str(out[3]) == "item 3 broke"
    assert all(out[i][0] == i * 10 for i in out if i != 3)
    assert {out[i][1] for i in out if i != 3} == {str(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
                                                  if kind == "local" else "cpu"}
    if kind == "local":
        assert [i for i, _ in got] == list(range(9))                 # in order, in this thread
        assert {out[i][2] for i in out if i != 3} == {threading.current_thread().name}
    else:
        assert len({out[i][2] for i in out if i != 3}) >= 2          # the devices shared the work


def test_each_slot_resolves_its_device_once(monkeypatch):
    import core.executor as ex

    calls: list[str] = []
    real = ex.resolve_device
    monkeypatch.setattr(ex, "resolve_device", lambda d: calls.append(d) or real(d))
    executor = ex.Devices(["cpu", "cpu"])
    seen = {r[1] for _, r in executor.map(lambda item, device: (item, device), range(20))}
    assert calls == ["cpu", "cpu"] and seen == {"cpu"}


def test_several_devices_take_one_item_at_a_time_each_and_a_cancel_stops_them():
    from core.executor import Devices
    from core.progress import Cancelled

    busy: dict[int, int] = {}
    worst: dict[int, int] = {}
    lock = threading.Lock()
    flag = threading.Event()
    started: list[int] = []

    def fn(item, device):
        me = threading.get_ident()
        with lock:
            started.append(item)
            busy[me] = busy.get(me, 0) + 1
            worst[me] = max(worst.get(me, 0), busy[me])
        time.sleep(0.05)
        with lock:
            busy[me] -= 1
        return item

    executor = Devices(["cpu", "cpu"])
    with pytest.raises(Cancelled):
        for i, _ in executor.map(fn, range(100), cancel=flag):
            if i >= 3:
                flag.set()
    assert set(worst.values()) == {1}
    assert len(started) < 20                            # the devices stopped after their current item


# --- the spectra: each device reads its own tensors and keeps what finished ---------------------

def test_each_device_reads_its_own_tensors_and_reports_matrix_progress():
    from core.analysis import Weights, analyze_weights
    from core.executor import Devices, Local
    from core.models import MatrixInfo

    torch.manual_seed(0)
    infos = [MatrixInfo(f"m{i}", i, "x", 32, 16) for i in range(12)]
    weights = {i.name: torch.randn(i.rows, i.cols) for i in infos}
    readers: set[str] = set()

    def read(name):
        readers.add(threading.current_thread().name)
        return weights[name]

    seen: list[tuple[int, int]] = []
    got = analyze_weights(Weights(infos, "fake", "fake:devices", read=read), store=False, device="cpu",
                          executor=Devices(["cpu", "cpu"]), progress=lambda d, t, _: seen.append((d, t)))
    want = analyze_weights(Weights(infos, "fake", "fake:one", ((i, weights[i.name]) for i in infos)), store=False,
                           executor=Local("cpu"))
    pd.testing.assert_frame_equal(got.table, want.table)
    assert len(readers) == 2 and threading.current_thread().name not in readers
    counts = [d for d, t in seen if t == 12]
    assert counts[-1] == 12 and len(set(counts)) > 3                  # matrix by matrix, not only at the end


def test_a_failed_device_keeps_the_finished_spectra_and_a_rerun_computes_only_the_rest():
    from core.analysis import Weights, spectra_on
    from core.executor import Devices
    from core.models import MatrixInfo

    torch.manual_seed(1)
    infos = [MatrixInfo(f"m{i}", i, "x", 24, 16) for i in range(8)]
    weights = {i.name: torch.randn(i.rows, i.cols) for i in infos}
    reads: list[str] = []
    broken = {"m7"}

    def read(name):
        if name in broken:
            raise OSError(f"{name}: the disk failed")
        reads.append(name)
        return weights[name]

    executor = Devices(["cpu", "cpu"])
    identity = f"fake:kept-{os.getpid()}"
    with pytest.raises(OSError, match="m7"):
        spectra_on(executor, Weights(infos, "fake", identity, read=read), keep=True)
    broken.clear()
    reads.clear()
    got = spectra_on(executor, Weights(infos, "fake", identity, read=read), keep=True)
    assert [s.info.name for s in got] == [i.name for i in infos]
    assert 0 < len(reads) < len(infos)                                 # the finished group was not read again


# --- the same tables on one device and on several ------------------------------------------------

def test_analysis_and_sweep_tables_equal_on_one_device_and_on_two(tiny, text_file, tmp_path):
    from core.analysis import analyze
    from core.executor import Devices
    from core.registry import Registry
    from core.sweeps import sweep

    one = analyze(tiny, device="cpu", use_cache=False)
    two = analyze(tiny, device="cpu", use_cache=False, executor=Devices(["cpu", "cpu"]))
    pd.testing.assert_frame_equal(two.table, one.table)
    base = _base(tiny, text_file)
    a = sweep(base, registry=Registry(tmp_path / "a.sqlite"), **GRID)
    b = sweep(base, registry=Registry(tmp_path / "b.sqlite"), executor=Devices(["cpu", "cpu"]), **GRID)
    assert list(b.columns) == list(a.columns) and (b.dtypes == a.dtypes).all()
    pd.testing.assert_frame_equal(b.drop(columns=TIMING), a.drop(columns=TIMING))


def test_tune_on_two_devices_equals_one_thread(tiny, text_file):
    from core.executor import Devices
    from core.tuning import tune

    from core.spec import EvaluationSpec

    base = _base(tiny, text_file, method="wanda", sparsity=0.6, allocation="alpha")
    base = replace(base, evaluation=EvaluationSpec(dataset="wiki"))    # never the calibration file
    grid = dict(epsilons=[0.0, 0.4], xmins=["peak", "mid"], metric_columns=["alpha"], holdout_windows=2)
    one = tune(base, **grid)
    two = tune(base, executor=Devices(["cpu", "cpu"]), **grid)
    pd.testing.assert_frame_equal(two.table, one.table)
    assert two.best == one.best


def test_a_streamed_sweep_on_devices_runs_and_equals_the_in_memory_sweep(tiny, text_file, tmp_path):
    common = ["sweep", "--model", str(tiny), "--device", "cpu", "--methods", "magnitude", "--allocations",
              "uniform", "--sparsities", "0.5", "--calib", str(text_file), "--nsamples", "2", "--seqlen", "32",
              "--dataset", str(text_file), "--max-windows", "2", "--quiet"]
    assert cli([*common, "--out", str(tmp_path / "mem")]) == 0
    assert cli([*common, "--streaming", "--devices", "cpu", "--out", str(tmp_path / "stream")]) == 0
    mem, stream = pd.read_csv(tmp_path / "mem.csv"), pd.read_csv(tmp_path / "stream.csv")
    np.testing.assert_allclose(stream["perplexity"], mem["perplexity"], rtol=1e-4)
    from core.executor import Devices
    from core.registry import Registry
    from core.sweeps import sweep

    grid = dict(methods=["magnitude", "wanda"], allocations=["uniform"], sparsities=[0.5, 0.6])
    one = sweep(_base(tiny, text_file), registry=Registry(tmp_path / "a.sqlite"), **grid)
    two = sweep(_base(tiny, text_file, streaming=True), registry=Registry(tmp_path / "b.sqlite"),
                executor=Devices(["cpu", "cpu"]), **grid)     # each device thread streams into its own skeleton
    np.testing.assert_allclose(two["perplexity"], one["perplexity"], rtol=1e-4)
    pd.testing.assert_frame_equal(two[["method", "sparsity", "achieved"]], one[["method", "sparsity", "achieved"]])


# --- the module graph -------------------------------------------------------------------------

#: Lazy back-imports older than issue 19, outside the executor's part; named so no new one slips in.
KNOWN_CYCLES: list = []   # none: the graph is a hierarchy


def _imports() -> dict[str, set[str]]:
    """core's module graph: every import, top-level or inside a function."""
    core = ROOT / "core"
    mods = {".".join(("core",) + p.relative_to(core).with_suffix("").parts).removesuffix(".__init__"): p
            for p in core.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        out: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                target = (base + (f".{node.module}" if node.module else "")) if node.level else node.module or ""
                names = [target, *(f"{target}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            out |= {n for n in names if n in mods and n != name}
        graph[name] = out
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_module_graph_has_no_new_cycle_and_ray_joining_knows_no_work():
    graph = _imports()
    assert sorted(_cycles(graph)) == sorted(KNOWN_CYCLES)
    assert not graph["core.cluster"] & {"core.analysis", "core.sweeps", "core.experiments", "core.executor"}
    assert not graph["core.executor"] & {"core.analysis", "core.sweeps", "core.experiments"}


# --- Ray: the same tables, actors that load the model once, streamed runs -------------------------

@pytest.mark.slow
def test_on_ray_the_tables_equal_one_thread_actors_load_the_model_once_and_runs_stream(tiny, text_file, tmp_path):
    ray = pytest.importorskip("ray")
    from core.analysis import analyze
    from core.executor import OnRay
    from core.registry import Registry
    from core.sweeps import sweep

    loads = tmp_path / "loads.txt"

    def count_loads():                    # in every Ray worker: note each model load by its process
        import core.prepare as prepare

        real = prepare.load_for

        def counted(spec, progress=None):
            with open(loads, "a") as f:
                f.write(f"{os.getpid()} {spec.streaming}\n")
            return real(spec, progress)
        prepare.load_for = counted

    base = _base(tiny, text_file)
    one_table = analyze(tiny, device="cpu", use_cache=False).table
    one = sweep(base, registry=Registry(tmp_path / "a.sqlite"), **GRID)
    streamed = _base(tiny, text_file, streaming=True)
    grid = dict(methods=["magnitude"], allocations=["uniform"], sparsities=[0.5, 0.6])
    one_streamed = sweep(streamed, registry=Registry(tmp_path / "c.sqlite"), **grid)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": count_loads,
                          "env_vars": {"PYTHONPATH": str(ROOT)}})      # the workers import this checkout's core
    try:
        executor = OnRay(True, "cpu")
        assert executor.slots == ["cpu", "cpu"]
        on_ray = analyze(tiny, device="cpu", use_cache=False, executor=executor)
        got = sweep(base, registry=Registry(tmp_path / "b.sqlite"), executor=executor, **GRID)
        pids = [line.split()[0] for line in loads.read_text().splitlines()]
        got_streamed = sweep(streamed, registry=Registry(tmp_path / "d.sqlite"), executor=executor, **grid)
        streamed_loads = loads.read_text().splitlines()[len(pids):]
    finally:
        ray.shutdown()
    pd.testing.assert_frame_equal(on_ray.table, one_table)
    assert list(got.columns) == list(one.columns) and (got.dtypes == one.dtypes).all()
    pd.testing.assert_frame_equal(got.drop(columns=TIMING), one.drop(columns=TIMING))
    assert 1 <= len(pids) == len(set(pids)) <= 2, pids                 # one load per actor for 7 runs
    pd.testing.assert_frame_equal(got_streamed.drop(columns=TIMING), one_streamed.drop(columns=TIMING))
    assert streamed_loads and all(line.endswith("True") for line in streamed_loads)   # skeletons: runs stream
