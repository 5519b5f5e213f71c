"""Background jobs for the dashboard: the `spectrascope` CLI in a separate process.

A job runs ``spectrascope --progress-json <command> ... --json`` in a folder
``$SPECTRASCOPE_HOME/dashboard-jobs/<id>/`` holding ``job.json`` (command, pid, start time and
``owner``: ``HOST~PID~PROCESS-START``, as the runs registry records its processes),
``stdout`` (the ``--json`` result) and ``stderr`` (one JSON event a line:
``{"event": "progress", "done", "total", "message"}``, ``{"event": "log", "level", "message"}`` or
``{"event": "error", "message", "exit"}``; other lines, such as warnings, are ignored). Jobs outlive page switches, browser reloads and
even the Streamlit server; results land in the runs registry. Nothing here computes anything:
it starts, watches, stops and shows (``panel``: one card per job, the same on every page).

A job's process is signalled only while it is certainly the job's (this server's child, or the pid
still runs the process that started at the recorded time): a recycled pid is another program. A
folder whose files are damaged (bad JSON, wrong types, text as an exit code) is shown as a damaged
job with a short message, never a traceback.
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
from core.housekeeping import owner_tag
from dashboard.state import State

#: lines of stderr shown when a job died without an error event
TAIL_LINES = 5
#: this machine, as job owners name it (``owner_tag``'s host)
THIS_HOST = owner_tag().split("~")[0]


def jobs_dir() -> Path:
    path = home() / "dashboard-jobs"
    path.mkdir(parents=True, exist_ok=True)
    return path


@st.cache_resource(show_spinner=False)
def _processes() -> dict[str, subprocess.Popen]:
    """Popen objects of the jobs this server started (to reap them and read exit codes)."""
    return {}


class Damaged(ValueError):
    """A job folder's file that is not what the dashboard wrote (the message says which and how)."""


def _problem(info: object) -> str:
    """Why ``job.json``'s content is not a job's record ("" when it is one)."""
    if not isinstance(info, dict):
        return f"job.json holds {type(info).__name__}, not an object"
    pid = info.get("pid", 0)
    if type(pid) is not int or pid < 0:
        return f"job.json: pid {pid!r} is not a process id"
    started = info.get("started")
    if type(started) not in (int, float) or not 0 <= started < 1e11:
        return f"job.json: started {started!r} is not a time"
    for key in ("title", "command", "owner"):
        if key in info and not isinstance(info[key], str):
            return f"job.json: {key} {info[key]!r} is not text"
    owner = info.get("owner", f"?~{pid}~?").split("~")
    if len(owner) != 3 or owner[1] != str(pid):
        return f"job.json: owner {info['owner']!r} is not HOST~{pid}~START"
    cmd = info.get("cmd", [])
    if not isinstance(cmd, list) or not all(isinstance(c, str) for c in cmd):
        return f"job.json: cmd {cmd!r} is not a command line"
    return ""


def _number(value: object) -> int:
    """A progress event's count (anything else counts as 0)."""
    return value if type(value) is int else 0


