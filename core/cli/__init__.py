"""The ``spectrascope`` command line: the same engine as the dashboard, with progress bars.

``COMMANDS`` is the table of sub-commands: name -> (help, a function adding its options, a
function running it with the parsed options and a progress callback and returning the text
for stdout). Errors a user can fix (``ValueError``, ``FileNotFoundError``, an ``OSError`` naming a
path, ...) end the command with one line on stderr and exit code 2; any other error with one
line naming the log file that holds its traceback, exit code 1. SIGTERM stops a command like
Ctrl-C (the run is recorded as cancelled, temporaries are removed). ``--progress-json`` (``EPILOG``) turns
progress and errors into JSON lines for programs such as the dashboard.
"""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import transformers
from huggingface_hub.utils import disable_progress_bars
from tqdm import tqdm

from ..config import home
from ..progress import Progress, install_sigterm_handler
from .analyze import add_allocate, add_analyze, run_allocate, run_analyze
from .compare import add_compare, run_compare
from .owl import add_owl_scores, run_owl_scores
from .prune import add_eval, add_prune, add_sweep, add_tune, run_eval, run_prune, run_sweep, run_tune
from .prune import parse_epsilons as _epsilons  # noqa: F401  (kept importable for tests and scripts)
from .zeroshot import add_zeroshot, run_zeroshot
from .runs import add_clean, add_runs, run_clean, run_runs

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
        _json_line({"event": "log", "level": record.levelname, "message": " ".join(self.format(record).split())})


def _json_stderr(level: int) -> logging.Handler:
    """Make every line of stderr a JSON event: logging as ``log`` events (transformers'
    messages included) and no library progress bars. Returns the handler to remove."""
    handler = _JsonLogHandler()
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(level)
    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.enable_propagation()
    transformers.utils.logging.disable_progress_bar()
    disable_progress_bars()
    return handler


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
    level = logging.INFO if args.verbose else logging.WARNING
    handler = _json_stderr(level) if args.progress_json else None
    if handler is None:
        logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    sigterm = signal.getsignal(signal.SIGTERM)
    installed = install_sigterm_handler()
    try:
        return _run(args)
    finally:
        logging.getLogger().removeHandler(handler)   # main() may be called again in one process
        if installed:
            signal.signal(signal.SIGTERM, sigterm)


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
