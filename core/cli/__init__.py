"""The ``spectrascope`` command line: the same engine as the dashboard, with progress bars.

``COMMANDS`` is the table of sub-commands: name -> (help, a function adding its options, a
function running it with the parsed options and a progress callback and returning the text
for stdout). Errors a user can fix (``ValueError``, ``FileNotFoundError``, an ``OSError`` naming a
path, ...) end the command with one line on stderr and exit code 2; any other error with one
line naming the log file that holds its traceback, exit code 1. SIGTERM stops a command like
Ctrl-C (the run is recorded as cancelled, temporaries are removed). ``--progress-json`` (``EPILOG``) turns
progress and errors into JSON lines for programs such as the dashboard.

Help, argument errors and the checks before any work import nothing heavy (torch, transformers,
pandas, ...): each command imports what it needs when it starts working. Everything a library
says goes through our logging, one line per message, each message once; ``--quiet`` keeps
only Spectrascope's own warnings and errors (``_output``).
"""
from __future__ import annotations

import argparse
import importlib.abc
import json
import logging
import os
import re
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

from ..config import home
from ..progress import Progress, install_interrupt_handlers, restore_handlers
from .analyze import add_allocate, add_analyze, run_allocate, run_analyze
from .compare import add_compare, run_compare
from .owl import add_owl_scores, run_owl_scores
from .prune import add_eval, add_prune, add_sweep, add_tune, run_eval, run_prune, run_sweep, run_tune
from .prune import parse_epsilons as _epsilons  # noqa: F401  (kept importable for tests and scripts)
from .zeroshot import add_zeroshot, run_zeroshot
from .runs import add_clean, add_runs, run_clean, run_runs
from .sensitivity import add_sensitivity, run_sensitivity

EPILOG = """machine-readable progress (for the dashboard and scripts):
  spectrascope --progress-json COMMAND ... writes, instead of the progress bar, one JSON
  object per line to stderr:
    {"event": "progress", "done": D, "total": T, "message": "..."}   for each progress report
    {"event": "log", "level": "WARNING", "message": "<one line>"}  for a logged message
    {"event": "error", "message": "<one line>", "exit": N}            when the command fails
  (every line of stderr is then such an object; N = 2 for an input error, 130 when interrupted, 1 for anything else). The result still
  goes to stdout as without the option (add --json to the command for JSON)."""
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, PermissionError, ImportError)


class Command(NamedTuple):
    help: str
    add: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, Progress], str]


COMMANDS: dict[str, Command] = {
    "analyze": Command("eigenvalue spectra, power-law fits and HT-SR metrics of every matrix",
                       add_analyze, run_analyze),
    "allocate": Command("layer-wise sparsity ratios (AlphaPruning) from a metrics table", add_allocate, run_allocate),
    "prune": Command("prune a model (magnitude, Wanda, SparseGPT) with uniform, AlphaPruning or OWL ratios or a "
                     "ratios file; optionally evaluate and save it", add_prune, run_prune),
    "eval": Command("perplexity of a model (WikiText-2 protocol) on the evaluation text", add_eval, run_eval),
    "sweep": Command("a grid of methods x allocations x sparsities x epsilons into one perplexity table "
                     "(CSV and Markdown)", add_sweep, run_sweep),
    "tune": Command("pick AlphaPruning's allocation (epsilon x xmin method x metric) by perplexity on held-out "
                    "calibration text (never the evaluation text)", add_tune, run_tune),
    "tune-epsilon": Command("alias of tune (the grid includes epsilon)", add_tune, run_tune),
    "zeroshot": Command("zero-shot accuracy through lm-evaluation-harness (BoolQ, ARC, ... or local task files)",
                        add_zeroshot, run_zeroshot),
    "runs": Command("list the recorded runs (status, settings, perplexity, output folder)", add_runs, run_runs),
    "clean": Command("remove the temporaries of killed runs, listing what it frees", add_clean, run_clean),
    "compare": Command("several analyses side by side: models, saved tables, pruned runs, checkpoints, adapters",
                       add_compare, run_compare),
    "sensitivity": Command("does the metric predict what matters? each block (or matrix kind) pruned alone, the rise "
                           "in held-out loss, and its Spearman correlation with alpha or any analysis column",
                           add_sensitivity, run_sensitivity),
    "owl-scores": Command("OWL's per-block outlier scores on calibration text, cached on disk", add_owl_scores,
                          run_owl_scores),
}


