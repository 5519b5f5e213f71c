"""The command line answers help and refusals at once, and --quiet is quiet (issue 18, parts 7-8).

Help, argument errors and the checks done before any work must not import torch, transformers,
pandas, ... (they took about 3 s): each case runs `python -X importtime -m core.cli ...` in a
fresh process and lists the packages it imported. With --quiet, transformers' progress bars and
its LOAD REPORT table (printed for a checkpoint with an extra tensor) stay off stderr; without
it they come through our logging, one line per message; a damaged analysis cache is reported once.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_model
from core.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]

#: Packages the argument-parsing path must not import (each costs from 0.1 to 1 s).
HEAVY = {"torch", "transformers", "pandas", "numpy", "scipy", "streamlit", "ray", "lm_eval", "safetensors",
         "pyarrow", "plotly", "gguf", "tokenizers", "accelerate", "datasets", "powerlaw", "huggingface_hub"}


def spectrascope(*args: str, home: Path, importtime: bool = False) -> subprocess.CompletedProcess:
    """``python -m core.cli ARGS`` in a fresh process with this worktree and ``home``."""
    env = {**os.environ, "SPECTRASCOPE_HOME": str(home), "HF_HUB_OFFLINE": "1", "COLUMNS": "250",
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    flags = ["-X", "importtime"] if importtime else []
    return subprocess.run([sys.executable, *flags, "-m", "core.cli", *args], env=env, text=True,
                          capture_output=True, timeout=600)


def imported_and_stderr(*args: str, home: Path) -> tuple[subprocess.CompletedProcess, set[str], list[str]]:
    """The finished process, the heavy packages it imported and its stderr without the import times."""
    done = spectrascope(*args, home=home, importtime=True)
    lines = done.stderr.splitlines()
    modules = {line.rsplit("|", 1)[1].strip().split(".")[0] for line in lines if line.startswith("import time:")}
    return done, modules & HEAVY, [line for line in lines if not line.startswith("import time:")]


# --- part 8: help and refusals import nothing heavy ---------------------------------------------

@pytest.mark.parametrize("argv", [["--help"], *([name, "--help"] for name in COMMANDS)],
                         ids=lambda argv: " ".join(argv))
def test_help_imports_nothing_heavy(tmp_path, argv):
    done, heavy, _ = imported_and_stderr(*argv, home=tmp_path)
    assert done.returncode == 0 and "usage: spectrascope" in done.stdout
    assert not heavy, f"`spectrascope {' '.join(argv)}` imported {sorted(heavy)}"


ARGPARSE_ERRORS = {
    "no command": [],
    "unknown command": ["prunee"],
    "prune unknown method": ["prune", "--method", "bogus"],
    "analyze unknown xmin": ["analyze", "--xmin", "bogus"],
    "runs unknown status": ["runs", "--status", "bogus"],
    "allocate without sparsity": ["allocate", "--profile", "llama-7b-hf"],
    "zeroshot unknown dtype": ["zeroshot", "--dtype", "int3"],
}


@pytest.mark.parametrize("argv", ARGPARSE_ERRORS.values(), ids=ARGPARSE_ERRORS.keys())
def test_argument_errors_import_nothing_heavy(tmp_path, argv):
    done, heavy, err = imported_and_stderr(*argv, home=tmp_path)
    assert done.returncode == 2 and err[-1].startswith("spectrascope") and "error:" in err[-1]
    assert not heavy, f"`spectrascope {' '.join(argv)}` imported {sorted(heavy)}"


CHECKS = {   # refused by the checks every command does before loading anything: (argv, word the line names)
    "prune sparsity": (["prune", "--method", "wanda", "--sparsity", "1.5"], "sparsity"),
    "prune nm": (["prune", "--method", "magnitude", "--nm", "4:2"], "nm"),
    "prune device": (["prune", "--method", "wanda", "--device", "gpu7"], "device"),
    "prune missing ratios": (["prune", "--method", "wanda", "--ratios", "no-such.csv"], "no-such.csv"),
    "analyze empty model": (["analyze", "--model", " "], "empty"),
    "zeroshot empty model": (["zeroshot", "--model", ""], "empty"),
    "runs last 0": (["runs", "--last", "0"], "--last"),
    "allocate missing metrics": (["allocate", "--metrics", "no-such.csv", "--sparsity", "0.5"], "no-such.csv"),
    "sweep second method": (["sweep", "--methods", "wanda,bogus"], "bogus"),
    "sweep allocation": (["sweep", "--methods", "wanda", "--allocations", "uniform,file"], "file"),
    "prune task dir": (["prune", "--method", "wanda", "--zeroshot", "arc_easy", "--task-dir", "no-such-dir"],
                       "no-such-dir"),
    "prune task dir alone": (["prune", "--method", "wanda", "--task-dir", "no-such-dir"], "--task-dir"),
    "eval max windows": (["eval", "--max-windows", "0"], "max_windows"),
    "eval seqlen": (["eval", "--seqlen", "1"], "seqlen"),
    "sweep sparsities": (["sweep", "--sparsities", "0.5,1.5"], "--sparsities"),
    "sweep epsilons": (["sweep", "--epsilons", "bogus=0.3"], "--epsilons"),
    "tune epsilons": (["tune", "--epsilons", "x"], "--epsilons"),
    "tune sparsity": (["tune", "--sparsity", "2"], "sparsity"),
    "owl-scores nsamples": (["owl-scores", "--nsamples", "0"], "nsamples"),
    "owl-scores m": (["owl-scores", "--m", "0"], "--m"),
}


@pytest.mark.parametrize("argv, names", CHECKS.values(), ids=CHECKS.keys())
def test_refusals_before_work_import_nothing_heavy(tmp_path, argv, names):
    done, heavy, err = imported_and_stderr(*argv, home=tmp_path)
    assert done.returncode == 2 and len(err) == 1 and names in err[0], err
    assert not heavy, f"`spectrascope {' '.join(argv)}` imported {sorted(heavy)} before refusing"
    assert not (tmp_path / "runs.sqlite").exists()     # nothing recorded


def test_help_answers_at_once(tmp_path):
    """Wall time of `spectrascope --help` (about 3 s when it imported torch): under a second even on
    a busy machine (about 0.1 s on an idle one)."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        assert spectrascope("--help", home=tmp_path).returncode == 0
        best = min(best, time.perf_counter() - start)
    assert best < 1.0, f"spectrascope --help took {best:.2f} s"


