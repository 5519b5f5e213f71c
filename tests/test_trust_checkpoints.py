"""Trust in checkpoints: a damaged checkpoint is refused in one line before any work, by every
load path (in memory, streamed, analysed one tensor at a time), never completed with randomly
initialised weights; forged safetensors headers, a broken config.json and a truncated
converted-model cache are named, not a traceback.

Checkpoints are tiny random models saved with ``save_pretrained`` and then damaged by hand.
"""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import refused, tiny_model
from core.cli import main as cli

Q0 = "model.layers.0.self_attn.q_proj.weight"
EMBED = "model.embed_tokens.weight"


def saved(folder: Path, family: str = "llama", **kwargs) -> Path:
    tiny_model(family, seed=1).save_pretrained(folder, safe_serialization=True, **kwargs)
    return folder


def drop(folder: Path, *keys: str) -> Path:
    """Remove ``keys`` from whichever shard holds them (the index, if any, is left as it was)."""
    for file in folder.glob("*.safetensors"):
        tensors = load_file(str(file))
        if any(k in tensors for k in keys):
            save_file({k: t for k, t in tensors.items() if k not in keys}, str(file), metadata={"format": "pt"})
    return folder


def forge(path: Path, key: str, shape: list[int], offsets: list[int], data: bytes = b"") -> None:
    """A safetensors file whose header says ``key`` has ``shape`` and ``offsets``."""
    raw = json.dumps({"__metadata__": {"format": "pt"},
                      key: {"dtype": "F32", "shape": shape, "data_offsets": offsets}}).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def registry_rows() -> list[dict]:
    import io
    import contextlib

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli(["runs", "--json"]) == 0
    text = buf.getvalue().strip()
    if not text:
        return []
    try:
        data = json.loads(text)
        return data if isinstance(data, list) else [data]
    except json.JSONDecodeError:
        return [json.loads(line) for line in text.splitlines() if line.strip()]


# --- 1. a missing tensor is refused by every path --------------------------------------------

COMMANDS = {
    "analyze": lambda m, out: ["analyze", "--model", str(m), "--device", "cpu", "--quiet", "--no-cache"],
    "analyze-streaming": lambda m, out: ["analyze", "--model", str(m), "--device", "cpu", "--quiet", "--no-cache",
                                         "--streaming"],
    "eval": lambda m, out: ["eval", "--model", str(m), "--device", "cpu", "--quiet", "--max-windows", "1",
                            "--seqlen", "16"],
    "prune": lambda m, out: ["prune", "--model", str(m), "--device", "cpu", "--quiet", "--method", "magnitude",
                             "--save", str(out)],
    "prune-streaming": lambda m, out: ["prune", "--model", str(m), "--device", "cpu", "--quiet", "--method",
                                       "magnitude", "--save", str(out), "--streaming"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_missing_block_tensor_is_refused(tmp_path, capsys, command):
    model = drop(saved(tmp_path / "m"), Q0)
    before = registry_rows()
    line = refused(capsys, COMMANDS[command](model, tmp_path / "out"), str(model), Q0, "1 of 21", "LlamaForCausalLM")
    assert "damaged or incomplete" in line
    assert not (tmp_path / "out").exists()
    assert len(registry_rows()) == len(before)          # nothing recorded, let alone done


@pytest.mark.parametrize("command", ["prune", "prune-streaming", "analyze-streaming"])
def test_missing_embeddings_are_refused(tmp_path, capsys, command):
    model = drop(saved(tmp_path / "m"), EMBED, "model.norm.weight")
    before = registry_rows()
    refused(capsys, COMMANDS[command](model, tmp_path / "out"), EMBED, "2 of 21")
    assert not (tmp_path / "out").exists()
    assert len(registry_rows()) == len(before)


def _sharded_with_absent_shard(folder: Path) -> Path:
    """A sharded checkpoint whose index maps the embeddings to a shard file that is not there."""
    saved(folder, max_shard_size="40KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"][EMBED] = "model-00099-of-00099.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return drop(folder, EMBED)


@pytest.mark.parametrize("command", ["prune-streaming", "prune", "analyze-streaming"])
def test_an_index_naming_an_absent_shard_is_refused(tmp_path, capsys, command):
    model = _sharded_with_absent_shard(tmp_path / "m")
    before = registry_rows()
    refused(capsys, COMMANDS[command](model, tmp_path / "out"), "model-00099-of-00099.safetensors")
    assert not (tmp_path / "out").exists()
    assert len(registry_rows()) == len(before)          # refused before a run is recorded


def test_the_adapter_base_is_checked_too(tmp_path):
    """A LoRA adapter analysed on a damaged base model: refused, not analysed on random weights."""
    from core.adapters import adapter_analyses

    base = drop(saved(tmp_path / "base"), Q0)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                              "base_model_name_or_path": str(base)}))
    save_file({"base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight": torch.ones(2, 64),
               "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight": torch.ones(32, 2)},
              str(adapter / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"missing 1 of 21 tensors.*model\.layers\.0\.self_attn\.q_proj\.weight"):
        adapter_analyses(adapter, device="cpu")


def test_a_forged_adapter_header_is_named(tmp_path):
    from core.adapters import read_adapter

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    forge(adapter / "adapter_model.safetensors", "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight",
          [2 ** 32, 2 ** 32], [0, 0])
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors has a corrupt safetensors header.*lora_A"):
        read_adapter(adapter)


def test_the_streamed_skeleton_is_checked_before_pruning(tmp_path):
    """``load_skeleton`` (the streamed prune's and the cluster workers' loader) refuses at once."""
    from core.models import load_skeleton

    model = drop(saved(tmp_path / "m"), EMBED)
    with pytest.raises(ValueError, match=r"missing 1 of 21 tensors .*first model\.embed_tokens\.weight"):
        load_skeleton(model)


# --- tied embeddings and extra tensors --------------------------------------------------------

@pytest.mark.parametrize("family", ["gpt2", "llama-tied"])
def test_tied_embeddings_still_load_and_a_missing_tied_source_is_refused(tmp_path, capsys, family):
    """A legitimately tied checkpoint (no lm_head.weight) loads, in memory and streamed; without
    the embeddings it shares, it is refused."""
    if family == "gpt2":
        folder, embed = saved(tmp_path / "m", "gpt2"), "transformer.wte.weight"
    else:
        from transformers import AutoModelForCausalLM
        from conftest import tiny_config

        config = tiny_config("llama")
        config.tie_word_embeddings = True
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "m", safe_serialization=True)
        folder, embed = tmp_path / "m", EMBED
    assert "lm_head.weight" not in load_file(str(folder / "model.safetensors"))
    assert cli(COMMANDS["analyze"](folder, None)) == 0
    before = registry_rows()
    assert cli(COMMANDS["prune-streaming"](folder, tmp_path / "out")) == 0
    assert (tmp_path / "out" / "config.json").is_file()
    assert [r["status"] for r in registry_rows()[len(before):]] == ["done"]
    damaged = tmp_path / "d"
    shutil.copytree(folder, damaged)
    refused(capsys, COMMANDS["analyze"](drop(damaged, embed), None), embed)


