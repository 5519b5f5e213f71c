"""Zero-shot accuracy of an already loaded model through lm-evaluation-harness's Python API
(the optional extra ``spectrascope[zeroshot]``), recorded in the registry.

Tasks are the harness's own (their data comes from the hub when it is reachable) or local
task files: a folder (``task_dir``) of the harness's YAML task configs whose data is local,
e.g. ``dataset_path: json`` with ``dataset_kwargs: {data_files: {test: items.json}}``;
relative data paths are read from that folder. ``PAPER_TASKS`` are the seven tasks the
AlphaPruning, Wanda and OWL papers report.

A task folder is data: ``check_task_folder`` refuses the Python it would make the harness run
(``!function`` hooks, also through ``include``, and metrics HF Evaluate would load as scripts)
unless ``trust_task_code``, and templates that reach Python internals; every template renders
in Jinja's immutable sandbox. ``check_tasks`` does all checks before any work.
"""
from __future__ import annotations

import importlib.util
import logging
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import yaml
from jinja2 import nodes
from jinja2.exceptions import TemplateError, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment

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
_TRUST = "a task folder is data: read that code, then pass --trust-task-code to run it"


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
        import lm_eval.utils
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise ImportError(f"zero-shot accuracy needs lm-evaluation-harness ({exc}); {_INSTALL}") from None
    _sandbox_templates(lm_eval.utils)
    return lm_eval, HFLM, TaskManager


def _sandbox_templates(utils: object) -> None:
    """The harness renders every task template with the module-level ``lm_eval.utils.env``
    (``apply_template``): make it Jinja's immutable sandbox, with the harness's filters."""
    env = utils.env
    if isinstance(env, ImmutableSandboxedEnvironment):
        return
    sandbox = ImmutableSandboxedEnvironment(undefined=env.undefined, keep_trailing_newline=env.keep_trailing_newline)
    for name, fn in env.filters.items():
        sandbox.filters.setdefault(name, fn)     # the harness's own (regex_replace); Jinja's stay sandboxed
    utils.env = sandbox


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


def load_tasks(names: Sequence[str], task_dir: Path | None = None, *, trust_task_code: bool = False
               ) -> tuple[object, dict]:
    """The harness's task manager and ``{name: Task}`` with each task's data loaded; one
    clear ``ValueError`` for an unknown task, a task folder's code (unless ``trust_task_code``),
    a template the sandbox stopped or data that cannot be loaded."""
    _, _, TaskManager = _harness()
    if task_dir is not None:
        check_task_folder(task_dir, trust_task_code=trust_task_code)
    manager = _task_manager(names, task_dir, TaskManager)
    tasks: dict = {}
    for name in names:
        try:
            with _working_dir(task_dir):
                tasks.update(manager.load([name])["tasks"])
        except Exception as exc:   # the hub, datasets and the file system raise many kinds
            if _template_error(exc):
                raise _template_failed(name, exc) from exc
            why = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
            raise ValueError(f"task {name}: its data could not be loaded (no network?): {why}; {_LOCAL}") from exc
    return manager, tasks


@lru_cache(maxsize=1)
def _default_manager(TaskManager: type) -> object:
    """The harness's own tasks (installed files: indexed once per process, ~10 s)."""
    return TaskManager()


def _task_manager(names: Sequence[str], task_dir: Path | None, TaskManager: type, *, build: bool = True
                  ) -> object | None:
    """A task manager that knows every name (``ValueError`` naming the first unknown one;
    ``None`` when not ``build`` and the names mix local and built-in tasks); indexing only
    the local folder is much faster than all built-in tasks."""
    local = TaskManager(include_path=str(task_dir), include_defaults=False) if task_dir is not None else None
    if local is not None and set(names) <= set(local.all_tasks):
        return local
    known = set(_default_manager(TaskManager).all_tasks) | set(local.all_tasks if local is not None else ())
    for name in names:
        if name not in known:
            where = f" or in {task_dir}" if task_dir else ""
            raise ValueError(f"task {name!r}: not a task of lm-evaluation-harness {_harness_version()}{where}; "
                             f"check the name, or {_LOCAL}")
    if task_dir is None:
        return _default_manager(TaskManager)
    return TaskManager(include_path=str(task_dir)) if build else None


