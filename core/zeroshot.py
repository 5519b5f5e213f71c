"""Zero-shot accuracy of an already loaded model through lm-evaluation-harness's Python API
(the optional extra ``spectrascope[zeroshot]``), recorded in the registry.

Tasks are the harness's own (their data comes from the hub when it is reachable) or local
task files: a folder (``task_dir``) of the harness's YAML task configs whose data is local,
e.g. ``dataset_path: json`` with ``dataset_kwargs: {data_files: {test: items.json}}``;
relative data paths are read from that folder. ``PAPER_TASKS`` are the seven tasks the
AlphaPruning, Wanda and OWL papers report.
"""
from __future__ import annotations

import logging
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

from .config import resolve_device
from .progress import Progress, report

if TYPE_CHECKING:   # the CLI checks task names and folders without loading these
    import pandas as pd

    from .models import LoadedModel
    from .registry import Registry

log = logging.getLogger(__name__)

PAPER_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
DEFAULT_BATCH_SIZE = 8
_INSTALL = "install the extra: pip install 'spectrascope[zeroshot]'"
_LOCAL = "give a local task folder with --task-dir (see the README, 'Zero-shot accuracy')"


@dataclass(frozen=True)
class TaskScore:
    """One task's metrics (``acc``, ``acc_norm`` where the task has it, ...) with their
    standard errors, over ``n`` documents; ``loglikelihoods[d][c]`` is the harness's
    log-likelihood of choice ``c`` of document ``d`` (multiple-choice tasks, doc order)."""

    task: str
    n: int
    metrics: dict[str, float]
    stderr: dict[str, float | None]
    loglikelihoods: tuple[tuple[float, ...], ...] = field(default=(), repr=False, compare=False)

    @property
    def acc(self) -> float | None:
        return self.metrics.get("acc")

    @property
    def acc_norm(self) -> float | None:
        return self.metrics.get("acc_norm")

    def to_dict(self) -> dict:
        return {"task": self.task, "n": self.n, **self.metrics,
                **{f"{m}_stderr": s for m, s in self.stderr.items()}}


@dataclass
class ZeroShot:
    """Scores of every task, with the harness version and the settings used."""

    tasks: list[TaskScore]
    harness_version: str
    limit: int | None
    device: str
    seconds: float
    num_fewshot: int = 0

    def task(self, name: str) -> TaskScore:
        for t in self.tasks:
            if t.task == name:
                return t
        raise KeyError(f"task {name!r} is not in this result ({', '.join(t.task for t in self.tasks)})")

    def rows(self) -> list[dict]:
        """One row per task and metric: the registry's ``zeroshot`` table."""
        return [{"task": t.task, "metric": m, "value": v, "stderr": t.stderr.get(m), "n": t.n,
                 "harness_version": self.harness_version, "limit": self.limit}
                for t in self.tasks for m, v in t.metrics.items()]

    def to_dict(self) -> dict:
        return {"harness_version": self.harness_version, "limit": self.limit, "num_fewshot": self.num_fewshot,
                "device": self.device, "seconds": self.seconds, "tasks": [t.to_dict() for t in self.tasks]}

    def summary(self) -> str:
        lines = [f"zero-shot accuracy (lm-evaluation-harness {self.harness_version}"
                 + (f", first {self.limit} documents per task" if self.limit else "") + f", {self.seconds:.1f} s)"]
        for t in self.tasks:
            parts = [f"{m} {v:.4f}" + (f" ± {t.stderr[m]:.4f}" if t.stderr.get(m) is not None else "")
                     for m, v in t.metrics.items()]
            lines.append(f"  {t.task:<16} n={t.n:<6} " + ", ".join(parts))
        return "\n".join(lines)


# --- the harness ---------------------------------------------------------------------------

def _harness():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise ImportError(f"zero-shot accuracy needs lm-evaluation-harness ({exc}); {_INSTALL}") from None
    return lm_eval, HFLM, TaskManager


def task_names(tasks: str | Sequence[str]) -> tuple[str, ...]:
    """``"boolq,rte"`` or a sequence of names as a tuple of non-empty names."""
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    out = tuple(str(n).strip() for n in names if str(n).strip())
    if not out:
        raise ValueError(f"tasks={tasks!r}: give at least one task name, e.g. {','.join(PAPER_TASKS)}")
    return out


def task_folder(task_dir: str | os.PathLike | None) -> Path | None:
    if task_dir is None:
        return None
    path = Path(task_dir).expanduser().resolve()
    if not path.is_dir():
        raise NotADirectoryError(f"task_dir={str(task_dir)!r}: no such folder; give a folder of task YAML files")
    return path


@contextmanager
def _working_dir(path: Path | None) -> Iterator[None]:
    """Run in ``path`` (so a task's relative ``data_files`` are read from its folder)."""
    if path is None:
        yield
        return
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def load_tasks(names: Sequence[str], task_dir: Path | None = None) -> tuple[object, dict]:
    """The harness's task manager and ``{name: Task}`` with each task's data loaded; one
    clear ``ValueError`` for an unknown task or data that cannot be loaded."""
    _, _, TaskManager = _harness()
    manager = None
    if task_dir is not None:   # indexing only the local folder is much faster than all built-in tasks
        manager = TaskManager(include_path=str(task_dir), include_defaults=False)
        if not set(names) <= set(manager.all_tasks):
            manager = None
    if manager is None:
        manager = TaskManager(include_path=str(task_dir) if task_dir else None)
    where = f" or in {task_dir}" if task_dir else ""
    tasks: dict = {}
    for name in names:
        if name not in manager.all_tasks:
            raise ValueError(f"task {name!r}: not a task of lm-evaluation-harness {_harness_version()}{where}; "
                             f"check the name, or {_LOCAL}")
        try:
            with _working_dir(task_dir):
                tasks.update(manager.load([name])["tasks"])
        except Exception as exc:   # the hub, datasets and the file system raise many kinds
            why = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
            raise ValueError(f"task {name}: its data could not be loaded (no network?): {why}; {_LOCAL}") from exc
    return manager, tasks