# --- part 7: --quiet is quiet ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def extra_tensor_model(tmp_path_factory) -> Path:
    """A tiny LLaMA folder whose checkpoint holds one tensor the architecture does not have
    (transformers prints its LOAD REPORT table and a "Loading weights" bar for it)."""
    folder = tmp_path_factory.mktemp("extra-tensor")
    tiny_model("llama").save_pretrained(folder, safe_serialization=True)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.extra_unexpected.weight"] = torch.zeros(4, 4)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def _noise(stderr: str) -> list[str]:
    """Lines of transformers' own output: its report table, its bars, its '[transformers]' prefix
    (a progress bar redraws its line after a carriage return)."""
    return [line for line in re.split(r"[\r\n]", stderr)
            if line.startswith(("[transformers]", "Key ", "---", "Notes:", "- UNEXPECTED"))
            or "Loading weights" in line or "LOAD REPORT" in line and not line.startswith("WARNING")]


QUIET = {   # the commands that load a model, each with --quiet
    "analyze": ["analyze", "--device", "cpu", "--no-cache"],
    "prune": ["prune", "--method", "magnitude", "--sparsity", "0.5", "--device", "cpu"],
    "compare": ["compare", "--device", "cpu"],
}


@pytest.mark.parametrize("command", QUIET.values(), ids=QUIET.keys())
def test_quiet_prints_nothing_of_transformers(tmp_path, extra_tensor_model, command):
    source = [str(extra_tensor_model)] * 2 if command[0] == "compare" else ["--model", str(extra_tensor_model)]
    done = spectrascope(*command, *source, "--quiet", home=tmp_path)
    assert done.returncode == 0, done.stderr
    # nothing but our own warnings (one line each, e.g. the checkpoint's extra tensor): no bars, no tables
    assert all(line.startswith("WARNING core.") for line in done.stderr.splitlines()), done.stderr


def test_without_quiet_transformers_speaks_through_our_logging(tmp_path, extra_tensor_model):
    done = spectrascope("analyze", "--model", str(extra_tensor_model), "--device", "cpu", home=tmp_path)
    assert done.returncode == 0, done.stderr
    assert not _noise(done.stderr), done.stderr
    assert "\x1b[" not in done.stderr                     # no terminal colour codes in a log line
    # our summary still goes to stdout
    assert "alpha" in done.stdout


@pytest.mark.parametrize("quiet", [[], ["--quiet"]], ids=["default", "quiet"])
def test_damaged_analysis_cache_is_reported_once(tmp_path, extra_tensor_model, quiet):
    home = tmp_path / "home"
    assert spectrascope("analyze", "--model", str(extra_tensor_model), "--device", "cpu", "--quiet",
                        home=home).returncode == 0
    (eigs,) = (home / "analyses").glob("*/eigs.npz")
    eigs.write_bytes(eigs.read_bytes()[:100])           # truncated: a damaged cache entry
    done = spectrascope("analyze", "--model", str(extra_tensor_model), "--device", "cpu", *quiet, home=home)
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if "damaged analysis cache" in line]
    assert len(warnings) == 1 and str(eigs.parent) in warnings[0], done.stderr
