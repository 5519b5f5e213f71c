"""Shared settings: where Spectrascope keeps its files, devices, dtypes, atomic writes that
never replace what they did not create.

Every other module takes an explicit ``device`` and ``dtype``; this module turns the
user's words ("auto", "cuda:1", "bf16") into torch objects in one place.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .housekeeping import clean, discard, forget, temp_path
from .paths import home, home_path  # noqa: F401  (re-exported: core.config names them)

if TYPE_CHECKING:   # torch is imported where a device or dtype is resolved: the CLI parses without it
    import torch

log = logging.getLogger(__name__)

_DTYPES = {   # name -> torch's name of the dtype
    "float32": "float32", "fp32": "float32", "float": "float32",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float64": "float64", "fp64": "float64", "double": "float64",
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


class NoSpaceLeft(OSError, ValueError):
    """The disk filled up during a write (also a ValueError: callers report it in one line)."""


class FileTooLarge(OSError, ValueError):
    """A file-size limit (EFBIG: ``ulimit -f``, the file system's largest file) was reached
    during a write (also a ValueError: callers report it in one line)."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; anything else must exist on this machine."""
    import torch

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
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return getattr(torch, _DTYPES[str(dtype).strip().lower()])
    except KeyError:
        raise ValueError(f"dtype={dtype!r} is unknown; use one of {', '.join(DTYPES)}") from None


def _write_error(exc: BaseException, dest: Path) -> BaseException:
    """A one-line error naming ``dest`` for a full disk, a file-size limit or a denied write;
    other errors unchanged."""
    text, code = str(exc), getattr(exc, "errno", None)
    if code == errno.ENOSPC or "No space left" in text or "StorageFull" in text:
        err: OSError = NoSpaceLeft(f"no space left on the device while writing {dest}; free some space or "
                                   "choose another folder (for caches: set SPECTRASCOPE_HOME)")
        err.errno = errno.ENOSPC
        return err
    if code == errno.EFBIG or "File too large" in text or "FileTooLarge" in text:
        err = FileTooLarge(f"the file-size limit was reached while writing {dest} (a file would be larger than "
                           "`ulimit -f` or the file system allows); raise the limit or choose another folder; "
                           "nothing was written")
        err.errno = errno.EFBIG
        return err
    if isinstance(exc, PermissionError) or code == errno.EROFS:
        return PermissionError(f"cannot write {dest}: permission denied in {dest.parent}; make it writable or "
                               "choose another folder (for caches: set SPECTRASCOPE_HOME to a writable folder)")
    return exc


def _fail(exc: BaseException, dest: Path) -> None:
    err = _write_error(exc, dest)
    if err is exc:
        raise exc
    raise err from exc


def writable_file(path: str | os.PathLike, name: str = "", *, overwrite: bool = False) -> Path:
    """``path`` as an absolute path that a file can be written to, checked before the work that
    produces it: not a folder, in an existing writable folder, and not an existing file or
    symbolic link unless ``overwrite`` (then the link itself is replaced, never its target: only
    the folder part of ``path`` is resolved). ``name`` (e.g. ``--out``) prefixes the one-line error."""
    path = Path(path).expanduser()
    what = f"{name} {path}" if name else str(path)
    if path.name in ("", ".", "..") or (path.is_dir() and not path.is_symlink()):
        raise ValueError(f"cannot write {what}: it is a folder; give a file name")
    path = Path(os.path.realpath(path.parent)) / path.name
    what = f"{name} {path}" if name else str(path)
    if path.is_symlink() and not overwrite:
        raise ValueError(f"{what} already exists as a symbolic link to {os.readlink(path)}; nothing was written: "
                         "choose a new name, or add --overwrite to replace the link itself (its target is never "
                         "written)")
    if path.exists() and not overwrite:
        raise ValueError(f"{what} already exists; nothing was written: choose a new name or add --overwrite to "
                         "replace it")
    if path.parent.exists() and not path.parent.is_dir():
        raise ValueError(f"cannot write {what}: {path.parent} is a file, not a folder; choose another folder")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {what}: folder {path.parent} does not exist; create it first")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write {what}: folder {path.parent} is not writable; choose another folder")
    return path