@dataclass
class Job:
    id: str
    folder: Path
    info: dict
    #: why the folder is damaged ("" for a sound job): such a job is only shown, never signalled
    problem: str = ""

    @classmethod
    def read(cls, folder: Path) -> "Job":
        """The job of ``folder``; a damaged job (``problem`` says why) when its ``job.json`` is not one."""
        try:
            info = json.loads((folder / "job.json").read_text())
        except (OSError, ValueError, RecursionError) as exc:
            reason = "is not UTF-8 text" if isinstance(exc, UnicodeDecodeError) else \
                f"cannot be read ({exc.strerror or exc})" if isinstance(exc, OSError) else "is not JSON"
            return cls(folder.name, folder, {}, f"job.json {reason}")
        problem = _problem(info)
        return cls(folder.name, folder, info if not problem else {}, problem)

    @property
    def title(self) -> str:
        return str(self.info.get("title", self.id))

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

    def _recorded_rc(self) -> int | None:
        """The exit code in the folder's ``rc`` file, None while there is none; ``Damaged`` when it is not one."""
        rc_file = self.folder / "rc"
        if not rc_file.exists():
            return None
        text = self._text("rc").strip()
        try:
            return int(text or -1)
        except ValueError:
            raise Damaged(f"rc holds {text[:40]!r}, not an exit code") from None

    @property
    def host(self) -> str:
        """The machine the job's process runs on ("" when not recorded: jobs of older versions)."""
        return self.info.get("owner", "").split("~")[0]

    def owned(self) -> bool:
        """Whether the job's process still runs: this server's child not yet ended, or the recorded
        pid still running the process that started at the recorded time (``owner``). A job recorded
        without a start time, or of another host, cannot be checked and does not count."""
        proc = _processes().get(self.id)
        if proc is not None:
            return proc.poll() is None
        pid, owner = self.info.get("pid", 0), self.info.get("owner", "")
        if self.problem or not pid or owner.endswith("~0") or owner != owner_tag(pid):
            return False
        return _alive(pid)

    def returncode(self) -> int | None:
        """None while running; the exit code (or -1 when unknown: the process is gone) once finished."""
        rc = self._recorded_rc()
        if rc is not None:
            return rc
        proc = _processes().get(self.id)
        if proc is not None:
            rc = proc.poll()
            if rc is None:
                return None
        elif self.owned():
            return None
        else:
            rc = 0 if self.result() is not None else -1
            if rc and self.host and self.host != THIS_HOST:
                return None       # another machine's process: not known to be gone (status ``elsewhere``)
        try:
            (self.folder / "rc").write_text(str(rc))
        except OSError:
            pass
        return rc

    def status(self) -> str:
        """running, cancelling, cancelled, done, failed, interrupted (ended without an exit code or
        result: killed, or its pid is another process's now), elsewhere (another machine's job
        without a result yet: not followed from here) or damaged (``problem`` says why)."""
        if self.problem:
            return "damaged"
        try:
            rc = self.returncode()
        except Damaged as exc:
            self.problem = str(exc)
            return "damaged"
        if rc is None and self.host not in ("", THIS_HOST):
            return "elsewhere"
        if rc is None:
            return "cancelling" if (self.folder / "cancel").exists() else "running"
        if (self.folder / "cancel").exists():
            return "cancelled"
        return "done" if rc == 0 else "interrupted" if rc == -1 else "failed"

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
        done, total, message = _number(last.get("done")), _number(last.get("total")), str(last.get("message") or "working")
        frac = min(max(done / total, 0.0), 1.0) if total else 0.0
        return frac, f"{message} ({done}/{total})" if total else message

    def result(self) -> dict | None:
        """The CLI's ``--json`` result (the last JSON object line of stdout), or None."""
        for line in reversed(self._text("stdout").strip().splitlines()):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            return value if isinstance(value, dict) else None
        return None

    def error(self) -> str:
        """The CLI's one-line error event, or the last lines of its stderr when it died without one."""
        events, other = self._stderr()
        errors = [e for e in events if e["event"] == "error"]
        if errors:
            return str(errors[-1].get("message", "")) or "the job failed"
        return "\n".join(other[-TAIL_LINES:]) or "the job ended without a result"

    def cancel(self) -> None:
        """SIGINT to the job's process group (the CLI records the run as cancelled); SIGKILL later.
        Nothing is signalled unless the process is certainly the job's (``owned``)."""
        if not self.owned():
            return
        proc = _processes().get(self.id)
        pid = proc.pid if proc is not None else self.info["pid"]
        flag = self.folder / "cancel"
        sig = signal.SIGKILL if flag.exists() and time.time() - flag.stat().st_mtime > 10 else signal.SIGINT
        flag.touch(exist_ok=True)
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _alive(pid: int) -> bool:
    """Whether ``pid`` (> 0) runs and is not a zombie."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:
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
    # CANCEL_FILE: a Cancel that comes before the process handles SIGINT (it may start with SIGINT
    # ignored, inherited from a server started in the background) is read from this file instead
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
           "SPECTRASCOPE_CANCEL_FILE": str(folder / "cancel")}
    with open(folder / "stdout", "wb") as out, open(folder / "stderr", "wb") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env,
                                cwd=str(Path(__file__).resolve().parent.parent), start_new_session=True)
    _processes()[job_id] = proc
    info = {"title": title, "command": args[0], "cmd": cmd, "pid": proc.pid, "owner": owner_tag(proc.pid),
            "started": time.time()}
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
    """Newest first; only the jobs of ``commands`` (sub-commands) when given (a damaged job, whose
    command is unknown, is listed for every ``commands``)."""
    jobs = []
    try:
        folders = sorted((p for p in jobs_dir().iterdir() if (p / "job.json").exists()), reverse=True)
    except OSError:
        return []
    for folder in folders:
        if len(jobs) == limit:
            break
        job = Job.read(folder)
        if commands is None or job.problem or job.command in commands:
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
        if status == "damaged":
            st.markdown(f"**{job.id}** · damaged")
            st.warning(f"{job.problem}. Not a job this dashboard can follow; its folder: `{job.folder}`",
                       icon=":material/broken_image:")
            return status
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
        elif status == "elsewhere":
            c1.info(f"started on the machine {job.host}: it cannot be followed or cancelled from this one",
                    icon=":material/dns:")
        elif status == "interrupted":
            c1.warning("the job's process ended without an exit code or a result (killed, or the machine "
                       f"restarted): {job.error()}", icon=":material/block:")
        elif status == "done":
            try:
                done(c1, job, job.result() or {})
            except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
                c1.warning(f"the job's result is damaged ({type(exc).__name__}: {exc}); its folder: `{job.folder}`",
                           icon=":material/broken_image:")
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
            seen = st.session_state.setdefault(State.seen_jobs, set())
            if card(job, done) == "done" and job.id == follow and job.id not in seen:
                seen.add(job.id)
                ended_now = True
        if ended_now:
            st.rerun()

    cards()
