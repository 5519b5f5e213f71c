"""core.deploy: the 2:4 pattern check and the swap to PyTorch's semi-structured sparse kernels
(refused, with the reason and nothing touched, where they cannot run; on a CUDA GPU of compute
capability 8.0+ the outputs of the swapped model match the dense 2:4 model)."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from core.deploy import is_2of4, to_semi_structured, unsupported
from core.models import wrap_model
from core.pruning import prune


def test_is_2of4_checks_every_group_of_four_inputs_of_every_row():
    w = torch.tensor([[1.0, 0, 2, 0, 0, 0, 3, 4], [0, 5, 0, 6, 7, 0, 0, 8]])
    assert is_2of4(w)
    w[1, 4:8] = torch.tensor([7.0, 1, 0, 8])           # three non-zeros in one group
    assert not is_2of4(w)
    assert not is_2of4(torch.ones(2, 6))                # inputs not a multiple of 4
    assert not is_2of4(w.t())                           # the pattern runs along the inputs, not the outputs


def test_a_model_pruned_with_nm_2_4_is_2of4_everywhere_and_unstructured_is_not():
    loaded = wrap_model(tiny_model("llama"))
    prune(loaded, method="magnitude", nm="2:4", device="cpu")
    assert all(is_2of4(loaded.module(m.name).weight.data) for m in loaded.matrices)
    other = wrap_model(tiny_model("llama"))
    prune(other, 0.5, method="magnitude", device="cpu")
    assert not any(is_2of4(other.module(m.name).weight.data) for m in other.matrices)


@pytest.mark.parametrize("device, dtype, words", [("cpu", torch.float16, "need a CUDA GPU"),
                                                   ("cpu", torch.float32, "the model is on cpu")])
def test_the_kernels_are_refused_off_cuda_with_the_reason_and_nothing_changes(device, dtype, words):
    assert words in unsupported(device, dtype)
    loaded = wrap_model(tiny_model("llama").to(dtype))
    prune(loaded, method="magnitude", nm="2:4", device="cpu")
    before = {m.name: loaded.module(m.name).weight for m in loaded.matrices}
    with pytest.raises(ValueError, match="CUDA GPU"):
        to_semi_structured(loaded)
    assert all(loaded.module(n).weight is w for n, w in before.items())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8,
                    reason="needs a CUDA GPU of compute capability 8.0 or later")
def test_the_swapped_2of4_model_gives_the_dense_2of4_models_logits_on_cuda():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=512)
    torch.manual_seed(0)
    loaded = wrap_model(LlamaForCausalLM(cfg).half().cuda().eval())
    prune(loaded, method="magnitude", nm="2:4", device="cuda")
    ids = torch.randint(0, 512, (2, 64), device="cuda")
    with torch.no_grad():
        dense = loaded.model(ids).logits.float()
        conv = to_semi_structured(loaded)
        sparse = loaded.model(ids).logits.float()
    assert len(conv.converted) == len(loaded.matrices) and not conv.skipped
    assert float((sparse - dense).norm() / dense.norm()) < 1e-2


@pytest.mark.cuda
def test_a_model_with_no_2of4_matrix_is_refused_where_the_kernels_run():
    if unsupported("cuda", torch.float16):
        pytest.skip("needs a CUDA GPU of compute capability 8.0 or later")
    loaded = wrap_model(tiny_model("llama").half().cuda())
    with pytest.raises(ValueError, match="not 2:4"):
        to_semi_structured(loaded)
