"""The trust fixes tried again as a user who errs: siblings of issue 18's examples through other
commands and routes. Each case failed before its fix.

Refusals use a DAMAGED checkpoint (a tiny llama without its first q_proj) where the point is
that a mistake is caught before the model loads: loading would refuse naming the missing
tensor, so a line naming the user's mistake instead shows the check came first.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from conftest import byte_tokenizer, refused, tiny_model
from core.cli import main as cli

Q0 = "model.layers.0.self_attn.q_proj.weight"




@pytest.fixture(scope="module")
def damaged(tmp_path_factory) -> Path:
    """A tiny llama folder (with a tokenizer) whose checkpoint lacks ``Q0``."""
    folder = tmp_path_factory.mktemp("damaged") / "m"
    tiny_model("llama", seed=1).save_pretrained(folder, safe_serialization=True)
    byte_tokenizer().save_pretrained(folder)
    file = folder / "model.safetensors"
    tensors = load_file(str(file))
    save_file({k: t for k, t in tensors.items() if k != Q0}, str(file), metadata={"format": "pt"})
    return folder


def runs_count() -> int:
    import io
    import contextlib

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli(["runs", "--json"]) == 0
    text = buf.getvalue().strip()
    return len(json.loads(text)) if text else 0


# --- 5. --save onto a link ------------------------------------------------------------------

def test_save_onto_a_dangling_link_is_refused(tmp_path, capsys, damaged):
    """A dangling symbolic link as --save was followed: the model was written at the link's target."""
    link, target = tmp_path / "out", tmp_path / "elsewhere"
    link.symlink_to(target)
    before = runs_count()
    refused(capsys, ["prune", "--model", str(damaged), "--device", "cpu", "--quiet", "--method", "magnitude",
                     "--save", str(link)], str(link), "link")
    assert link.is_symlink() and not target.exists()
    assert runs_count() == before


# --- 5. a device this machine lacks, before the model loads ---------------------------------

def _no_cuda() -> bool:
    import torch

    return not torch.cuda.is_available()


DEVICE_COMMANDS = {
    "prune": ["prune", "--method", "magnitude"],
    "eval": ["eval", "--max-windows", "1", "--seqlen", "16"],
    "owl-scores": ["owl-scores", "--nsamples", "1", "--seqlen", "16"],
    "zeroshot": ["zeroshot", "--tasks", "boolq", "--limit", "1"],
}


