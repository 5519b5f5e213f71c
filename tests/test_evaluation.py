"""Perplexity: the protocol against an independent computation, windows, dtypes, arguments."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_model
from core.evaluation import perplexity
from core.models import wrap_model


def _independent_ppl(model, ids, seqlen):
    """exp of the mean of Hugging Face's own per-window loss (equal token counts per window)."""
    losses = []
    with torch.no_grad():
        for i in range(ids.numel() // seqlen):
            w = ids[i * seqlen:(i + 1) * seqlen].unsqueeze(0)
            losses.append(float(model(input_ids=w, labels=w).loss))
    return math.exp(sum(losses) / len(losses))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_dense_perplexity_equals_independent_computation(family):
    model = tiny_model(family)
    ids = torch.randint(0, 256, (1000,), generator=torch.Generator().manual_seed(1))
    result = perplexity(wrap_model(model), ids=ids, seqlen=64, device="cpu")
    assert result.windows == result.total_windows == 15
    assert result.tokens == 15 * 63
    assert result.perplexity == pytest.approx(_independent_ppl(model, ids, 64), rel=1e-5)
    assert result.tokens_per_second > 0
    quick = perplexity(wrap_model(model), ids=ids, seqlen=64, max_windows=3, device="cpu")
    assert quick.windows == 3 and quick.total_windows == 15
    assert quick.perplexity == pytest.approx(_independent_ppl(model, ids[:192], 64), rel=1e-5)


def test_seqlen_capped_at_context_and_bad_arguments():
    model = tiny_model("llama")                      # max_position_embeddings 128
    ids = torch.randint(0, 256, (600,), generator=torch.Generator().manual_seed(0))
    assert perplexity(wrap_model(model), ids=ids, seqlen=4096, device="cpu").seqlen == 128
    with pytest.raises(ValueError, match="max_windows"):
        perplexity(wrap_model(model), ids=ids, max_windows=0, device="cpu")
    with pytest.raises(ValueError, match="seqlen"):
        perplexity(wrap_model(model), ids=ids[:10], seqlen=64, device="cpu")
    with pytest.raises(ValueError, match="tokenizer"):
        perplexity(wrap_model(model), device="cpu")


def test_bfloat16_model_gives_close_perplexity():
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (256,), generator=torch.Generator().manual_seed(2))
    ref = perplexity(wrap_model(model), ids=ids, seqlen=64, device="cpu").perplexity
    half = perplexity(wrap_model(tiny_model("llama").to(torch.bfloat16)), ids=ids, seqlen=64, device="cpu")
    assert half.perplexity == pytest.approx(ref, rel=0.05)


@pytest.mark.slow
def test_demo_perplexity_on_embedded_text(demo):
    from core.evaluation import eval_ids

    result = perplexity(demo, seqlen=128, max_windows=2, device="cpu")
    ids = eval_ids(demo.tokenizer, "wiki")
    assert result.perplexity == pytest.approx(_independent_ppl(demo.model, ids[:256], 128), rel=1e-4)
    assert 3 < result.perplexity < 100