def check_tasks(tasks: str | Sequence[str], task_dir: str | os.PathLike | None = None, *,
                trust_task_code: bool = False) -> tuple[str, ...]:
    """Every check of zero-shot ``tasks`` that needs no model, for a command to run before any
    work: the harness is installed, ``task_dir``'s code is trusted (or absent) and every task
    is known. Returns the task names; ``ImportError`` / ``ValueError`` in one line."""
    names = task_names(tasks)
    folder = task_folder(task_dir)
    _, _, TaskManager = _harness()
    if folder is not None:
        check_task_folder(folder, trust_task_code=trust_task_code)
    _task_manager(names, folder, TaskManager, build=False)
    return names


def _template_error(exc: BaseException | None) -> TemplateError | None:
    """The Jinja error behind ``exc`` (the harness may wrap it), if any."""
    while exc is not None and not isinstance(exc, TemplateError):
        exc = exc.__cause__ or exc.__context__
    return exc


def _template_failed(tasks: str, exc: BaseException) -> ValueError:
    err = _template_error(exc)
    why = " ".join(f"{type(err).__name__}: {err}".split())[:200]
    return ValueError(f"task {tasks}: a template could not be rendered in Jinja's sandbox ({why}); task templates "
                      "may read the document's fields, not Python internals")


# --- a task folder is data -------------------------------------------------------------------

_IGNORED_DIRS = {"__pycache__", ".ipynb_checkpoints"}    # as the harness's index
_INTERNALS = {"mro", "func_globals", "func_code", "f_globals", "f_locals", "f_builtins", "f_code", "tb_frame",
              "gi_frame", "gi_code", "cr_frame", "cr_code", "ag_frame", "ag_code"}


@dataclass(frozen=True)
class _Tag:
    """A YAML value with a tag the harness resolves as code (``!function``, ``!!python/...``)."""

    tag: str
    value: object

    def __str__(self) -> str:
        tag = self.tag.replace("tag:yaml.org,2002:", "!!")
        return f"{tag} {self.value}" if self.value not in ("", None) else tag


class _Loader(yaml.SafeLoader):
    """Plain YAML data; every tag other than YAML's own becomes a ``_Tag``."""


def _tagged(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> _Tag:
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node)
    else:
        value = loader.construct_mapping(node)
    return _Tag(node.tag, value)


_Loader.add_multi_constructor("", _tagged)


def check_task_folder(task_dir: str | os.PathLike, *, trust_task_code: bool = False) -> None:
    """Refuse (``ValueError``, one line naming the file and the hook or template) a task folder
    that would make the harness run Python: ``!function`` (or ``!!python/``) values anywhere in
    its YAML files or the files they ``include``, metrics that HF Evaluate would load as
    scripts, unless ``trust_task_code``; and templates that reach Python internals (always:
    they also render in Jinja's sandbox). The harness's own installed task files are trusted."""
    folder = Path(task_dir).expanduser().resolve()
    for path, key, what, kind in _findings(folder):
        where = f"task folder {folder}: {path.relative_to(folder) if path.is_relative_to(folder) else path}"
        if kind == "template":
            raise ValueError(f"{where}: the template of {key} reaches {what!r}, a Python internal; task templates "
                             "may read the document's fields only")
        if not trust_task_code:
            raise ValueError(f"{where}: {key}: {what} runs Python code; {_TRUST}")


def _findings(folder: Path) -> Iterator[tuple[Path, str, str, str]]:
    """``(file, key, what, kind)`` for each hook (``kind`` "code") or unsafe template of the
    folder's YAML files (as the harness indexes them) and the files they include."""
    trusted = _harness_tasks()
    todo = sorted(p for p in folder.glob("**/*.yaml") if not _IGNORED_DIRS & set(p.parts))
    seen: set[Path] = set()
    while todo:
        path = todo.pop(0).resolve()
        if path in seen or not path.is_file() or (trusted is not None and path.is_relative_to(trusted)):
            continue
        seen.add(path)
        try:
            data = yaml.load(path.read_bytes(), Loader=_Loader)  # noqa: S506 (a safe loader)
        except (yaml.YAMLError, OSError, UnicodeDecodeError):
            continue   # the harness skips a file it cannot read as well
        if not isinstance(data, dict):
            continue
        todo += [path.parent / inc for inc in _includes(data)]
        for key, what, kind in _walk(data, ""):
            yield path, key, what, kind