# --- progress ------------------------------------------------------------------------------

@contextmanager
def progress_bar() -> Iterator[Progress]:
    """A ``Progress`` callback drawing a tqdm bar on stderr, drawn on the first report (so a
    cached result prints no empty bar) and removed at the end."""
    bar = None

    def update(done: int, total: int, message: str) -> None:
        nonlocal bar
        if bar is None:
            from tqdm import tqdm

            bar = tqdm(total=total, file=sys.stderr, dynamic_ncols=True, leave=False)
        if bar.total != total:
            bar.reset(total=total)
        bar.n = done
        bar.set_description_str(message[:40], refresh=False)
        bar.refresh()

    try:
        yield update
    finally:
        if bar is not None:
            bar.close()


def _json_line(event: dict) -> None:
    sys.stderr.write(json.dumps(event) + "\n")
    sys.stderr.flush()


def progress_json(done: int, total: int, message: str) -> None:
    """A ``Progress`` callback writing ``{"event": "progress", ...}`` lines to stderr."""
    _json_line({"event": "progress", "done": int(done), "total": int(total), "message": str(message)})


class _JsonLogHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        _json_line({"event": "log", "level": record.levelname, "message": self.format(record)})


# --- what the libraries print ----------------------------------------------------------------

_COLOUR = re.compile(r"\x1b\[[0-9;]*m")


