"""Temporaries with a recognisable owner, and the removal of those left by dead processes.

Every temporary file or folder Spectrascope writes is named
``.NAME.partial~HOST~PID~START~RANDOM`` beside its destination: ``HOST`` (host name and
pid namespace), ``PID`` and ``START`` (the process's start time, so a reused pid is not
mistaken for the owner) say who writes it. ``clean(roots)`` removes those whose owner is
dead, never a live process's, and returns what it freed.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import stat
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

log = logging.getLogger(__name__)

MARK = ".partial~"
#: Temporaries of versions before owner tags (``.NAME.partial-XXXX``) count as stale after this long.
LEGACY_AGE_S = 24 * 3600


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (``/proc``), or ``0`` where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return fields[19].decode()
    except (OSError, IndexError):
        return "0"


def _host() -> str:
    name = socket.gethostname().replace("~", "-").replace("/", "-") or "localhost"
    try:   # containers on one host may share the folder: their pids live in different namespaces
        ns = os.readlink("/proc/self/ns/pid")
        name += "." + "".join(c for c in ns if c.isdigit())
    except OSError:
        pass
    return name


_HOST = _host()


def owner_tag(pid: int | None = None) -> str:
    """``HOST~PID~START`` of this (or another local) process."""
    pid = os.getpid() if pid is None else pid
    return f"{_HOST}~{pid}~{_start_time(pid)}"


def temp_path(dest: str | os.PathLike) -> Path:
    """A fresh temporary name beside ``dest`` that names this process as its owner."""
    dest = Path(dest)
    return dest.parent / f".{dest.name}{MARK}{owner_tag()}~{uuid.uuid4().hex[:8]}"


def _owner(name: str) -> tuple[str, int, str] | None:
    """``(host, pid, start)`` of a temporary's name, or None if it is not one of ours."""
    if not name.startswith(".") or MARK not in name:
        return None
    parts = name.rpartition(MARK)[2].split("~")
    if len(parts) != 4 or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1]), parts[2]


_LEGACY = re.compile(r"^\..+(\.partial-[A-Za-z0-9_]{8}|\.\d+\.[0-9a-f]{8}\.tmp)$")


def _is_legacy(name: str) -> bool:
    """``tempfile.mkdtemp``'s ``.NAME.partial-XXXXXXXX`` and ``.NAME.PID.HEX8.tmp`` of older versions."""
    return _LEGACY.match(name) is not None


def owner_alive(host: str, pid: int, start: str) -> bool:
    """True unless the owner is certainly dead (another host's process always counts as alive)."""
    if host != _HOST:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True       # another user's live process
    now = _start_time(pid)
    return start == "0" or now == "0" or now == start


def _size(path: Path) -> int:
    try:
        if not path.is_dir() or path.is_symlink():
            return path.lstat().st_size
        return sum(f.lstat().st_size for f in path.rglob("*") if not f.is_dir())
    except OSError:
        return 0


@dataclass(frozen=True)
class Leftover:
    """A temporary whose owner is dead: what it is, how big, who left it."""

    path: Path
    bytes: int
    owner: str          # "pid 123 on host" or "an older version"

    def __str__(self) -> str:
        return f"{human_size(self.bytes):>9}  {self.path}  (left by {self.owner})"


def human_size(n: int) -> str:
    """``n`` bytes as ``12.3 MB`` (decimal units)."""
    return next(f"{n / 10**e:.1f} {u}" for e, u in ((9, "GB"), (6, "MB"), (3, "kB"), (0, "B")) if n >= 10**e or e == 0)


def stale_partials(roots: Iterable[str | os.PathLike]) -> list[Leftover]:
    """Temporaries of dead processes directly inside each of ``roots`` (missing roots are skipped)."""
    found: list[Leftover] = []
    for root in roots:
        try:
            entries = list(os.scandir(root))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            owner = _owner(entry.name)
            if owner is not None:
                if owner_alive(*owner):
                    continue
                who = f"pid {owner[1]} on {owner[0]}"
            elif _is_legacy(entry.name):
                try:
                    if time.time() - entry.stat(follow_symlinks=False).st_mtime < LEGACY_AGE_S:
                        continue
                except FileNotFoundError:
                    continue
                who = "an older version"
            else:
                continue
            path = Path(entry.path)
            found.append(Leftover(path, _size(path), who))
    return found


def remove_tree(path: str | os.PathLike) -> None:
    """Remove a file or folder, making read-only folders inside it writable first."""
    path = Path(path)

    def retry(func, name, _exc_info) -> None:
        parent = os.path.dirname(name)
        try:
            os.chmod(parent, os.stat(parent).st_mode | stat.S_IWUSR | stat.S_IXUSR)
            if os.path.isdir(name) and not os.path.islink(name):
                os.chmod(name, os.stat(name).st_mode | stat.S_IWUSR | stat.S_IXUSR | stat.S_IRUSR)
            func(name)
        except FileNotFoundError:
            pass

    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, **{"onexc" if sys.version_info >= (3, 12) else "onerror": retry})
    else:
        path.unlink(missing_ok=True)


def default_roots(home: str | os.PathLike) -> list[Path]:
    """Where Spectrascope's own temporaries can lie: ``home`` and its direct subfolders."""
    home = Path(home)
    try:
        return [home, *sorted(p for p in home.iterdir() if p.is_dir() and not p.name.startswith("."))]
    except OSError:
        return [home]


def clean(roots: Iterable[str | os.PathLike], dry_run: bool = False) -> list[Leftover]:
    """Remove the temporaries of dead processes inside ``roots``; returns what was (or would be) freed."""
    freed = []
    for item in stale_partials(roots):
        if not dry_run:
            try:
                remove_tree(item.path)
            except OSError as exc:
                log.warning("could not remove the leftover %s: %s", item.path, exc)
                continue
            log.info("removed the leftover %s", item)
        freed.append(item)
    return freed