def _includes(value: object) -> Iterator[str]:
    """The files ``include``d anywhere in ``value`` (a task's top level or a group's inline tasks)."""
    if isinstance(value, dict):
        for k, v in value.items():
            if k == "include":
                yield from (inc for inc in (v if isinstance(v, list) else [v]) if isinstance(inc, str))
            else:
                yield from _includes(v)
    elif isinstance(value, list):
        for v in value:
            yield from _includes(v)


def _walk(value: object, key: str) -> Iterator[tuple[str, str, str]]:
    if isinstance(value, _Tag):
        if value.tag == "!function" or value.tag.startswith("tag:yaml.org,2002:python/"):
            yield key, str(value), "code"
        yield from _walk(value.value, key)
    elif isinstance(value, dict):
        for k, v in value.items():
            name = f"{key}.{k}" if key else str(k)
            if k == "metric_list" and isinstance(v, list) and "process_results" not in value:   # else unused
                yield from ((name, m, "code") for m in _script_metrics(v))
            yield from _walk(v, name)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _walk(v, f"{key}[{i}]")
    elif isinstance(value, str) and ("{{" in value or "{%" in value):
        for internal in _internals(value):
            yield key, internal, "template"


def _script_metrics(metrics: list) -> Iterator[str]:
    """Metrics the harness would hand to HF Evaluate (``hf_evaluate: true``, or a name not
    in its registry), which loads them as Python scripts (local or from the hub)."""
    known = _harness_metrics()
    for m in metrics:
        if isinstance(m, dict) and isinstance(m.get("metric"), str):
            if m.get("hf_evaluate") is True or (known is not None and m["metric"] not in known):
                yield f"metric {m['metric']!r} (HF Evaluate loads it as a Python script)"


def _internals(template: str) -> Iterator[str]:
    """Attribute and item names in ``template`` that reach Python internals (dunder names and
    frame/code attributes): the ones written in it; names computed at render time are the
    sandbox's to stop."""
    try:
        tree = _SANDBOX.parse(template)
    except TemplateSyntaxError:
        return     # not a template the harness could render either
    for node in tree.find_all((nodes.Getattr, nodes.Getitem, nodes.Filter)):
        if isinstance(node, nodes.Getattr):
            names = [node.attr]
        elif isinstance(node, nodes.Getitem):
            names = [node.arg.value] if isinstance(node.arg, nodes.Const) else []
        else:
            names = [a.value for a in node.args if isinstance(a, nodes.Const)] if node.name == "attr" else []
        for name in names:
            if isinstance(name, str) and ((name.startswith("__") and name.endswith("__")) or name in _INTERNALS):
                yield name


_SANDBOX = ImmutableSandboxedEnvironment()


def _harness_tasks() -> Path | None:
    """The installed harness's own task folder (its code is the installed package's)."""
    try:
        spec = importlib.util.find_spec("lm_eval")
    except (ImportError, ValueError):
        return None
    return Path(spec.origin).resolve().parent / "tasks" if spec is not None and spec.origin else None


def _harness_metrics() -> set[str] | None:
    """The harness's registered metric names (None without the harness)."""
    try:
        import lm_eval.api.metrics  # noqa: F401  (registers them)
        from lm_eval.api.registry import metric_registry
    except ImportError:
        return None
    return set(metric_registry.keys())


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
             batch_size: int = DEFAULT_BATCH_SIZE, trust_task_code: bool = False, progress: Progress = None
             ) -> ZeroShot:
    """Zero-shot scores of ``loaded`` (as it is: dense or pruned) on ``tasks`` through
    lm-evaluation-harness, on the first ``limit`` documents of each (all when ``None``). The
    model is moved to ``device`` for the evaluation and back afterwards; the tokenizer's
    defaults decide BOS (the harness's own protocol). Python code in ``task_dir`` runs only
    with ``trust_task_code`` (``check_task_folder``); templates render sandboxed."""
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
    manager, loaded_tasks = load_tasks(names, folder, trust_task_code=trust_task_code)
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
    except Exception as exc:
        if _template_error(exc):
            raise _template_failed(", ".join(names), exc) from exc
        raise
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