class _StderrLines(logging.Handler):
    """Log lines on stderr, written above the progress bar rather than into its line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging's own rule: a failing handler does not end the program
            self.handleError(record)


class _OneLine(logging.Formatter):
    """A message as one line without terminal colours (transformers' LOAD REPORT is a coloured table)."""

    def format(self, record: logging.LogRecord) -> str:
        return " ".join(_COLOUR.sub("", super().format(record)).split())


class _Once(logging.Filter):
    """Each message once per command (several steps may find the same damaged cache)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[str, int, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, record.getMessage())
        new = key not in self.seen
        self.seen.add(key)
        return new


def _ours_or_error(record: logging.LogRecord) -> bool:
    """--quiet: Spectrascope's warnings (they change what a result means), other libraries' errors."""
    return record.name.partition(".")[0] == __name__.partition(".")[0] or record.levelno >= logging.ERROR


def _quiet_transformers() -> None:
    """transformers' messages through our logging (not its own handler), and none of its bars."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_default_handler()
    transformers_logging.enable_propagation()
    transformers_logging.disable_progress_bar()


def _quiet_hub() -> None:
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()


def _quiet_datasets() -> None:
    """datasets' messages through our logging (its logger has a stderr handler of its own), no bars."""
    from datasets.utils import disable_progress_bars

    disable_progress_bars()
    logger = logging.getLogger("datasets")
    for own in [h for h in logger.handlers if type(h) is logging.StreamHandler]:
        logger.removeHandler(own)
    logger.propagate = True


#: Set-ups of libraries, each run once the library is imported (by the command that needs it).
LIBRARIES: dict[str, Callable[[], None]] = {"transformers": _quiet_transformers, "huggingface_hub": _quiet_hub,
                                            "datasets": _quiet_datasets}


class _OnImport(importlib.abc.MetaPathFinder):
    """Runs ``setups[name]()`` right after module ``name`` is imported: a library is set up
    when a command first loads it, and help or a refusal never loads it."""

    def __init__(self, setups: dict[str, Callable[[], None]]) -> None:
        self.setups = dict(setups)

    def find_spec(self, name, path=None, target=None):  # noqa: ANN001, ANN201 (importlib's protocol)
        if name not in self.setups:
            return None
        for finder in sys.meta_path:
            spec = None if finder is self else getattr(finder, "find_spec", lambda *a: None)(name, path, target)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                run = spec.loader.exec_module

                def exec_module(module, run=run) -> None:  # noqa: ANN001
                    run(module)
                    setup = self.setups.pop(name, None)   # find_spec alone (an availability check) is no import
                    if setup is not None:
                        setup()

                spec.loader.exec_module = exec_module
                return spec
        return None


@contextmanager
def _output(args: argparse.Namespace) -> Iterator[None]:
    """Logging to stderr for one command (JSON lines with ``--progress-json``), one line per
    message, each once; ``--quiet`` keeps our warnings and anyone's errors (a program that calls
    ``main`` with its own logging set up keeps it, as with ``logging.basicConfig``). The
    libraries in ``LIBRARIES`` are set up now if loaded, else when loaded."""
    root = logging.getLogger()
    handler = _JsonLogHandler() if args.progress_json else _StderrLines() if not root.handlers else None
    if handler is not None:
        handler.setFormatter(_OneLine(None if args.progress_json else "%(levelname)s %(name)s: %(message)s"))
        handler.addFilter(_Once())
        if getattr(args, "quiet", False):
            handler.addFilter(_ours_or_error)
        root.addHandler(handler)
    level = root.level
    root.setLevel(logging.INFO if args.verbose else logging.WARNING)
    hook = _OnImport({name: setup for name, setup in LIBRARIES.items() if name not in sys.modules})
    for name, setup in LIBRARIES.items():
        if name in sys.modules:
            setup()
    sys.meta_path.insert(0, hook)
    try:
        yield
    finally:   # main() may be called again in one process
        sys.meta_path.remove(hook)
        root.removeHandler(handler)
        root.setLevel(level)


@contextmanager
def _progress_for(args: argparse.Namespace) -> Iterator[Progress]:
    if args.progress_json:
        yield progress_json
    elif getattr(args, "quiet", False):
        yield None
    else:
        with progress_bar() as update:
            yield update


# --- main ----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spectrascope", description=__doc__.splitlines()[0], epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the engine does")
    parser.add_argument("--progress-json", action="store_true", help="progress and errors as JSON lines on stderr "
                        "instead of the progress bar (see below)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        command.add(sub.add_parser(name, help=command.help, description=command.help))
    return parser


def _fail(args: argparse.Namespace, message: str, code: int) -> int:
    message = " ".join(message.split())   # one line, whatever the exception's text
    if args.progress_json:
        _json_line({"event": "error", "message": message, "exit": code})
    else:
        print(f"spectrascope {args.command}: {'error: ' if code == 2 else ''}{message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    replaced = install_interrupt_handlers()
    try:
        with _output(args):
            return _run(args)
    finally:
        restore_handlers(replaced)


def _unexpected(args: argparse.Namespace, exc: Exception) -> int:
    """Exit 1 with one line naming the error and the file that holds its full traceback
    (``$SPECTRASCOPE_HOME/logs/<time>-<command>.log``, the temporary folder if that fails)."""
    text = "".join(traceback.format_exception(exc))
    name = f"{time.strftime('%Y%m%d-%H%M%S')}-{args.command}.log"
    try:
        (home() / "logs").mkdir(exist_ok=True)
        path = home() / "logs" / name
        path.write_text(text)
    except (OSError, ValueError):
        path = Path(tempfile.gettempdir()) / f"spectrascope-{name}"
        path.write_text(text)
    return _fail(args, f"{type(exc).__name__}: {exc} (an unexpected error; full traceback in {path})", 1)


def _run(args: argparse.Namespace) -> int:
    try:
        cancel_file = os.environ.get("SPECTRASCOPE_CANCEL_FILE")     # the dashboard's Cancel, if it came first
        if cancel_file and Path(cancel_file).exists():
            raise KeyboardInterrupt(f"cancelled before it started ({cancel_file})")
        with _progress_for(args) as progress:
            text = COMMANDS[args.command].run(args, progress)
    except USER_ERRORS as exc:
        return _fail(args, str(exc), 2)
    except KeyboardInterrupt:
        return _fail(args, "interrupted", 130)
    except OSError as exc:
        if exc.filename is None:
            return _unexpected(args, exc)
        return _fail(args, f"cannot use {exc.filename}: {exc.strerror or exc}; check the path", 2)
    except Exception as exc:
        return _unexpected(args, exc)
    if text:
        print(text)
    return 0
