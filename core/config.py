"""Shared settings: where Spectrascope keeps its files, devices, dtypes, atomic writes.

Every other module takes an explicit ``device`` and ``dtype``; this module turns the
user's words ("auto", "cuda:1", "bf16") into torch objects in one place.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Callable

import torch

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
}

#: The dtype names a user chooses from (``_DTYPES`` also takes their short aliases).
DTYPES = ("float32", "float16", "bfloat16")


#: Windows of text go through the model (or one block) in batches of about this many
#: tokens: large enough that the matrix products run efficiently and the per-call overhead
#: is shared, small enough that the activations of a 70B model's block stay modest.
BATCH_TOKENS = 1024


def window_batches(n: int, seqlen: int, start: int = 0, tokens: int = BATCH_TOKENS) -> list[slice]:
    """Slices over windows ``start..n-1`` of ``seqlen`` tokens, about ``tokens`` each (at
    least one window per slice)."""
    size = max(1, tokens // max(1, seqlen))
    return [slice(i, min(i + size, n)) for i in range(start, n, size)]


def home() -> Path:
    """Spectrascope's own folder (``$SPECTRASCOPE_HOME``, default ``~/.cache/spectrascope``)."""
    path = Path(os.environ.get("SPECTRASCOPE_HOME") or Path.home() / ".cache" / "spectrascope")
    path.mkdir(parents=True, exist_ok=True)
    return path


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; anything else must exist on this machine."""
    if isinstance(device, torch.device):
        return device
    name = (device or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"device={device!r} is not a device name; use auto, cpu, cuda, cuda:N or mps") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} asked for CUDA but no CUDA GPU is visible; use --device cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device={device!r} asked for Apple MPS, which is not available here; use cpu or auto")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device={device!r} is not supported; use auto, cpu, cuda, cuda:N or mps")
    return dev


def resolve_dtype(dtype: str | torch.dtype = "float32") -> torch.dtype:
    """Accepts a torch dtype or a name such as float32, fp16, bf16."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).strip().lower()]
    except KeyError:
        raise ValueError(f"dtype={dtype!r} is unknown; use one of {', '.join(DTYPES)}") from None


def atomic_file(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it to ``path``.

    A reader never sees a half-written file, and a failure leaves nothing behind. The
    temporary file is created with a plain ``open`` so the result has the usual permissions.
    """
    path = Path(path).expanduser().resolve()
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: folder {path.parent} does not exist; create it first")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        open(tmp, "x").close()
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_dir(dest: str | os.PathLike, write: Callable[[Path], None], *, replace: bool = False) -> Path:
    """Call ``write(tmp)`` on a temporary folder beside ``dest``, then rename it to ``dest``.

    An interrupted run leaves no half-written folder. With ``replace`` an existing ``dest``
    is swapped out (caches); without it an existing ``dest`` is an error (user outputs).
    """
    dest = Path(dest).expanduser().resolve()
    if dest.exists() and not replace:
        raise ValueError(f"{dest} already exists; choose a new folder (nothing is overwritten)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    try:
        write(tmp)
        tmp.chmod(0o755)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
