"""The model adapter: stable names, kinds and shapes for every family; sources; bad input."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import FAMILIES, tiny_model
from core.models import family_of, load_model, prunable_matrices, resolve_source, wrap_model

EXPECTED_KINDS = {
    "llama": ["q", "k", "v", "o", "gate", "up", "down"],
    "mistral": ["q", "k", "v", "o", "gate", "up", "down"],
    "qwen2": ["q", "k", "v", "o", "gate", "up", "down"],
    "gemma": ["q", "k", "v", "o", "gate", "up", "down"],
    "opt": ["k", "v", "q", "o", "fc1", "fc2"],  # module order, as OPT declares them
    "gpt2": ["qkv", "o", "fc", "proj"],
    "gpt_neox": ["qkv", "o", "up", "down"],
}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_names_its_matrices(family):
    model = tiny_model(family)
    mats = prunable_matrices(model)
    kinds = EXPECTED_KINDS[family]
    assert [m.kind for m in mats] == kinds * 2
    assert [m.block for m in mats] == [0] * len(kinds) + [1] * len(kinds)
    names = [m.name for m in mats]
    assert len(set(names)) == len(names)
    for m in mats:
        w = model.get_submodule(m.name).weight
        # rows x cols is out x in: a forward through the module maps cols -> rows
        x = torch.randn(3, m.cols)
        assert model.get_submodule(m.name)(x).shape == (3, m.rows)
        assert m.params == w.numel()


def test_gpt2_weight_is_out_by_in():
    model = tiny_model("gpt2")
    loaded = wrap_model(model)
    info = loaded.matrices[0]  # c_attn: 64 in -> 192 out
    assert (info.rows, info.cols) == (192, 64)
    w = loaded.weight(info.name)
    x = torch.randn(2, 64)
    mod = loaded.module(info.name)
    torch.testing.assert_close(mod(x), x @ w.T + mod.bias)


def test_unknown_architecture_is_named():
    class NoBlocks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

    with pytest.raises(ValueError, match="unknown architecture 'NoBlocks'.*no transformer blocks"):
        family_of(NoBlocks())


def test_local_folder_roundtrip(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "m")
    loaded = load_model(tmp_path / "m", tokenizer=False)
    assert loaded.family.name == "llama" and len(loaded.matrices) == 14
    torch.testing.assert_close(loaded.weight(loaded.matrices[3].name), model.get_submodule(loaded.matrices[3].name).weight)
    # the identity changes when the weights change
    before = resolve_source(tmp_path / "m").identity()
    tiny_model("llama", seed=1).save_pretrained(tmp_path / "m")
    assert resolve_source(tmp_path / "m").identity() != before


def test_bad_sources_have_clear_messages(tmp_path):
    with pytest.raises(FileNotFoundError, match="model path not found"):
        resolve_source(tmp_path / "missing.gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        resolve_source(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="give a Hugging Face model folder"):
        resolve_source(tmp_path / "notes.txt")
    # a folder whose weights are corrupt
    bad = tmp_path / "bad"
    tiny_model("llama").save_pretrained(bad)
    (bad / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    with pytest.raises(ValueError, match="model.safetensors has a corrupt safetensors header"):   # names the file
        load_model(bad, tokenizer=False)
    # a GGUF file that is not one
    (tmp_path / "fake.gguf").write_bytes(b"GGUF but not really")
    with pytest.raises(ValueError, match="could not read GGUF"):
        load_model(tmp_path / "fake.gguf")


def test_hub_id_without_network_is_a_clear_error():
    with pytest.raises(ValueError, match="could not load model 'nobody/no-such-model'"):
        load_model("nobody/no-such-model", tokenizer=False)


@pytest.mark.slow
def test_demo_model_is_converted_once_into_the_cache(demo, home):
    s = demo.summary()
    assert (s["family"], s["blocks"], s["matrices"]) == ("llama", 30, 210)
    assert 134_000_000 < s["total_params"] < 135_000_000
    assert demo.path is not None and str(demo.path).startswith(home)
    assert (demo.path / "model.safetensors").is_file()
    assert json.loads((demo.path / "config.json").read_text())["model_type"] == "llama"
    assert demo.tokenizer is not None and len(demo.tokenizer("Hello world")["input_ids"]) >= 2
    # 4-bit weights dequantised: few distinct values per block of 32
    w = demo.weight("model.layers.0.self_attn.q_proj")[0, :32]
    assert len(torch.unique(w)) <= 16
