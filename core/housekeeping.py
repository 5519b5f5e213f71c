"""Temporaries that Spectrascope records when it creates them, and the removal of those left
by dead processes.

Every temporary file or folder Spectrascope writes is named
``.NAME.partial~HOST~PID~START~RANDOM`` beside its destination, and before it is created it
is recorded in the ledger ``$SPECTRASCOPE_HOME/temporaries/`` (one small file per temporary:
its path, ``HOST`` (host name and pid namespace), ``PID`` and ``START``, the process's start
time, so that a reused pid is not mistaken for the owner). ``clean()`` removes only recorded
temporaries, only once their process is certainly gone, and never through a symbolic link.
A name alone never licenses a removal: files and folders that merely look like temporaries
(a user's, or leftovers of versions before the ledger) are only listed, by ``left_alone``.
"""
from __future__ import annotations

import hashlib
import json
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

from .paths import home

log = logging.getLogger(__name__)

MARK = ".partial~"
#: The ledger's folder inside ``$SPECTRASCOPE_HOME``.
LEDGER = "temporaries"
#: A ledger entry that cannot be read after this long was cut short by a kill: it is dropped.
BAD_ENTRY_S = 3600.0


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


# --- the ledger ------------------------------------------------------------------------------

def _ledger() -> Path:
    folder = home() / LEDGER
    folder.mkdir(exist_ok=True)
    return folder


def _entry(ledger: Path, path: Path) -> Path:
    return ledger / (hashlib.sha256(str(path).encode()).hexdigest()[:32] + ".json")


def temp_path(dest: str | os.PathLike) -> Path:
    """A fresh temporary name beside ``dest`` (its folder's real path), recorded in the ledger as
    this process's before anything exists at it. Call ``forget`` once it is published or removed."""
    dest = Path(dest)
    tmp = Path(os.path.realpath(dest.parent)) / f".{dest.name}{MARK}{owner_tag()}~{uuid.uuid4().hex[:8]}"
    host, pid, start = owner_tag().split("~")
    record = json.dumps({"path": str(tmp), "host": host, "pid": int(pid), "start": start, "created": time.time()})
    try:
        fd = os.open(_entry(_ledger(), tmp), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, record.encode())
        finally:
            os.close(fd)
    except (OSError, ValueError) as exc:   # an unusable home: the write still works, but a crash's leftover stays
        log.warning("could not record the temporary %s in Spectrascope's folder (%s); if this process is killed, "
                    "remove it by hand", tmp, exc)
    return tmp


def forget(tmp: str | os.PathLike) -> None:
    """Drop ``tmp``'s ledger entry (it was published, renamed or removed)."""
    try:
        _entry(_ledger(), Path(tmp)).unlink(missing_ok=True)
    except (OSError, ValueError):
        pass


def discard(tmp: str | os.PathLike) -> None:
    """Remove our temporary ``tmp`` (whatever is still there) and drop its ledger entry."""
    remove_tree(tmp)
    forget(tmp)


@dataclass(frozen=True)
class Temporary:
    """A recorded temporary: where, and which process created it."""

    path: Path
    host: str
    pid: int
    start: str
    entry: Path

    @property
    def owner(self) -> str:
        return f"pid {self.pid} on {self.host}"


def recorded() -> list[Temporary]:
    """Every temporary in the ledger (entries cut short by a kill, older than ``BAD_ENTRY_S``, are dropped)."""
    try:
        entries = sorted(_ledger().glob("*.json"))
    except (OSError, ValueError):
        return []
    out = []
    for entry in entries:
        try:
            r = json.loads(entry.read_text())
            out.append(Temporary(Path(r["path"]), str(r["host"]), int(r["pid"]), str(r["start"]), entry))
        except FileNotFoundError:
            continue
        except (OSError, ValueError, TypeError, KeyError):
            try:
                if time.time() - entry.lstat().st_mtime > BAD_ENTRY_S:
                    entry.unlink(missing_ok=True)
            except OSError:
                pass
    return out


# --- leftovers -------------------------------------------------------------------------------

def _size(path: Path) -> int:
    try:
        if not path.is_dir() or path.is_symlink():
            return path.lstat().st_size
        return sum(f.lstat().st_size for f in path.rglob("*") if not f.is_dir())
    except OSError:
        return 0


