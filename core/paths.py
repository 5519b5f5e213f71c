"""Spectrascope's own folder (``$SPECTRASCOPE_HOME``): where it is, and created when needed.
No imports of the engine, so every module (the ledger of temporaries included) can use it."""
from __future__ import annotations

import os
from pathlib import Path


def home_path() -> Path:
    """Where Spectrascope's own folder is (``$SPECTRASCOPE_HOME``, default ``~/.cache/spectrascope``),
    neither created nor checked (for reading only)."""
    return Path(os.environ.get("SPECTRASCOPE_HOME") or Path.home() / ".cache" / "spectrascope").expanduser()


def home() -> Path:
    """Spectrascope's own folder (``home_path``), created if missing, writable."""
    path = home_path()
    fix = "set SPECTRASCOPE_HOME to a writable folder"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise NotADirectoryError(f"Spectrascope's folder {path} is a file, not a folder; {fix}") from None
    except OSError as exc:
        raise PermissionError(f"cannot create Spectrascope's folder {path} ({exc.strerror}); {fix}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(f"Spectrascope's folder {path} is not writable; {fix}")
    return path