def test_an_extra_tensor_is_reported_but_loads(tmp_path, caplog):
    model = saved(tmp_path / "m")
    tensors = load_file(str(model / "model.safetensors"))
    tensors["model.layers.0.mystery.weight"] = torch.zeros(2, 2)
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    with caplog.at_level("WARNING"):
        assert cli(COMMANDS["analyze"](model, None)) == 0
    lines = [r.getMessage() for r in caplog.records if "model.layers.0.mystery.weight" in r.getMessage()]
    assert len(lines) == 1 and "1 tensor " in lines[0] and "not expect" in lines[0], lines


# --- 5. forged headers and a broken config ----------------------------------------------------

@pytest.mark.parametrize("streaming", [False, True], ids=["memory", "streaming"])
@pytest.mark.parametrize("shape,offsets", [([2 ** 70, 2], [0, 8]), ([2 ** 32, 2 ** 32], [0, 0])],
                         ids=["2**70", "2**32x2**32"])
def test_a_forged_header_dimension_is_refused(tmp_path, capsys, shape, offsets, streaming):
    model = saved(tmp_path / "m")
    forge(model / "model.safetensors", Q0, shape, offsets, b"\0" * 8)
    argv = COMMANDS["analyze-streaming" if streaming else "analyze"](model, None)
    refused(capsys, argv, "model.safetensors", Q0)


@pytest.mark.parametrize("text", ["[1, 2, 3]", "garbage{"], ids=["list", "garbage"])
@pytest.mark.parametrize("command", ["analyze-streaming", "prune-streaming"])
def test_a_broken_config_is_named_in_streaming_mode(tmp_path, capsys, text, command):
    model = saved(tmp_path / "m")
    (model / "config.json").write_text(text)
    refused(capsys, COMMANDS[command](model, tmp_path / "out"), str(model / "config.json"))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_truncated_converted_cache_is_converted_again(demo, home, tmp_path, monkeypatch, capsys, caplog):
    """A damaged converted demo (truncated safetensors in the home) is named once and converted
    again, instead of breaking every later demo command. In a home of its own holding a copy of
    the converted demo: the session's demo model maps the session's file, and truncating a
    mapped file kills the process that reads it (SIGBUS)."""
    own = tmp_path / "home"
    converted = Path(demo.path)
    shutil.copytree(converted, own / converted.relative_to(home))
    monkeypatch.setenv("SPECTRASCOPE_HOME", str(own))
    weights = own / converted.relative_to(home) / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size // 2)
    capsys.readouterr()
    with caplog.at_level("WARNING"):
        assert cli(["analyze", "--model", "demo", "--device", "cpu", "--quiet", "--no-cache"]) == 0
    named = [r for r in caplog.records if str(weights) in r.getMessage()]
    assert len(named) == 1, [r.getMessage() for r in caplog.records]
    assert weights.stat().st_size == size