def _publish_file(tmp: Path, path: Path, overwrite: bool) -> None:
    """Move the file ``tmp`` to ``path``: replacing what is there (a symbolic link itself, never
    its target) if ``overwrite``, else only if nothing is (a hard link fails on any existing name)."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise ValueError(f"{path} already exists (it appeared while this was being written); nothing was "
                         "overwritten: choose a new name or add --overwrite") from None
    except OSError:           # a file system without hard links: check, then rename
        if os.path.lexists(path):
            raise ValueError(f"{path} already exists (it appeared while this was being written); nothing was "
                             "overwritten: choose a new name or add --overwrite") from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def atomic_file(path: str | os.PathLike, write: Callable[[Path], None], *, overwrite: bool = False) -> Path:
    """Call ``write(tmp)`` on a recorded temporary file beside ``path``, then rename it to ``path``.

    A reader never sees a half-written file, and a failure (a full disk, a file-size limit)
    leaves nothing behind. An existing ``path`` (now or when the result is published) is
    refused unless ``overwrite`` (``writable_file``). The temporary file is created with a
    plain ``open`` so the result has the usual permissions.
    """
    path = writable_file(path, overwrite=overwrite)
    tmp = temp_path(path)
    try:
        open(tmp, "x").close()
        write(tmp)
        _publish_file(tmp, path, overwrite)
    except BaseException as exc:
        discard(tmp)
        _fail(exc, path)
    forget(tmp)
    return path


def _umask() -> int:
    """This process's umask (read from ``/proc`` where possible: setting it is not thread-safe)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def _usual_modes(folder: Path) -> None:
    """Give ``folder`` and everything in it the modes a plain ``open``/``mkdir`` would (libraries
    that write through private temporary files leave some files ``0600``)."""
    mask = _umask()
    folder.chmod(0o777 & ~mask)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, (0o666 | (os.stat(path).st_mode & 0o111)) & ~mask)


def _claim(tmp: Path, dest: Path) -> bool:
    """Rename ``tmp`` to ``dest`` only if nothing is at ``dest``; False if something is.

    ``os.rename`` would silently replace an empty folder at ``dest``, so ``dest`` is first
    claimed with ``os.mkdir`` (atomic: one process wins) and ``tmp`` renamed onto that
    empty folder of ours; if somebody filled it in between, the rename fails and it is kept.
    """
    try:
        os.mkdir(dest)
    except FileExistsError:
        return False
    try:
        os.rename(tmp, dest)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.rmdir(dest)        # only ever removes our own claim while it is still empty
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
            return False
        raise
    return True


def _publish(tmp: Path, dest: Path, replace: bool, keep: Callable[[Path], bool] | None) -> bool:
    """Move ``tmp`` to ``dest``; True if ours was published, False if an existing ``dest`` is kept."""
    for _ in range(10):
        if _claim(tmp, dest):
            return True
        if not replace:
            raise ValueError(f"{dest} already exists (it appeared while this was being written); nothing was "
                             "overwritten: choose a new folder")
        if keep is None or keep(dest):
            return False
        aside = temp_path(dest)
        try:
            os.rename(dest, aside)     # atomic: a concurrent reader's files stay open, the name is free
        except FileNotFoundError:
            forget(aside)
            continue
        discard(aside)
    raise OSError(f"could not publish {dest}: other processes keep replacing it; try again")


def atomic_dir(dest: str | os.PathLike, write: Callable[[Path], None], *, replace: bool = False,
               keep: Callable[[Path], bool] | None = None) -> Path:
    """Call ``write(tmp)`` on a temporary folder beside ``dest``, then rename it to ``dest``.

    An interrupted run leaves no half-written folder, only a temporary recorded with its owner
    process that ``housekeeping.clean`` (run here first for ``dest``'s folder) removes once the
    owner is dead. Nothing that this call did not create is ever replaced:

    - ``replace=False`` (user outputs): ``dest`` must not exist, neither now nor when the result
      is published; otherwise ``ValueError``, and the temporary is removed.
    - ``replace=True`` (caches keyed by their content): if ``dest`` exists when the result is
      ready, ``keep(dest)`` decides (default: keep any): True keeps it and discards ours (a
      concurrent writer of the same content won), False moves it aside, removes it and
      publishes ours (a corrupt entry).
    """
    dest = Path(dest).expanduser()
    dest = Path(os.path.realpath(dest.parent)) / dest.name    # a symbolic link at dest is never followed
    if not replace and (dest.exists() or dest.is_symlink()):
        raise ValueError(f"{dest} already exists; choose a new folder (nothing is overwritten)")
    tmp = temp_path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        clean([dest.parent])
        tmp.mkdir()
        write(tmp)
        _usual_modes(tmp)
        published = _publish(tmp, dest, replace, keep)
    except BaseException as exc:
        discard(tmp)
        _fail(exc, dest)
    if not published:
        log.info("%s was written meanwhile by another process; using it", dest)
    discard(tmp)       # published: nothing is left at tmp, only its ledger entry
    return dest
