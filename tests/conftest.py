"""Shared fixtures: tiny random models of every family (built from configs, no download)
and the real demo model, converted once per test session into a private SPECTRASCOPE_HOME."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
import torch

# Each test session gets its own Spectrascope home so nothing depends on a developer's
# cache: the demo model is converted from the installed GGUF like on a fresh machine.
_HOME = tempfile.mkdtemp(prefix="spectrascope-test-home-")
os.environ["SPECTRASCOPE_HOME"] = _HOME
if os.environ.get("SPECTRASCOPE_KEEP_TEST_HOME") != "1":   # ~1 GB (the converted demo): gone at exit
    atexit.register(shutil.rmtree, _HOME, ignore_errors=True)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=128)


def tiny_config(family: str):
    """A small random config of ``family`` (llama, mistral, qwen2, gemma, opt, gpt2, gpt_neox)."""
    import transformers as tf

    if family in ("llama", "mistral", "qwen2", "gemma"):
        cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config,
               "gemma": tf.GemmaConfig}[family]
        extra = {"head_dim": 16} if family == "gemma" else {}
        return cls(**TINY, num_key_value_heads=2, **extra)
    if family == "opt":
        return tf.OPTConfig(vocab_size=256, hidden_size=64, ffn_dim=96, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=64)
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=256, n_embd=64, n_inner=96, n_layer=2, n_head=4, n_positions=128)
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                num_attention_heads=4, max_position_embeddings=128)
    raise KeyError(family)


FAMILIES = ["llama", "mistral", "qwen2", "gemma", "opt", "gpt2", "gpt_neox"]


def tiny_model(family: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def home() -> str:
    return _HOME


@pytest.fixture(scope="session")
def demo():
    """The real demo model (SmolLM2-135M-Instruct), loaded once."""
    from core.models import load_model

    return load_model("demo", device="cpu")


@pytest.fixture(scope="session")
def demo_analysis_full(demo):
    from core.analysis import analyze

    return analyze(demo, xmin="full", device="cpu")


def saved_tiny(family: str = "llama") -> Path:
    """A tiny random model of ``family`` saved as safetensors in a new folder readable by every user."""
    folder = Path(tempfile.mkdtemp(prefix="spectrascope-tiny-"))
    tiny_model(family).save_pretrained(folder, safe_serialization=True)
    for p in [folder, *folder.iterdir()]:
        p.chmod(0o755)
    return folder


def refused(capsys, argv: list[str], *names: str, within: float = 30.0) -> str:
    """``spectrascope argv`` exits 2 with exactly one stderr line that names each of ``names``."""
    from core.cli import main as cli

    capsys.readouterr()
    start = time.perf_counter()
    rc = cli(argv)
    took = time.perf_counter() - start
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, (rc, err)
    assert len(lines) == 1, err
    for name in names:
        assert name in lines[0], (name, lines[0])
    assert took < within
    return lines[0]


def byte_tokenizer():
    """A 256-symbol byte-level tokenizer (no download): one token per byte."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=alphabet[0])

