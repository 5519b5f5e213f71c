"""PEFT/LoRA adapters: read an adapter folder (``adapter_config.json`` +
``adapter_model.safetensors``) and analyse, against its base model, the spectrum of each
adapted matrix's update ``B A * scaling`` and of every merged matrix ``W + B A * scaling``.

``scaling`` is ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``), per module
when the config's ``rank_pattern``/``alpha_pattern`` name it.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from .analysis import Analysis, Weights, analyze, analyze_weights
from .checkpoints import stored_keys
from .models import LoadedModel, MatrixInfo, file_identity, load_model
from .progress import Progress

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
_KEY = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")


@dataclass
class Adapter:
    """A LoRA adapter: per module name, its factors ``A`` (r x in) and ``B`` (out x r) and scaling."""

    folder: Path
    config: dict
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scaling: dict[str, float]

    @property
    def base(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    def identity(self) -> str:
        return file_identity([self.folder / CONFIG, self.folder / WEIGHTS])

    def update(self, name: str) -> torch.Tensor:
        """``B A * scaling`` of one module, ``out x in``, float32."""
        a, b = self.factors[name]
        return (b.float() @ a.float()) * self.scaling[name]


def is_adapter(path: str | Path) -> bool:
    p = Path(path).expanduser()
    return p.is_dir() and (p / CONFIG).is_file()


def _pattern(patterns: dict, name: str, default: float) -> float:
    for key, value in (patterns or {}).items():
        if name == key or name.endswith("." + key) or re.search(rf"(^|\.){re.escape(key)}$", name):
            return value
    return default


def read_adapter(folder: str | Path) -> Adapter:
    """The factors and scalings of the LoRA adapter in ``folder``."""
    folder = Path(folder).expanduser().resolve()
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        raise FileNotFoundError(f"{folder} is not a PEFT adapter: it needs {CONFIG} and {WEIGHTS}")
    config = json.loads((folder / CONFIG).read_text())
    if config.get("peft_type", "LORA").upper() != "LORA":
        raise ValueError(f"{folder}: peft_type {config.get('peft_type')!r}; only LoRA adapters are read")
    stored_keys([folder / WEIGHTS])        # its header checked first: a forged or truncated file is named
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in load_file(str(folder / WEIGHTS)).items():
        m = _KEY.match(key)
        if m:
            parts.setdefault(m.group(1), {})[m.group(2)] = t
    factors, scaling = {}, {}
    for name, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{folder / WEIGHTS}: {name} has lora_{''.join(ab)} but not both A and B")
        a, b = ab["A"], ab["B"]
        r = int(_pattern(config.get("rank_pattern"), name, a.shape[0]))
        alpha = float(_pattern(config.get("alpha_pattern"), name, config.get("lora_alpha", r)))
        factors[name] = (a, b)
        scaling[name] = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
    if not factors:
        raise ValueError(f"{folder / WEIGHTS} has no lora_A/lora_B weights")
    return Adapter(folder, config, factors, scaling)


def adapter_analyses(folder: str | Path, base: str | LoadedModel | None = None, *, xmin: str = "peak",
                     device: str = "auto", progress: Progress = None) -> tuple[Analysis, Analysis, Analysis]:
    """(base, merged, update) analyses of a LoRA adapter on ``base`` (default: the base named in
    its config). ``merged`` has every matrix of the base (unadapted ones unchanged); ``update``
    only the adapted ones. Both are cached under the adapter's and the base's identities."""
    adapter = read_adapter(folder)
    base = base if base is not None else adapter.base
    if not base:
        raise ValueError(f"{adapter.folder}: its config names no base model; give one with --base SOURCE")
    loaded = base if isinstance(base, LoadedModel) else load_model(base, device="cpu", tokenizer=False,
                                                                   progress=progress)
    known = {m.name: m for m in loaded.matrices}
    unknown = sorted(set(adapter.factors) - set(known))
    if unknown:
        raise ValueError(f"{adapter.folder}: adapted modules {unknown[:3]} are not matrices of {loaded.source}; "
                         "is it the right base model?")
    for name, (a, b) in adapter.factors.items():
        info = known[name]
        if (b.shape[0], a.shape[1]) != (info.rows, info.cols):
            raise ValueError(f"{adapter.folder}: {name} updates a {b.shape[0]}x{a.shape[1]} matrix but the base's "
                             f"is {info.rows}x{info.cols}; is it the right base model?")
    key = hashlib.sha256(f"{loaded.identity}|{adapter.identity()}".encode()).hexdigest()[:16]
    name = adapter.folder.name
    base_analysis = analyze(loaded, xmin=xmin, device=device, progress=progress)

    def merged_items():
        for info in loaded.matrices:
            w = loaded.weight(info.name).detach().float()
            yield info, (w + adapter.update(info.name)) if info.name in adapter.factors else w

    updated: list[MatrixInfo] = [m for m in loaded.matrices if m.name in adapter.factors]
    merged = analyze_weights(Weights(loaded.matrices, f"{name} merged", f"lora-merged:{key}", merged_items()),
                             xmin=xmin, device=device, progress=progress)
    update = analyze_weights(Weights(updated, f"{name} update BA", f"lora-update:{key}",
                                     ((i, adapter.update(i.name)) for i in updated)),
                             xmin=xmin, device=device, progress=progress)
    return base_analysis, merged, update
