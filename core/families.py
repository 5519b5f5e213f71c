"""The model families Spectrascope names matrices for (``FAMILIES``: where a family keeps its
blocks and what each prunable matrix is called) and ``MatrixInfo``, one prunable matrix. Plain
data with no imports of the engine: the checkpoint reader and the model loader share it."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    """Where a model family keeps its blocks and what its matrices are called."""

    name: str
    model_types: tuple[str, ...]
    blocks: str                     # attribute path of the block list
    kinds: dict[str, str]           # module path inside a block -> short kind, in module order
    transposed: bool = False        # weights stored in x out (GPT-2 Conv1D)


_LLAMA_KINDS = {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v",
                "self_attn.o_proj": "o", "mlp.gate_proj": "gate", "mlp.up_proj": "up",
                "mlp.down_proj": "down"}

FAMILIES: tuple[Family, ...] = (
    Family("llama", ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3",
                     "olmo", "olmo2", "granite"), "model.layers", _LLAMA_KINDS),
    Family("opt", ("opt",), "model.decoder.layers",
           {"self_attn.k_proj": "k", "self_attn.v_proj": "v", "self_attn.q_proj": "q",   # module order
            "self_attn.out_proj": "o", "fc1": "fc1", "fc2": "fc2"}),
    Family("gpt2", ("gpt2",), "transformer.h",
           {"attn.c_attn": "qkv", "attn.c_proj": "o", "mlp.c_fc": "fc", "mlp.c_proj": "proj"},
           transposed=True),
    Family("gpt_neox", ("gpt_neox",), "gpt_neox.layers",
           {"attention.query_key_value": "qkv", "attention.dense": "o",
            "mlp.dense_h_to_4h": "up", "mlp.dense_4h_to_h": "down"}),
)


@dataclass(frozen=True)
class MatrixInfo:
    """One prunable weight matrix: ``rows x cols`` is ``out_features x in_features``."""

    name: str
    block: int
    kind: str
    rows: int
    cols: int

    @property
    def params(self) -> int:
        return self.rows * self.cols
