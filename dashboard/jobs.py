"""Background jobs for the dashboard: the `spectrascope` CLI in a separate process.

A job runs ``spectrascope --progress-json <command> ... --json`` in a folder
``$SPECTRASCOPE_HOME/dashboard-jobs/<id>/`` holding ``job.json`` (command, pid, start time),
``stdout`` (the ``--json`` result) and ``stderr`` (one JSON event a line:
``{"event": "progress", "done", "total", "message"}``, ``{"event": "log", "level", "message"}`` or
``{"event": "error", "message", "exit"}``; other lines, such as warnings, are ignored). Jobs outlive page switches, browser reloads and
even the Streamlit server; results land in the runs registry. Nothing here computes anything:
it starts, watches, stops and shows (``panel``: one card per job, the same on every page).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd
import streamlit as st

from core.config import home
from dashboard.state import State

#: lines of stderr shown when a job died without an error event
TAIL_LINES = 5


def jobs_dir() -> Path:
    path = home() / "dashboard-jobs"
    path.mkdir(parents=True, exist_ok=True)
    return path


@st.cache_resource(show_spinner=False)
def _processes() -> dict[str, subprocess.Popen]:
    """Popen objects of the jobs this server started (to reap them and read exit codes)."""
    return {}


@dataclass
class Job:
    id: str
    folder: Path
    info: dict

    @property
    def title(self) -> str:
        return self.info.get("title", self.id)

    @property
    def command(self) -> str:
        """The sub-command (``prune``, ``sweep``, ...); from the command line for older jobs."""
        cmd = self.info.get("cmd") or []
        return self.info.get("command") or (cmd[4] if len(cmd) > 4 else "")

    def file(self, name: str) -> Path:
        """A file the job writes into its folder (see ``start(out=...)``)."""
        return self.folder / name

    def _text(self, name: str) -> str:
        try:
            return (self.folder / name).read_text(errors="replace")
        except OSError:
            return ""

    def returncode(self) -> int | None:
        """None while running; the exit code (or -1 when unknown) once finished."""
        rc_file = self.folder / "rc"
        if rc_file.is_file():
            return int(rc_file.read_text().strip() or -1)
        proc = _processes().get(self.id)
        if proc is not None:
            rc = proc.poll()
            if rc is None:
                return None
        else:
            pid = int(self.info.get("pid", 0))
            if pid and _alive(pid):
                return None
            rc = 0 if self.result() is not None else -1
        rc_file.write_text(str(rc))
        return rc

    def status(self) -> str:
        rc = self.returncode()
        if rc is None:
            return "cancelling" if (self.folder / "cancel").exists() else "running"
        if (self.folder / "cancel").exists():
            return "cancelled"
        return "done" if rc == 0 else "failed"

    def _stderr(self) -> tuple[list[dict], list[str]]:
        """(JSON events, the other non-empty lines and the ``log`` events' messages) of the job's
        stderr, in order."""
        events, other = [], []
        for line in self._text("stderr").splitlines():
            text = line.strip()
            try:
                event = json.loads(text) if text.startswith("{") else None
            except ValueError:
                event = None
            if isinstance(event, dict) and "event" in event:
                events.append(event)
                if event["event"] == "log":
                    other.append(f"{event.get('level', 'LOG')}: {event.get('message', '')}")
            elif text:
                other.append(line.rstrip())
        return events, other

    def progress(self) -> tuple[float, str]:
        """(fraction, message) from the job's last progress event."""
        last = next((e for e in reversed(self._stderr()[0]) if e["event"] == "progress"), None)
        if last is None:
            return 0.0, "starting (loading the model)"
        done, total, message = int(last.get("done", 0)), int(last.get("total", 0)), last.get("message") or "working"
        frac = min(max(done / total, 0.0), 1.0) if total else 0.0
        return frac, f"{message} ({done}/{total})" if total else message

    def result(self) -> dict | None:
        """The CLI's ``--json`` result (the last JSON line of stdout), or None."""
        for line in reversed(self._text("stdout").strip().splitlines()):
            try:
                return json.loads(line)
            except ValueError:
                continue
        return None

    def error(self) -> str:
        """The CLI's one-line error event, or the last lines of its stderr when it died without one."""
        events, other = self._stderr()
        errors = [e for e in events if e["event"] == "error"]
        if errors:
            return str(errors[-1].get("message", "")) or "the job failed"
        return "\n".join(other[-TAIL_LINES:]) or "the job ended without a result"

    def cancel(self) -> None:
        """SIGINT to the job's process group (the CLI records the run as cancelled); SIGKILL later."""
        flag = self.folder / "cancel"
        pid = int(self.info.get("pid", 0))
        if not pid or not _alive(pid):
            return
        sig = signal.SIGKILL if flag.exists() and time.time() - flag.stat().st_mtime > 10 else signal.SIGINT
        flag.touch(exist_ok=True)
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:  # a zombie or a recycled pid is not our job
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def start(args: list[str], title: str, *, out: str | None = None) -> Job:
    """Start ``spectrascope --progress-json <args> --json`` in its own process group (``args``
    starts with the sub-command, e.g. ``PruneSpec.to_argv()``); returns the job at once.
    ``out``: a file name in the job's folder passed as ``--out`` (read back with ``Job.file``)."""
    job_id = time.strftime("%Y%m%d-%H%M%S-") + f"{os.getpid() % 1000:03d}{int(time.time() * 1000) % 1000:03d}"
    folder = jobs_dir() / job_id
    folder.mkdir(parents=True)
    cmd = [sys.executable, "-m", "core.cli", "--progress-json", *args]
    cmd += ["--out", str(folder / out)] if out else []
    cmd += ["--json"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(folder / "stdout", "wb") as out, open(folder / "stderr", "wb") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env,
                                cwd=str(Path(__file__).resolve().parent.parent), start_new_session=True)
    _processes()[job_id] = proc
    info = {"title": title, "command": args[0], "cmd": cmd, "pid": proc.pid, "started": time.time()}
    (folder / "job.json").write_text(json.dumps(info, indent=1))
    return Job(job_id, folder, info)


def size_controls() -> None:
    """The calibration and evaluation sizes of pruning jobs: one setting for Prune & compare and
    Sweep & tune, so that their runs share a comparison key."""
    c1, c2, c3 = st.columns(3)
    c1.slider("Calibration windows", 1, 128, key=State.p_calib_n, help="the paper uses 128 windows of 2048 tokens")
    c2.select_slider("Tokens per window", [64, 128, 256, 512, 1024, 2048], key=State.p_seqlen,
                     help="also the evaluation window")
    c3.slider("Evaluation windows", 1, 64, key=State.p_eval_windows,
              help="fewer windows: a quicker, rougher perplexity")


def list_jobs(limit: int = 20, commands: tuple[str, ...] | None = None) -> list[Job]:
    """Newest first; only the jobs of ``commands`` (sub-commands) when given."""
    jobs = []
    folders = sorted((p for p in jobs_dir().iterdir() if (p / "job.json").is_file()), reverse=True)
    for folder in folders:
        if len(jobs) == limit:
            break
        try:
            job = Job(folder.name, folder, json.loads((folder / "job.json").read_text()))
        except (OSError, ValueError):
            continue
        if commands is None or job.command in commands:
            jobs.append(job)
    return jobs


def running(jobs: list[Job]) -> bool:
    return any(j.status() in ("running", "cancelling") for j in jobs)


#: ``done(where, job, result)``: what a finished job's card shows (``where``: the card's column)
Done = Callable[[object, Job, dict], None]


def card(job: Job, done: Done) -> str:
    """One job's card: title, status and start; a progress bar and Cancel while it runs, the
    error when it failed, ``done`` when it finished. Returns the status."""
    status = job.status()
    with st.container(border=True):
        c1, c2 = st.columns([5, 1], vertical_alignment="center")
        started = pd.Timestamp(job.info["started"], unit="s")
        c1.markdown(f"**{job.title}** · {status} · started {started:%H:%M:%S}")
        if status in ("running", "cancelling"):
            frac, msg = job.progress()
            c1.progress(frac, text=msg)
            if c2.button("Cancel", key=f"cancel_{job.id}", icon=":material/stop:"):
                job.cancel()
        elif status == "failed":
            c1.error(job.error(), icon=":material/error:")
        elif status == "done":
            done(c1, job, job.result() or {})
    return status


def panel(commands: tuple[str, ...], done: Done, *, follow: str | None = None, limit: int = 5) -> None:
    """The recent jobs of ``commands`` as cards, refreshed every second while one runs (a
    fragment: the rest of the page stays put); a full rerun of the page once the job ``follow``
    (the one the page started) has finished, so that what the page shows below includes its output."""
    @st.fragment(run_every=1.0 if running(list_jobs(limit, commands)) else None)
    def cards() -> None:
        recent = list_jobs(limit, commands)
        if not recent:
            return
        st.subheader("Jobs")
        ended_now = False
        for job in recent:
            if card(job, done) == "done" and job.id == follow and not st.session_state.get(f"seen_{job.id}"):
                st.session_state[f"seen_{job.id}"] = True
                ended_now = True
        if ended_now:
            st.rerun()

    cards()
