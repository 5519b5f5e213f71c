"""llm-compressor recipes (issue 22 part 2): `spectrascope allocate --recipe FILE.yaml` writes an
allocation as llm-compressor's Wanda / SparseGPT modifier, each matrix a target with its own
sparsity, and the Allocation page offers it as a download.

The expected ratios come from ``core.allocation.allocate``, never from the recipe code; the
schema is the one of llmcompressor 0.14 (``SparsityModifierBase``: sparsity as a float or one
value per target in module order, targets, ignore, mask_structure "P:M" pruning P of M;
``Recipe.from_dict``: ``*_stage`` -> ``*_modifiers`` -> modifier class -> arguments). The suite
does not need llm-compressor: benchmarks/bench_llmcompressor.py runs it."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import refused, tiny_model

from core.allocation import allocate
from core.cli import main as cli
from core.profiles import load_profile

#: SparsityModifierBase's fields in llmcompressor 0.14 (modifiers/pruning/sparsegpt/sgpt_base.py), with
#: SparseGPTModifier's own (sparsegpt/base.py); Modifier's common ones (index, group, start, end, update) unused here.
BASE_FIELDS = {"sparsity", "sparsity_profile", "mask_structure", "owl_m", "owl_lmbda", "sequential_update",
               "targets", "ignore"}
SPARSEGPT_FIELDS = BASE_FIELDS | {"block_size", "dampening_frac", "preserve_sparsity_mask", "offload_hessians"}
MODIFIER_FIELDS = {"WandaPruningModifier": BASE_FIELDS, "SparseGPTModifier": SPARSEGPT_FIELDS}


def modifier_of(path: Path) -> tuple[str, dict]:
    """The one modifier of a recipe file, read as llm-compressor's Recipe.from_dict reads it."""
    doc = yaml.safe_load(Path(path).read_text())
    assert isinstance(doc, dict)
    stages = [k for k, v in doc.items() if k.endswith("_stage") and isinstance(v, dict)]
    assert len(stages) == 1, doc.keys()
    groups = [v for k, v in doc[stages[0]].items() if k.endswith("_modifiers") and isinstance(v, dict)]
    assert len(groups) == 1
    (name, args), = groups[0].items()
    return name, args


def metrics_csv(tmp_path: Path, family: str = "llama", *, shuffle: bool = True) -> tuple[Path, list[str]]:
    """A metrics table of a tiny model of ``family`` (its own matrices, random alphas), its rows
    shuffled; with the model's Linear module names in module order (what llm-compressor matches)."""
    from core.models import prunable_matrices

    model = tiny_model(family)
    infos = prunable_matrices(model)
    rng = np.random.default_rng(0)
    table = pd.DataFrame({"name": [m.name for m in infos], "block": [m.block for m in infos],
                          "kind": [m.kind for m in infos], "params": [m.params for m in infos],
                          "alpha": rng.uniform(2.0, 6.0, len(infos))})
    if shuffle:
        table = table.sample(frac=1.0, random_state=1)
    path = tmp_path / f"{family}-metrics.csv"
    table.to_csv(path, index=False)
    module_order = [n for n, _ in model.named_modules() if n in set(table["name"])]
    return path, module_order


def expected_ratios(table: pd.DataFrame, **options) -> dict[str, float]:
    return allocate(table, **options).ratio_by_name()


# --- what the recipe says -------------------------------------------------------------------

def test_block_mapping_recipe_gives_every_matrix_its_blocks_ratio(tmp_path, capsys):
    out = tmp_path / "r.yaml"
    assert cli(["allocate", "--profile", "llama-7b-hf", "--sparsity", "0.7", "--recipe", str(out)]) == 0
    name, args = modifier_of(out)
    assert name == "WandaPruningModifier"
    want = expected_ratios(load_profile("llama-7b-hf"), sparsity=0.7)
    assert len(args["targets"]) == len(args["sparsity"]) == len(want) == 224
    got = dict(zip(args["targets"], args["sparsity"]))
    assert got == pytest.approx(want, abs=0, rel=1e-15)
    # one value per decoder layer: every matrix of a block carries the same ratio, and blocks differ
    per_block: dict[str, set[float]] = {}
    for target, value in got.items():
        per_block.setdefault(target.split(".")[2], set()).add(value)
    assert all(len(v) == 1 for v in per_block.values())
    assert len({v.pop() for v in per_block.values()}) > 10
    assert args["mask_structure"] == "0:0" and args["ignore"] == []


def test_matrix_mapping_is_written_matrix_by_matrix_not_averaged(tmp_path):
    out = tmp_path / "r.yaml"
    assert cli(["allocate", "--profile", "llama-7b-hf", "--sparsity", "0.6", "--mapping", "matrix",
                "--recipe", str(out), "--quiet"]) == 0
    _, args = modifier_of(out)
    want = expected_ratios(load_profile("llama-7b-hf"), sparsity=0.6, mapping="matrix")
    assert dict(zip(args["targets"], args["sparsity"])) == pytest.approx(want, abs=0, rel=1e-15)
    block0 = [v for t, v in zip(args["targets"], args["sparsity"]) if t.startswith("model.layers.0.")]
    assert len(set(block0)) == 7          # the seven matrices of a block keep their own ratios


