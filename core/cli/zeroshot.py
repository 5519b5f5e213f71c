"""The ``zeroshot`` sub-command (zero-shot accuracy of a model through lm-evaluation-harness,
recorded as an ``eval`` run) and the ``--zeroshot`` options ``prune`` and ``sweep`` share."""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from ..checks import model_source
from .analyze import add_run_options
from ..progress import Progress
from ..zeroshot import DEFAULT_BATCH_SIZE, PAPER_TASKS, check_tasks
from .jsonout import dumps

if TYPE_CHECKING:
    from ..spec import PruneSpec


def opts_task_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task-dir", metavar="DIR", help="a folder of lm-evaluation-harness task YAML files with local "
                   "data (when the hub is not reachable; see the README)")
    p.add_argument("--trust-task-code", action="store_true", help="allow the Python code a --task-dir names "
                   "(!function hooks, HF Evaluate metric scripts); without it such a folder is refused")


def check_zeroshot(spec: PruneSpec) -> None:
    """The spec's zero-shot tasks checked before any work (``core.zeroshot.check_tasks``)."""
    e = spec.evaluation
    if e.zeroshot:
        check_tasks(e.zeroshot, e.task_dir, trust_task_code=e.trust_task_code)


def opts_zeroshot(p: argparse.ArgumentParser) -> None:
    """``--zeroshot TASKS`` of ``prune`` and ``sweep``: zero-shot accuracy of each pruned model."""
    p.add_argument("--zeroshot", metavar="TASKS", help="also measure zero-shot accuracy on these comma-separated "
                   f"lm-evaluation-harness tasks (the papers': {','.join(PAPER_TASKS)})")
    p.add_argument("--zeroshot-limit", type=int, metavar="N", help="score only the first N documents of each task")
    opts_task_dir(p)


def add_zeroshot(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="demo", help="demo (default), a Hugging Face folder, a .gguf file or a hub id")
    p.add_argument("--tasks", default=",".join(PAPER_TASKS), help="comma-separated lm-evaluation-harness tasks "
                   f"(default the papers' seven: {','.join(PAPER_TASKS)})")
    opts_task_dir(p)
    p.add_argument("--limit", type=int, metavar="N", help="score only the first N documents of each task")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                   help=f"documents per forward pass (default {DEFAULT_BATCH_SIZE})")
    add_run_options(p, "print the result as JSON")


def run_zeroshot(args: argparse.Namespace, progress: Progress) -> str:
    model_source(args.model, "--model")
    from ..registry import Registry

    registry = Registry()     # a read-only or damaged registry is refused before the model loads
    from ..config import resolve_device

    resolve_device(args.device)         # a device this machine lacks: refused before the model loads
    check_tasks(args.tasks, args.task_dir, trust_task_code=args.trust_task_code)   # (seconds: the task index)
    from ..models import load_model
    from ..zeroshot import zeroshot_run

    loaded = load_model(args.model, device="cpu", dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                        progress=progress)
    run_id, result = zeroshot_run(loaded, args.tasks, registry=registry, task_dir=args.task_dir, limit=args.limit,
                                  device=args.device, batch_size=args.batch_size,
                                  trust_task_code=args.trust_task_code, progress=progress)
    return dumps({"run_id": run_id, **result.to_dict()}) if args.json else f"run {run_id}: {result.summary()}"
