"""BOS handling of calibration and evaluation windows, and the chunked loss.

Tokenizers are built offline (``tokenizers`` WordLevel wrapped in ``PreTrainedTokenizerFast``):
one whose post-processor adds ``<s>`` (like Gemma, LLaMA-3) and one that adds nothing (like
SmolLM2). References are independent loops written out here.
"""
from __future__ import annotations

import math

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from conftest import tiny_model
from core.calibration import BOS_MODES, bos_plan, calibration_data, default_bos
from core.evaluation import eval_ids, eval_windows, perplexity, window_nll
from core.models import wrap_model

WORDS = ["<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(200)]
BOS = 0


def make_tokenizer(adds_bos: bool) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if adds_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", BOS)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    gen = torch.Generator().manual_seed(3)
    words = torch.randint(3, len(WORDS), (1500,), generator=gen).tolist()
    path = tmp_path_factory.mktemp("bos") / "text.txt"
    path.write_text(" ".join(WORDS[i] for i in words), encoding="utf-8")
    return str(path), torch.tensor(words)           # the file and its token ids (one word = one token)


def test_default_bos_detection_and_modes():
    assert default_bos(make_tokenizer(True)) == BOS
    assert default_bos(make_tokenizer(False)) is None
    assert default_bos(None) is None
    assert BOS_MODES == ("auto", "paper", "none")
    assert bos_plan(make_tokenizer(True), "auto").token_id == BOS
    assert bos_plan(make_tokenizer(False), "auto").token_id is None
    assert bos_plan(make_tokenizer(True), "paper").token_id is None
    with pytest.raises(ValueError, match="bos='first'"):
        bos_plan(make_tokenizer(True), "first")


def test_calibration_windows_per_mode(text_file):
    path, words = text_file
    tok = make_tokenizer(True)
    n, L = 6, 16
    auto = calibration_data(tok, dataset=path, nsamples=n, seqlen=L, seed=0)
    assert auto.input_ids.shape == (n, L)
    assert (auto.input_ids[:, 0] == BOS).all() and not (auto.input_ids[:, 1:] == BOS).any()
    gen = torch.Generator().manual_seed(0)          # same seeded draw, over L-1 text tokens
    starts = torch.randint(0, words.numel() - (L - 1), (n,), generator=gen).tolist()
    for row, s in zip(auto.input_ids, starts):
        assert torch.equal(row[1:], words[s:s + L - 1])
    assert auto.settings()["bos"] == "auto" and auto.settings()["bos_prepended"] is True

    none = calibration_data(tok, dataset=path, nsamples=n, seqlen=L, seed=0, bos="none")
    gen = torch.Generator().manual_seed(0)
    starts = torch.randint(0, words.numel() - L, (n,), generator=gen).tolist()
    assert torch.equal(none.input_ids, torch.stack([words[s:s + L] for s in starts]))
    assert none.settings()["bos"] == "none" and none.settings()["bos_prepended"] is False

    paper = calibration_data(tok, dataset=path, nsamples=n, seqlen=L, seed=0, bos="paper")
    stream = torch.cat([torch.tensor([BOS]), words])   # the tokenizer's defaults: BOS, then the text
    assert paper.text_tokens == stream.numel()
    gen = torch.Generator().manual_seed(0)
    starts = torch.randint(0, stream.numel() - L, (n,), generator=gen).tolist()
    assert torch.equal(paper.input_ids, torch.stack([stream[s:s + L] for s in starts]))
    assert paper.settings()["bos"] == "paper" and paper.settings()["bos_prepended"] is True

    # a tokenizer that adds no BOS: auto is exactly none (today's windows)
    plain = calibration_data(make_tokenizer(False), dataset=path, nsamples=n, seqlen=L, seed=0)
    assert torch.equal(plain.input_ids, none.input_ids) and plain.settings()["bos_prepended"] is False


def test_eval_windows_per_mode(text_file):
    path, words = text_file
    tok, L = make_tokenizer(True), 32
    auto, total = eval_windows(eval_ids(tok, path, bos="auto"), L, bos_id=bos_plan(tok, "auto").token_id)
    assert total == words.numel() // (L - 1) and auto.shape == (total, L)
    assert (auto[:, 0] == BOS).all() and torch.equal(auto[:, 1:].reshape(-1), words[:total * (L - 1)])
    paper, total = eval_windows(eval_ids(tok, path, bos="paper"), L, bos_id=bos_plan(tok, "paper").token_id)
    assert total == (words.numel() + 1) // L
    assert paper[0, 0] == BOS and (paper.reshape(-1)[1:] != BOS).all()
    none, _ = eval_windows(eval_ids(tok, path, bos="none"), L, max_windows=3)
    assert none.shape == (3, L) and torch.equal(none.reshape(-1), words[:3 * L])


def _reference_nll(model, windows: list[torch.Tensor]) -> tuple[float, int]:
    """Independent loop: one forward per window, NLL of every token after the first."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logp = torch.log_softmax(model(input_ids=w.unsqueeze(0)).logits[0, :-1].double(), dim=-1)
            nll -= float(logp.gather(1, w[1:].unsqueeze(1)).sum())
            count += w.numel() - 1
    return nll, count


def test_perplexity_per_mode_equals_independent_loops(text_file):
    path, words = text_file
    model, L = tiny_model("llama"), 32
    loaded = wrap_model(model, make_tokenizer(True))
    k = words.numel() // (L - 1)
    nll, count = _reference_nll(model, [torch.cat([torch.tensor([BOS]), words[i * (L - 1):(i + 1) * (L - 1)]])
                                        for i in range(k)])
    auto = perplexity(loaded, dataset=path, seqlen=L, device="cpu")
    assert auto.tokens == count == k * (L - 1) and auto.windows == k
    assert auto.perplexity == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert auto.to_dict()["bos"] == "auto" and auto.to_dict()["bos_prepended"] is True
    assert "BOS prepended" in auto.summary()

    stream = torch.cat([torch.tensor([BOS]), words])
    nll, count = _reference_nll(model, [stream[i * L:(i + 1) * L] for i in range(stream.numel() // L)])
    paper = perplexity(loaded, dataset=path, seqlen=L, device="cpu", bos="paper")
    assert paper.tokens == count and paper.perplexity == pytest.approx(math.exp(nll / count), rel=1e-5)

    nll, count = _reference_nll(model, [words[i * L:(i + 1) * L] for i in range(words.numel() // L)])
    none = perplexity(loaded, dataset=path, seqlen=L, device="cpu", bos="none")
    assert none.perplexity == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert none.to_dict()["bos_prepended"] is False
    given = perplexity(loaded, ids=words, seqlen=L, device="cpu")          # given ids get BOS too
    assert given.perplexity == pytest.approx(auto.perplexity, rel=1e-6)
    plain = perplexity(wrap_model(model, make_tokenizer(False)), dataset=path, seqlen=L, device="cpu")
    assert plain.perplexity == none.perplexity and plain.bos_prepended is False


def _softcapped_gemma2():
    import transformers as tf

    cfg = tf.Gemma2Config(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                          final_logit_softcapping=0.5)
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


@pytest.mark.parametrize("family", ["llama", "gemma", "opt", "gpt2", "gpt_neox", "gemma2-softcap"])
def test_chunked_loss_equals_full_logits(family):
    model = _softcapped_gemma2() if family == "gemma2-softcap" else tiny_model(family)
    ids = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(0))
    head = model.get_output_embeddings()
    sizes = []
    handle = head.register_forward_hook(lambda m, a, out: sizes.append(out.numel()))
    chunked = window_nll(model, ids, chunk_tokens=7)
    handle.remove()
    full = window_nll(model, ids, chunk_tokens=None)
    nll, count = _reference_nll(model, list(ids))
    assert chunked[1] == full[1] == count == 3 * 39
    assert chunked[0] == pytest.approx(nll, rel=1e-6) and full[0] == pytest.approx(nll, rel=1e-6)
    assert max(sizes) <= 7 * 256                     # never more than one chunk of logits at a time


def test_unknown_logit_post_processing_falls_back_to_full_logits():
    from transformers import LlamaForCausalLM

    class Scaled(LlamaForCausalLM):                  # a head output the chunked path does not know
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 3.0
            return out

    base = tiny_model("llama")
    model = Scaled(base.config).eval()
    model.load_state_dict(base.state_dict())
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    nll, _ = _reference_nll(model, list(ids))
    assert window_nll(model, ids, chunk_tokens=7)[0] == pytest.approx(nll, rel=1e-6)
    assert window_nll(base, ids)[0] != pytest.approx(nll, rel=1e-3)     # the scaling matters


def test_bad_bos_and_chunk_arguments(text_file):
    path, _ = text_file
    loaded = wrap_model(tiny_model("llama"), make_tokenizer(True))
    with pytest.raises(ValueError, match="bos="):
        perplexity(loaded, dataset=path, seqlen=32, bos="always", device="cpu")
    with pytest.raises(ValueError, match="chunk_tokens"):
        perplexity(loaded, dataset=path, seqlen=32, chunk_tokens=0, device="cpu")
    with pytest.raises(ValueError, match="bos="):
        calibration_data(make_tokenizer(True), dataset=path, nsamples=2, seqlen=16, bos="yes")