@pytest.mark.parametrize("family", ["llama", "opt", "gpt_neox"])
def test_targets_follow_the_models_module_order_whatever_the_tables_order(tmp_path, family):
    """llm-compressor pairs the list of sparsities with the targets in model.named_modules() order."""
    metrics, module_order = metrics_csv(tmp_path, family)
    out = tmp_path / "r.yaml"
    assert cli(["allocate", "--metrics", str(metrics), "--sparsity", "0.5", "--mapping", "matrix",
                "--recipe", str(out), "--quiet"]) == 0
    _, args = modifier_of(out)
    assert args["targets"] == module_order
    want = expected_ratios(pd.read_csv(metrics), sparsity=0.5, mapping="matrix")
    assert args["sparsity"] == pytest.approx([want[n] for n in module_order], abs=0, rel=1e-15)


@pytest.mark.parametrize("method, modifier", [("wanda", "WandaPruningModifier"), ("sparsegpt", "SparseGPTModifier")])
def test_modifier_has_llmcompressors_schema(tmp_path, method, modifier):
    from core.pruning.sparsegpt import SPARSEGPT_BLOCKSIZE, SPARSEGPT_DAMP

    out = tmp_path / "r.yml"
    assert cli(["allocate", "--profile", "llama-7b-hf", "--sparsity", "0.5", "--recipe", str(out),
                "--recipe-method", method, "--quiet"]) == 0
    name, args = modifier_of(out)
    assert name == modifier
    assert set(args) <= MODIFIER_FIELDS[name], set(args) - MODIFIER_FIELDS[name]
    assert isinstance(args["sparsity"], list) and all(isinstance(x, float) for x in args["sparsity"])
    assert all(isinstance(t, str) and not t.startswith("re:") for t in args["targets"])
    n, m = (int(x) for x in args["mask_structure"].split(":"))
    assert (n, m) == (0, 0)
    if method == "sparsegpt":   # our SparseGPT's settings, so both prune alike
        assert (args["block_size"], args["dampening_frac"]) == (SPARSEGPT_BLOCKSIZE, SPARSEGPT_DAMP)


def test_dense_kinds_are_left_out_of_the_targets(tmp_path):
    out = tmp_path / "r.yaml"
    assert cli(["allocate", "--profile", "llama-7b-hf", "--sparsity", "0.5", "--dense-kinds", "k,v",
                "--recipe", str(out), "--quiet"]) == 0
    _, args = modifier_of(out)
    want = expected_ratios(load_profile("llama-7b-hf"), sparsity=0.5, dense_kinds="k,v")
    assert not [t for t in args["targets"] if t.endswith(("k_proj", "v_proj"))]
    assert len(args["targets"]) == 224 - 64
    assert dict(zip(args["targets"], args["sparsity"])) == pytest.approx(
        {k: v for k, v in want.items() if v > 0}, abs=0, rel=1e-15)


@pytest.mark.parametrize("nm, mask", [("2:4", "2:4"), ("1:4", "3:4")])
def test_nm_becomes_mask_structure_counting_the_pruned(tmp_path, nm, mask):
    """Our N:M keeps N of M; llm-compressor's mask_structure P:M prunes P of M."""
    out = tmp_path / "r.yaml"
    assert cli(["allocate", "--profile", "llama-7b-hf", "--sparsity", "0.5", "--method", "uniform",
                "--recipe", str(out), "--nm", nm, "--quiet"]) == 0
    _, args = modifier_of(out)
    assert args["mask_structure"] == mask
    assert len(args["targets"]) == 224


# --- refusals: one line, exit 2, nothing written ---------------------------------------------

def test_unknown_recipe_method_is_refused_before_anything(tmp_path, capsys):
    out, csv = tmp_path / "r.yaml", tmp_path / "a.csv"
    refused(capsys, ["allocate", "--profile", "llama-7b-hf", "--sparsity", "0.5", "--recipe", str(out),
                     "--recipe-method", "magnitude", "--out", str(csv)], "magnitude", "wanda", "sparsegpt", within=5)
    assert not out.exists() and not csv.exists()


def test_recipe_options_without_recipe_are_refused(tmp_path, capsys):
    refused(capsys, ["allocate", "--profile", "llama-7b-hf", "--sparsity", "0.5", "--recipe-method", "sparsegpt"],
            "--recipe-method", "--recipe", within=5)


