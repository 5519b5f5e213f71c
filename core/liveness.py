"""Liveness of recorded runs: which process runs them, and whether it is certainly gone (so a
``running`` row can be shown as ``interrupted``)."""
from __future__ import annotations

import time
from typing import Mapping

from .housekeeping import owner_alive, owner_tag

#: Seconds between two heartbeats of a running run.
HEARTBEAT_S = 30.0
#: A running run of another host whose heartbeat is older than this counts as interrupted.
STALE_S = 20 * HEARTBEAT_S
#: A running run recorded before liveness columns existed counts as interrupted after this long.
LEGACY_STALE_S = 24 * 3600.0


def this_process() -> dict:
    host, pid, start = owner_tag().split("~")
    return {"host": host, "pid": int(pid), "process_start": start, "heartbeat_at": time.time()}


def gone(run: Mapping[str, object], now: float) -> bool:
    """True if the process of a ``running`` run is certainly gone: on this host, its pid is dead
    or reused; elsewhere, its heartbeat is older than ``STALE_S``; without liveness columns
    (older versions), it started more than ``LEGACY_STALE_S`` ago."""
    pid, beat = run.get("pid"), run.get("heartbeat_at")
    if pid is None or pid != pid:      # None or NaN: recorded by an older version
        return now - float(run["started_at"]) > LEGACY_STALE_S
    if run.get("host") == this_process()["host"]:
        return not owner_alive(str(run["host"]), int(pid), str(run["process_start"]))
    return beat is not None and beat == beat and now - float(beat) > STALE_S