def _harness_version() -> str:
    return version("lm_eval")


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _score(name: str, results: dict, n: int, samples: list[dict] | None) -> TaskScore:
    metrics, stderr = {}, {}
    for key, value in results.items():
        metric, _, filt = key.partition(",")
        if not filt or metric.endswith("_stderr") or _number(value) is None:
            continue
        label = metric if filt == "none" else f"{metric},{filt}"
        metrics[label] = float(value)
        stderr[label] = _number(results.get(f"{metric}_stderr,{filt}"))
    lls = tuple(tuple(float(r[0][0]) for r in s["resps"]) for s in sorted(samples or [], key=lambda s: s["doc_id"]))
    return TaskScore(name, n, metrics, stderr, lls)


def zeroshot(loaded: LoadedModel, tasks: str | Sequence[str] = PAPER_TASKS, *,
             task_dir: str | os.PathLike | None = None, limit: int | None = None, device: str = "auto",
             batch_size: int = DEFAULT_BATCH_SIZE, progress: Progress = None) -> ZeroShot:
    """Zero-shot scores of ``loaded`` (as it is: dense or pruned) on ``tasks`` through
    lm-evaluation-harness, on the first ``limit`` documents of each (all when ``None``). The
    model is moved to ``device`` for the evaluation and back afterwards; the tokenizer's
    defaults decide BOS (the harness's own protocol)."""
    lm_eval, HFLM, _ = _harness()
    names = task_names(tasks)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit={limit!r}: give a whole number >= 1, or None for every document")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: give a whole number >= 1")
    if loaded.tokenizer is None:
        raise ValueError(f"model {loaded.source}: no tokenizer was loaded; zero-shot tasks need one")
    folder = task_folder(task_dir)
    report(progress, 0, 2, "zero-shot: loading tasks")
    manager, loaded_tasks = load_tasks(names, folder)
    dev = resolve_device(device)
    model = loaded.model
    home_device, was_training = next(model.parameters()).device, model.training
    model.eval().to(dev)
    report(progress, 1, 2, f"zero-shot: {', '.join(names)}")
    start = time.perf_counter()
    try:
        lm = HFLM(pretrained=model, tokenizer=loaded.tokenizer, batch_size=batch_size)
        out = lm_eval.simple_evaluate(model=lm, tasks=list(loaded_tasks.values()), task_manager=manager,
                                      num_fewshot=0, limit=limit, bootstrap_iters=1000, log_samples=True)
    finally:
        model.to(home_device).train(was_training)
    seconds = time.perf_counter() - start
    scores = [_score(name, out["results"][name], int(out["n-samples"][name]["effective"]),
                     out.get("samples", {}).get(name)) for name in loaded_tasks]
    result = ZeroShot(scores, str(out.get("lm_eval_version") or _harness_version()), limit, str(dev), seconds)
    report(progress, 2, 2, "zero-shot: done")
    log.info(result.summary())
    return result


# --- recorded runs -------------------------------------------------------------------------

def record_zeroshot(loaded: LoadedModel, registry: Registry, run_id: int, tasks: str | Sequence[str], **kwargs
                    ) -> ZeroShot:
    """``zeroshot`` (keyword arguments as there) with its rows added to run ``run_id``."""
    result = zeroshot(loaded, tasks, **kwargs)
    registry.add_zeroshot(run_id, result.rows())
    return result


def zeroshot_run(loaded: LoadedModel, tasks: str | Sequence[str] = PAPER_TASKS, *, registry: Registry | None = None,
                 device: str = "auto", **kwargs) -> tuple[int, ZeroShot]:
    """Zero-shot scores of the model as it is, recorded as an ``eval`` run."""
    from .registry import Registry

    registry = registry or Registry()
    with registry.record("eval", model=loaded.source, model_identity=loaded.identity, method="dense",
                         device=device, dtype=loaded.dtype_name) as run_id:
        result = record_zeroshot(loaded, registry, run_id, tasks, device=device, **kwargs)
    return run_id, result


def with_accuracy(table: pd.DataFrame, registry: Registry | None = None, metric: str = "acc") -> pd.DataFrame:
    """``table`` (runs, with a ``run_id`` column) plus one column ``<metric>:<task>`` per
    zero-shot task recorded for those runs (``table`` unchanged when there are none)."""
    from .registry import Registry

    registry = registry or Registry()
    rows = registry.zeroshot([int(i) for i in table["run_id"].dropna()])
    rows = rows[rows["metric"] == metric]
    if rows.empty:
        return table
    wide = rows.pivot_table(index="run_id", columns="task", values="value", aggfunc="last", sort=False)
    wide.columns = [f"{metric}:{task}" for task in wide.columns]
    return table.merge(wide, left_on="run_id", right_index=True, how="left")