@pytest.mark.parametrize("where", ["missing folder", "parent is a file", "model folder", "not yaml", "existing file"])
def test_unwritable_recipe_path_is_refused(tmp_path, capsys, where):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "model" / "model.safetensors").write_bytes(b"")
    target = {"missing folder": tmp_path / "nope" / "r.yaml", "parent is a file": tmp_path / "afile" / "r.yaml",
              "model folder": tmp_path / "model" / "r.yaml", "not yaml": tmp_path / "r.txt",
              "existing file": tmp_path / "old.yaml"}[where]
    if where == "existing file":
        target.write_text("mine\n")
    csv = tmp_path / "a.csv"
    line = refused(capsys, ["allocate", "--profile", "llama-7b-hf", "--sparsity", "0.5", "--recipe", str(target),
                            "--out", str(csv)], "--recipe", within=5)
    assert not csv.exists()
    if where == "parent is a file":             # named as what it is, not as a missing folder
        assert "is a file, not a folder" in line, line
    assert (target.read_text() == "mine\n") if where == "existing file" else not target.exists()


def test_gpt2_conv1d_matrices_are_refused_with_the_reason(tmp_path, capsys):
    """llm-compressor prunes nn.Linear and nn.ConvNd only: a GPT-2 recipe would silently prune nothing."""
    metrics, _ = metrics_csv(tmp_path, "gpt2")
    out, csv = tmp_path / "r.yaml", tmp_path / "a.csv"
    refused(capsys, ["allocate", "--metrics", str(metrics), "--sparsity", "0.5", "--recipe", str(out),
                     "--out", str(csv)], "Conv1D", "transformer.h.")
    assert not out.exists() and not csv.exists()      # nothing half-done: the recipe is built before any write


def test_unknown_module_path_is_refused(tmp_path, capsys):
    table = load_profile("llama-7b-hf")
    table["name"] = table["name"].str.replace("model.layers.", "decoder.blocks.", regex=False)
    metrics = tmp_path / "m.csv"
    table.to_csv(metrics, index=False)
    out = tmp_path / "r.yaml"
    refused(capsys, ["allocate", "--metrics", str(metrics), "--sparsity", "0.5", "--recipe", str(out)],
            "decoder.blocks.0.self_attn.q_proj", "order")
    assert not out.exists()


def test_nm_with_dense_kinds_is_refused(tmp_path, capsys):
    out = tmp_path / "r.yaml"
    refused(capsys, ["allocate", "--profile", "llama-7b-hf", "--sparsity", "0.5", "--dense-kinds", "k",
                     "--recipe", str(out), "--nm", "2:4"], "2:4", "dense")
    assert not out.exists()


def test_python_api_refuses_unknown_method():
    from core.recipes import build_recipe

    alloc = allocate(load_profile("llama-7b-hf"), sparsity=0.5)
    with pytest.raises(ValueError, match="magnitude"):
        build_recipe(alloc, "magnitude")


# --- round trip ------------------------------------------------------------------------------

def test_cli_round_trip_recipe_and_csv_agree(tmp_path, capsys):
    """The recipe and --out's CSV, written by one command, hold the same ratio for every matrix."""
    metrics, module_order = metrics_csv(tmp_path, "llama")
    out, csv = tmp_path / "r.yaml", tmp_path / "a.csv"
    capsys.readouterr()
    assert cli(["allocate", "--metrics", str(metrics), "--sparsity", "0.6", "--recipe", str(out),
                "--recipe-method", "sparsegpt", "--out", str(csv)]) == 0
    stdout = capsys.readouterr().out
    assert str(out) in stdout and "SparseGPTModifier" in stdout
    ratios = pd.read_csv(csv).set_index("name")["ratio"].to_dict()
    _, args = modifier_of(out)
    assert dict(zip(args["targets"], args["sparsity"])) == ratios     # exact: both are repr of the same floats
    # --overwrite replaces the recipe
    assert cli(["allocate", "--metrics", str(metrics), "--sparsity", "0.4", "--recipe", str(out), "--overwrite",
                "--quiet"]) == 0
    _, again = modifier_of(out)
    assert again["sparsity"] != args["sparsity"] and again["targets"] == module_order


def test_allocation_page_offers_the_recipe():
    """The Allocation page offers allocation A as a recipe (a published profile: no model needed)."""
    from test_app_common import new_app

    at = new_app("allocation", a_source="profile: llama-7b-hf")     # without a model the page says so and stops
    assert not at.exception, at.exception
    buttons = [b for b in at.get("download_button") if "llm-compressor" in b.proto.label]
    assert len(buttons) == 1, [b.proto.label for b in at.get("download_button")]
    assert "_wanda.yaml" in buttons[0].proto.help, buttons[0].proto.help
    at.radio(key="a_recipe_method").set_value("sparsegpt").run()
    assert not at.exception, at.exception
    button = next(b for b in at.get("download_button") if "llm-compressor" in b.proto.label)
    assert "_sparsegpt.yaml" in button.proto.help and "SparseGPTModifier" in button.proto.help