@dataclass(frozen=True)
class Leftover:
    """A recorded temporary whose owner is dead: what it is, how big, who left it."""

    path: Path
    bytes: int
    owner: str          # "pid 123 on host"

    def __str__(self) -> str:
        return f"{human_size(self.bytes):>9}  {self.path}  (left by {self.owner})"


def human_size(n: int) -> str:
    """``n`` bytes as ``12.3 MB`` (decimal units)."""
    return next(f"{n / 10**e:.1f} {u}" for e, u in ((9, "GB"), (6, "MB"), (3, "kB"), (0, "B")) if n >= 10**e or e == 0)


def _ours(t: Temporary) -> bool:
    """True if what lies at ``t.path`` can be what we created there: a file or folder (not a
    symbolic link) whose folder is still the real folder it was recorded in."""
    try:
        mode = t.path.lstat().st_mode
    except OSError:
        return False
    return not stat.S_ISLNK(mode) and os.path.realpath(t.path.parent) == str(t.path.parent)


def _stale(roots: Iterable[str | os.PathLike] | None) -> list[tuple[Temporary, bool]]:
    """Recorded temporaries of dead processes (inside ``roots`` when given), each with whether
    it is still there to be removed."""
    folders = None if roots is None else {os.path.realpath(r) for r in roots}
    return [(t, _ours(t)) for t in recorded()
            if (folders is None or str(t.path.parent) in folders) and not owner_alive(t.host, t.pid, t.start)]


def stale_partials(roots: Iterable[str | os.PathLike] | None = None) -> list[Leftover]:
    """Recorded temporaries of dead processes (directly inside ``roots`` when given; all by default)."""
    return [Leftover(t.path, _size(t.path), t.owner) for t, there in _stale(roots) if there]


def remove_tree(path: str | os.PathLike) -> None:
    """Remove a file or folder (a symbolic link itself, never its target), making read-only
    folders inside it writable first."""
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


def clean(roots: Iterable[str | os.PathLike] | None = None, dry_run: bool = False) -> list[Leftover]:
    """Remove the recorded temporaries of dead processes (inside ``roots`` when given, else
    wherever they lie); returns what was (or would be) freed. Entries whose temporary is gone
    (or was replaced by something that is not ours, such as a symbolic link) are dropped."""
    freed = []
    for t, there in _stale(roots):
        if not there:
            if not dry_run:
                t.entry.unlink(missing_ok=True)
            continue
        item = Leftover(t.path, _size(t.path), t.owner)
        if not dry_run:
            try:
                remove_tree(t.path)
            except OSError as exc:
                log.warning("could not remove the leftover %s: %s", t.path, exc)
                continue
            t.entry.unlink(missing_ok=True)
            log.info("removed the leftover %s", item)
        freed.append(item)
    return freed


# --- look-alikes: listed, never removed -------------------------------------------------------

_LOOKALIKE = re.compile(r"^\..+(\.partial-[A-Za-z0-9_]+|\.\d+\.[0-9a-f]{8}\.tmp|\.partial~.+)$")


def default_roots(home: str | os.PathLike) -> list[Path]:
    """``home`` and its direct subfolders (never a symbolic link to a folder elsewhere)."""
    home = Path(home)
    try:
        return [home, *sorted(Path(e.path) for e in os.scandir(home)
                              if e.is_dir(follow_symlinks=False) and not e.name.startswith("."))]
    except OSError:
        return [home]


def left_alone(roots: Iterable[str | os.PathLike]) -> list[Path]:
    """Files and folders directly inside ``roots`` named like temporaries (of this or an older
    version) that the ledger does not record: perhaps a user's, perhaps an older version's
    leftover; never removed by Spectrascope. A root that is a symbolic link is not looked into."""
    ours = {t.path for t in recorded()}
    found = []
    for root in roots:
        if os.path.islink(root):
            continue
        try:
            entries = list(os.scandir(root))
        except OSError:
            continue
        real = Path(os.path.realpath(root))
        found += [real / e.name for e in entries if _LOOKALIKE.match(e.name) and real / e.name not in ours]
    return sorted(set(found))
