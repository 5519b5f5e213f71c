"""An allocation as an llm-compressor recipe: its one-shot Wanda or SparseGPT modifier with our
per-matrix ratios, so a model can be pruned in llm-compressor with Spectrascope's allocation.

llm-compressor's ``WandaPruningModifier`` and ``SparseGPTModifier`` (``SparsityModifierBase``,
checked against llmcompressor 0.14) take ``sparsity`` as one float or as a list with one value
per *target*, in the model's module order; ``targets`` are module names or class names. Its
examples target decoder layers (one sparsity per layer, every Linear inside pruned alike); the
recipe here names each matrix to prune as a target instead, so every allocation, a matrix
mapping too, is written exactly as it is: no averaging. Matrices at ratio 0 (``dense_kinds``)
are left out of the targets and so stay dense, like the embeddings and the head, which are
never targets. The list follows the module order of the model family (``core.families``);
llm-compressor itself refuses a list whose length differs from the modules it matched.

N:M (``nm``): llm-compressor's ``mask_structure`` "P:M" *prunes* P of every M inputs, ours
keeps N, so ``nm=(2, 4)`` is written ``"2:4"`` and ``(1, 4)`` as ``"3:4"``; the ratios are then
not used (as in ``spectrascope prune --nm``), every target gets 1 - N/M.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .allocation import Allocation
from .choices import RECIPE_METHODS
from .config import atomic_file
from .families import FAMILIES, Family
from .ratiofile import some as _some

logger = logging.getLogger(__name__)

#: Our pruning method -> llm-compressor's modifier class.
MODIFIERS = {"wanda": "WandaPruningModifier", "sparsegpt": "SparseGPTModifier"}
assert tuple(MODIFIERS) == RECIPE_METHODS, "core.choices.RECIPE_METHODS names the modifiers here"
#: SparseGPT settings written into its modifier: ours (``core.pruning.sparsegpt``), named as llm-compressor names them.
SPARSEGPT_ARGS = {"block_size": 128, "dampening_frac": 0.01}


@dataclass(frozen=True)
class Recipe:
    """One llm-compressor modifier: ``targets`` (matrix names in module order) and one
    ``sparsity`` each, ``mask_structure`` ("0:0" unstructured, else "P:M" pruning P of M),
    ``dense``: the allocation's matrices left out (ratio 0), ``extra``: the modifier's other
    arguments. ``text()`` is the YAML; ``write()`` writes it atomically."""

    method: str
    modifier: str
    targets: tuple[str, ...]
    sparsity: tuple[float, ...]
    mask_structure: str
    dense: tuple[str, ...]
    extra: dict[str, object]
    source: str
    warnings: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, object]:
        """The recipe as llm-compressor reads it: ``{stage}_stage -> {group}_modifiers -> modifier -> args``."""
        args = {"sparsity": list(self.sparsity), "mask_structure": self.mask_structure,
                "targets": list(self.targets), "ignore": [], **self.extra}
        return {"sparsity_stage": {"sparsity_modifiers": {self.modifier: args}}}

    def text(self) -> str:
        """YAML with a comment naming each ratio's matrix (``yaml.safe_load`` gives ``as_dict()``)."""
        out = [f"# llm-compressor recipe written by Spectrascope: {' '.join(self.source.split())}",
               f"# {len(self.targets)} matrices pruned, each its own target with its own sparsity (module order);",
               f"# {len(self.dense)} kept dense (not targets); embeddings and the output head are never targets.",
               "sparsity_stage:", "  sparsity_modifiers:", f"    {self.modifier}:"]
        if self.mask_structure == "0:0":
            out += ["      sparsity:"] + [f"        - {_num(r)}  # {n}" for n, r in zip(self.targets, self.sparsity)]
        else:   # under N:M llm-compressor does not use the sparsity; one value says what the pattern gives
            out.append(f"      sparsity: {_num(self.sparsity[0])}  # {self.mask_structure}: pruned "
                       f"{self.mask_structure.split(':')[0]} of every {self.mask_structure.split(':')[1]} inputs")
        out.append(f"      mask_structure: \"{self.mask_structure}\"")
        out += ["      targets:"] + [f"        - {n}" for n in self.targets]
        out.append("      ignore: []")
        out += [f"      {k}: {v}" for k, v in self.extra.items()]
        return "\n".join(out) + "\n"

    def write(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write ``text()`` to ``path`` atomically; an existing file is refused unless ``overwrite``."""
        text = self.text()
        path = atomic_file(path, lambda tmp: Path(tmp).write_text(text), overwrite=overwrite)
        logger.info("wrote the %s recipe (%d targets) to %s", self.modifier, len(self.targets), path)
        return path


def build_recipe(allocation: Allocation | pd.DataFrame, method: str = "wanda", *,
                 nm: tuple[int, int] | None = None, label: str | None = None) -> Recipe:
    """The llm-compressor recipe of ``allocation`` (an ``Allocation`` or its ``ratios`` table:
    name, block, params, ratio) for ``method`` (``wanda`` or ``sparsegpt``): every matrix with
    a ratio above 0 is a target with its ratio. ``nm`` (N kept of every M,
    ``core.pruning.parse_nm``) writes a semi-structured recipe instead (ratios not used).
    ``label``: what the recipe's first comment says it is (default: the allocation's summary).
    Raises ``ValueError`` for an unknown method, or matrices llm-compressor cannot prune or
    place in module order (names outside ``core.families``, GPT-2's Conv1D)."""
    if method not in MODIFIERS:
        raise ValueError(f"recipe method {method!r} is unknown; llm-compressor's one-shot pruners are "
                         f"{', '.join(RECIPE_METHODS)}")
    if isinstance(allocation, Allocation):
        label = label or f"{allocation.summary().splitlines()[0]}, target sparsity {allocation.sparsity:g}"
        allocation = allocation.ratios
    r = allocation
    names = r["name"].to_numpy(dtype=object)
    blocks = r["block"].to_numpy(dtype=np.int64)
    ratios = r["ratio"].to_numpy(dtype=np.float64)
    params = r["params"].to_numpy(dtype=np.float64)
    target = float(params @ ratios / params.sum())
    order = np.lexsort((np.array([_module_position(n, b) for n, b in zip(names.tolist(), blocks.tolist())]), blocks))
    names, ratios = names[order], ratios[order]
    pruned = ratios > 0.0
    if not pruned.any():
        raise ValueError("every ratio of this allocation is 0: a recipe would prune nothing; give a sparsity above 0")
    warnings: list[str] = []
    mask = "0:0"
    if nm is not None:   # as `spectrascope prune --nm`: every matrix in the pattern, the ratios not used
        n, m = nm
        if not pruned.all():
            raise ValueError(f"--nm {n}:{m} prunes every matrix in its pattern, so the allocation's dense matrices "
                             f"({_some(names[~pruned])}) cannot be kept dense; drop the dense kinds or N:M")
        mask = f"{m - n}:{m}"
        if ratios.max() - ratios.min() > 1e-12 or abs(target - (1.0 - n / m)) > 1e-12:
            warnings.append(f"with {n}:{m} every matrix is pruned to {1 - n / m:g}; the allocation's ratios (mean "
                            f"{target:.4f}, {ratios.min():.3f}-{ratios.max():.3f}) are not used")
        ratios = np.full(len(ratios), 1.0 - n / m)
    for w in warnings:
        logger.warning(w)
    source = f"{label or f'allocation of {len(names)} matrices, mean sparsity {target:.4f}'}; {method}"
    return Recipe(method=method, modifier=MODIFIERS[method], targets=tuple(names[pruned].tolist()),
                  sparsity=tuple(float(x) for x in ratios[pruned]), mask_structure=mask,
                  dense=tuple(names[~pruned].tolist()), extra=dict(SPARSEGPT_ARGS) if method == "sparsegpt" else {},
                  source=source, warnings=tuple(warnings))


def _module_position(name: str, block: int) -> int:
    """Where matrix ``name`` of block ``block`` comes among its block's modules (its family's
    module order), which is the order llm-compressor matches targets in."""
    for family in FAMILIES:
        prefix = f"{family.blocks}.{block}."
        if name.startswith(prefix) and name[len(prefix):] in family.kinds:
            if family.transposed:
                raise ValueError(_conv1d(family, name))
            return list(family.kinds).index(name[len(prefix):])
    raise ValueError(f"matrix {name} (block {block}) is not a module path of a model family Spectrascope knows "
                     f"({', '.join(f.name for f in FAMILIES)}), so its place in the module order llm-compressor pairs "
                     "the sparsities with is unknown; export the allocation of a model of one of those families")


def _conv1d(family: Family, name: str) -> str:
    return (f"matrix {name}: {family.name} keeps its matrices in transformers' Conv1D, which llm-compressor's "
            "pruners do not prune (only nn.Linear and nn.ConvNd), so a recipe would leave it dense; prune this "
            "model with `spectrascope prune`")


def _num(x: float) -> str:
    return repr(float(x))      # round-trips exactly through YAML


__all__ = ["MODIFIERS", "RECIPE_METHODS", "Recipe", "build_recipe"]