@pytest.mark.skipif(not _no_cuda(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", list(DEVICE_COMMANDS))
def test_a_missing_cuda_is_refused_before_the_model_loads(capsys, damaged, command):
    argv = DEVICE_COMMANDS[command] + ["--model", str(damaged), "--device", "cuda", "--quiet"]
    line = refused(capsys, argv, "cuda")
    assert Q0 not in line          # the device is refused before the (damaged) model is read


# --- 5. calibration and evaluation texts, before the model loads -----------------------------

def _texts(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "empty.txt").write_text("  \n\n")
    (tmp_path / "folder").mkdir()
    return {"missing": tmp_path / "missing.txt", "empty": tmp_path / "empty.txt", "folder": tmp_path / "folder"}


@pytest.mark.parametrize("text", ["missing", "empty", "folder"])
@pytest.mark.parametrize("command", ["prune-wanda", "prune-owl", "owl-scores", "eval", "prune-eval"])
def test_a_bad_text_is_refused_before_the_model_loads(tmp_path, capsys, damaged, command, text):
    path = _texts(tmp_path)[text]
    argv = {"prune-wanda": ["prune", "--method", "wanda", "--calib", str(path)],
            "prune-owl": ["prune", "--method", "magnitude", "--allocation", "owl", "--calib", str(path)],
            "owl-scores": ["owl-scores", "--calib", str(path)],
            "eval": ["eval", "--dataset", str(path)],
            "prune-eval": ["prune", "--method", "magnitude", "--eval", "--dataset", str(path)]}[command]
    before = runs_count()
    line = refused(capsys, argv + ["--model", str(damaged), "--device", "cpu", "--quiet"], str(path))
    assert Q0 not in line
    assert runs_count() == before


# --- 4. --json is JSON ----------------------------------------------------------------------

def _strict(text: str):
    """``text`` parsed as strict JSON (NaN and Infinity are not JSON)."""
    def reject(token):
        raise ValueError(f"{token} is not JSON")
    return json.loads(text, parse_constant=reject)


def test_compare_json_with_a_failed_fit_is_strict_json(tmp_path, capsys):
    """A table whose q matrices all have NaN alpha (failed fits) made `compare --json` print NaN."""
    import pandas as pd

    names = [f"model.layers.{b}.self_attn.{k}_proj" for b in range(2) for k in "qkv"]
    good = pd.DataFrame({"name": names, "block": [0] * 3 + [1] * 3, "kind": list("qkv") * 2,
                         "alpha": [3.0, 4.0, 5.0, 3.5, 4.5, 5.5], "status": ["ok"] * 6})
    bad = good.assign(alpha=[math.nan if k == "q" else a for k, a in zip(good["kind"], good["alpha"])])
    good.to_csv(tmp_path / "good.csv", index=False)
    bad.to_csv(tmp_path / "bad.csv", index=False)
    capsys.readouterr()
    assert cli(["compare", str(tmp_path / "bad.csv"), str(tmp_path / "good.csv"), "--json"]) == 0
    data = _strict(capsys.readouterr().out)
    q = [r for r in data["by_kind"] if r["source"] == "bad" and r["kind"] == "q"]
    assert q and q[0]["mean"] is None


def test_runs_json_is_strict_json():
    """`runs --json` of a registry holding a non-finite number in a run's settings."""
    import io
    import contextlib
    from core.registry import Registry

    registry = Registry()
    with registry.record("eval", model="x", model_identity="x", method="dense", device="cpu",
                         dtype="float32", allocation_params={"score": math.inf}) as run_id:
        registry.update(run_id, perplexity=math.nan)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli(["runs", "--json"]) == 0
    rows = _strict(buf.getvalue())
    assert any(r.get("id", r.get("run_id")) == run_id for r in rows)


# --- 1. a .safetensors file is the file read ------------------------------------------------

@pytest.fixture(scope="module")
def beside(tmp_path_factory, damaged) -> Path:
    """A complete tiny llama folder with another checkpoint, ``other.safetensors``, beside its own."""
    import shutil

    folder = tmp_path_factory.mktemp("beside") / "m"
    tiny_model("llama", seed=2).save_pretrained(folder, safe_serialization=True)
    byte_tokenizer().save_pretrained(folder)
    shutil.copy(damaged / "model.safetensors", folder / "other.safetensors")
    return folder


FILE_COMMANDS = {
    "analyze": ["analyze", "--no-cache"],
    "eval": ["eval", "--max-windows", "1", "--seqlen", "16"],
    "prune": ["prune", "--method", "magnitude"],
}


@pytest.mark.parametrize("command", list(FILE_COMMANDS))
def test_a_safetensors_file_beside_the_checkpoint_is_refused(capsys, beside, command):
    """`--model folder/other.safetensors` read the folder's model.safetensors instead, exit 0."""
    before = runs_count()
    refused(capsys, FILE_COMMANDS[command] + ["--model", str(beside / "other.safetensors"), "--device", "cpu",
                                              "--quiet"], "other.safetensors", "model.safetensors")
    assert runs_count() == before


def test_a_safetensors_file_without_a_config_is_named(tmp_path, capsys, damaged):
    """A lone .safetensors file: the line said only "No such file or directory: .../config.json"."""
    import shutil

    lone = tmp_path / "weights.safetensors"
    shutil.copy(damaged / "model.safetensors", lone)
    refused(capsys, ["analyze", "--model", str(lone), "--device", "cpu", "--quiet", "--no-cache"],
            str(lone), "config.json")


# --- 2./5. allocate --out is checked like every --out ----------------------------------------

@pytest.mark.parametrize("where", ["model-folder", "not-csv"])
def test_allocate_out_is_checked_like_every_out(tmp_path, capsys, beside, where):
    """allocate --out wrote a ratios CSV into a user's model folder, or under a non-.csv name."""
    import pandas as pd

    names = [f"model.layers.{b}.self_attn.{k}_proj" for b in range(2) for k in "qkv"]
    table = tmp_path / "metrics.csv"
    pd.DataFrame({"name": names, "block": [0] * 3 + [1] * 3, "kind": list("qkv") * 2, "rows": 64, "cols": 64,
                  "params": 4096, "alpha": [3.0, 4.0, 5.0, 3.5, 4.5, 5.5], "status": "ok"}).to_csv(table, index=False)
    out = beside / "ratios.csv" if where == "model-folder" else tmp_path / "ratios.txt"
    refused(capsys, ["allocate", "--metrics", str(table), "--sparsity", "0.5", "--out", str(out)], str(out))
    assert not out.exists()


# --- 4./5. a metrics table of another model ---------------------------------------------------

def _half_table(path: Path) -> Path:
    """An alpha table of block 0 only of a 2-block tiny llama (as of a smaller model)."""
    import pandas as pd

    kinds = {"q": "self_attn", "k": "self_attn", "v": "self_attn", "o": "self_attn", "gate": "mlp", "up": "mlp",
             "down": "mlp"}
    pd.DataFrame({"name": [f"model.layers.0.{m}.{k}_proj" for k, m in kinds.items()], "block": 0,
                  "kind": list(kinds), "rows": 64, "cols": 64, "params": 4096,
                  "alpha": [3.0, 4.0, 5.0, 3.5, 4.5, 5.5, 6.0], "status": "ok"}).to_csv(path, index=False)
    return path


def test_a_sweep_with_another_models_metrics_is_refused(tmp_path, capsys, beside):
    """sweep --metrics of another model ran the dense evaluation, recorded each alpha run as failed
    and exited 0; now refused in one line before any run, nothing recorded, no table written."""
    table = _half_table(tmp_path / "half.csv")
    before = runs_count()
    refused(capsys, ["sweep", "--model", str(beside), "--device", "cpu", "--quiet", "--methods", "magnitude",
                     "--allocations", "alpha", "--sparsities", "0.5", "--metrics", str(table), "--max-windows", "1",
                     "--seqlen", "16", "--out", str(tmp_path / "sw")], str(table), "model.layers.1.")
    assert runs_count() == before
    assert not list(tmp_path.glob("sw*"))


# --- 5. a target sparsity above r_max, before any work ----------------------------------------

@pytest.mark.parametrize("command", ["prune-alpha", "prune-uniform", "prune-owl", "sweep"])
def test_a_target_above_r_max_is_refused_before_the_model_loads(tmp_path, capsys, damaged, command):
    """--sparsity 0.995 with the default r_max (0.99): the model loaded (alpha: analysed too) before
    the allocation refused it; a sweep recorded it as a failed run."""
    argv = {"prune-alpha": ["prune", "--method", "magnitude", "--allocation", "alpha", "--sparsity", "0.995"],
            "prune-uniform": ["prune", "--method", "magnitude", "--sparsity", "0.995"],
            "prune-owl": ["prune", "--method", "magnitude", "--allocation", "owl", "--sparsity", "0.995"],
            "sweep": ["sweep", "--methods", "magnitude", "--sparsities", "0.5,0.995", "--out", str(tmp_path / "sw")],
            }[command]
    before = runs_count()
    line = refused(capsys, argv + ["--model", str(damaged), "--device", "cpu", "--quiet"], "0.995", "r_max")
    assert Q0 not in line
    assert runs_count() == before


def test_allocate_refuses_a_target_above_r_max_at_once(tmp_path, capsys):
    """allocate --sparsity 0.995 was refused only after numpy, pandas and torch were imported."""
    table = _half_table(tmp_path / "half.csv")
    refused(capsys, ["allocate", "--metrics", str(table), "--sparsity", "0.995"], "0.995", "r_max", within=5.0)
    code = ("import sys; from core.cli import main; rc = main(['allocate', '--metrics', %r, '--sparsity', '0.995']);"
            "print(rc, sorted(m for m in ('torch', 'pandas', 'numpy') if m in sys.modules))" % str(table))
    import subprocess

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.stdout.split("\n")[0] == "2 []", (done.stdout, done.stderr)


@pytest.mark.parametrize("option", ["--ratios", "--metrics"])
def test_an_input_file_that_is_a_folder_is_called_a_folder(tmp_path, capsys, damaged, option):
    """--ratios DIR / --metrics DIR said "no such file" of a folder that is there."""
    folder = tmp_path / "tables"
    folder.mkdir()
    extra = ["--allocation", "alpha"] if option == "--metrics" else []
    line = refused(capsys, ["prune", "--model", str(damaged), "--device", "cpu", "--quiet", "--method", "magnitude",
                            option, str(folder)] + extra, str(folder), "folder")
    assert "no such file" not in line


# --- 1. compare checks every source before analysing any ---------------------------------------

def test_compare_refuses_a_damaged_source_before_analysing_the_others(tmp_path, capsys, damaged):
    """compare GOOD DAMAGED analysed (and cached) GOOD, then refused DAMAGED."""
    import os

    good = tmp_path / "good"
    tiny_model("llama", seed=3).save_pretrained(good, safe_serialization=True)
    cache = Path(os.environ["SPECTRASCOPE_HOME"]) / "analyses"
    before = sorted(cache.iterdir()) if cache.is_dir() else []
    refused(capsys, ["compare", str(good), str(damaged), "--device", "cpu", "--quiet"], str(damaged), Q0)
    assert (sorted(cache.iterdir()) if cache.is_dir() else []) == before      # nothing analysed
