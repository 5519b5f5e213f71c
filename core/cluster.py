"""Joining Ray: where ``--ray`` connects and the checks that make a wrong address fail in
one line within seconds. Nothing here knows about analyses or sweeps (``core.executor`` runs
work on Ray); Ray is the optional extra ``spectrascope[cluster]``.

``connect``: ``True``, ``None`` or ``"local"`` start a new local Ray instance (never a cluster
already running here), ``"auto"`` joins ``$RAY_ADDRESS`` or the cluster ``ray start`` runs on this
machine, ``"HOST:PORT"`` joins that head after checking within seconds that it answers and
accepts this driver's token (one-line ``ValueError`` otherwise); Ray Client (``ray://``)
addresses are refused.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import threading
from typing import Iterator

log = logging.getLogger(__name__)

# --- connecting ------------------------------------------------------------------------------

#: Seconds to resolve a cluster's host name and to reach its GCS port before giving up.
CONNECT_TIMEOUT = 5.0
#: What the driver is connected to (None: a connection this module did not make, reused as is).
_connected: dict[str, str] = {}


def ray_module():
    """The ``ray`` module, or a clear error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ValueError("--ray needs Ray: pip install 'spectrascope[cluster]' (or pip install ray)") from None
    return ray


def ray_target(address: str | bool | None) -> str:
    """``"local"`` (``True``, ``None``, ``""``, ``"local"``: a new private Ray instance on this
    machine, even when a cluster runs here), ``"auto"`` (the cluster ``ray start`` started on
    this machine, or ``$RAY_ADDRESS``) or ``"HOST:PORT"`` (the head's GCS address). Ray Client
    (``ray://``) addresses and other forms are refused in one line."""
    if address in (True, None, "") or str(address).strip().lower() == "local":
        return "local"
    text = str(address).strip()
    if text.lower() == "auto":
        return "auto"
    if text.startswith("ray://"):
        raise ValueError(f"--ray {text}: Ray Client (ray://) addresses are not supported; give the head's "
                         "address HOST:PORT (the --port of `ray start --head`, 6379 by default)")
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536 or "/" in text:
        raise ValueError(f"--ray {text}: give the head's address HOST:PORT (e.g. 10.0.0.5:6379), auto for the "
                         "cluster `ray start` runs on this machine, or local (or nothing) for a new local instance")
    return f"{host.strip('[]')}:{port}"


def _resolve(host: str, address: str, timeout: float) -> str:
    """``host``'s first address; a name that does not resolve within ``timeout`` is an error."""
    found: list = []

    def look() -> None:
        try:
            found.append(socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][4][0])
        except OSError as exc:
            found.append(exc)

    thread = threading.Thread(target=look, daemon=True, name="ray-resolve")
    thread.start()
    thread.join(timeout)
    if not found:
        raise ValueError(f"--ray {address}: the host name {host} did not resolve within {timeout:g} s; check the name "
                         "or give the head's IP address")
    if isinstance(found[0], OSError):
        raise ValueError(f"--ray {address}: unknown host {host} ({found[0].strerror or found[0]}); check the name or "
                         "give the head's IP address")
    return found[0]


def check_gcs(address: str, timeout: float = CONNECT_TIMEOUT) -> None:
    """Fail in one line, within seconds, unless a Ray head answers at ``address`` (HOST:PORT)
    and accepts this driver: nothing listening, an unknown host, or token authentication
    this driver lacks (Ray >= 2.5x clusters started with ``RAY_AUTH_MODE=token``)."""
    host, port = address.rsplit(":", 1)
    ip = _resolve(host, address, timeout)
    try:
        socket.create_connection((ip, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ValueError(f"--ray {address}: nothing answers there ({exc.strerror or exc}); start the head with "
                         f"`ray start --head --port {port}` or give its address") from None
    from ray._raylet import GcsClient

    answer: list = []

    def ask() -> None:
        try:
            GcsClient(address=f"{ip}:{port}").internal_kv_get(b"spectrascope-probe", None, timeout=timeout)
            answer.append(None)
        except Exception as exc:  # noqa: BLE001 - handed to the caller
            answer.append(exc)

    with _quiet_stderr():                 # Ray's C++ client logs each failed call on stderr
        thread = threading.Thread(target=ask, daemon=True, name="ray-probe")
        thread.start()
        thread.join(2 * timeout)
    if not answer:
        raise ValueError(f"--ray {address}: no Ray head answered within {2 * timeout:g} s; give the port of "
                         "`ray start --head --port PORT` (6379 by default)")
    if isinstance(answer[0], ray_module().exceptions.AuthenticationError):
        mine = os.environ.get("RAY_AUTH_MODE", "").lower() == "token"
        what = "its token differs from this driver's" if mine else "this driver has none"
        raise ValueError(f"--ray {address}: the cluster requires token authentication and {what}; export "
                         "RAY_AUTH_MODE=token RAY_AUTH_TOKEN=<the token every node uses> (`ray get-auth-token` on "
                         "the head prints it) and run again")
    if answer[0] is not None:
        raise ValueError(f"--ray {address}: no Ray head answers there ({type(answer[0]).__name__}); give the port "
                         "of `ray start --head --port PORT` (6379 by default)")


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """File descriptor 2 goes to /dev/null for the block (C++ logging bypasses Python)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _auto_address() -> str:
    """The address ``ray.init(address="auto")`` joins ($RAY_ADDRESS, else the cluster ``ray start``
    runs on this machine), with token authentication on when this machine has a token, as Ray does."""
    from ray._private.services import canonicalize_bootstrap_address

    try:
        found = canonicalize_bootstrap_address("auto")
    except ConnectionError:
        found = None
    if not found:
        raise ValueError("--ray auto: no Ray cluster runs on this machine and RAY_ADDRESS is not set; start one "
                         "(`ray start --head`), give HOST:PORT, or --ray local for a new local instance")
    try:
        from ray._private.authentication.authentication_token_setup import \
            maybe_enable_token_auth_if_token_available
        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    except ImportError:    # a Ray without token authentication
        pass
    return found


def connect(address: str | bool | None = True, *, num_cpus: int | None = None):
    """Start a new local Ray instance (``True``, ``None``, ``"local"``), or join the cluster
    ``"auto"`` finds or the head at ``"HOST:PORT"`` after checking within seconds that it answers
    and accepts this driver (``check_gcs``). A driver already connected to the same target is
    reused (so is a connection made outside this module); another target replaces it.
    Returns the ``ray`` module."""
    ray = ray_module()
    target = ray_target(address)
    if not ray.is_initialized():
        _connected.clear()
    elif _connected.get("target", target) != target:
        ray.shutdown()
    if ray.is_initialized():
        return ray
    if target == "auto":
        check_gcs(_auto_address())
    elif target != "local":
        check_gcs(target)
    try:
        ray.init(address=target, num_cpus=num_cpus if target == "local" else None, include_dashboard=False,
                 log_to_driver=False)
    except (ConnectionError, SystemExit) as exc:       # Ray exits the process when the GCS vanishes
        raise ValueError(f"--ray {address}: could not join the cluster ({type(exc).__name__}: {exc})") from None
    _connected["target"] = target
    log.info("Ray: %s, resources %s", "a new local instance" if target == "local" else f"joined {target}",
             ray.cluster_resources())
    return ray


def cluster_gpus(ray) -> int:
    """GPUs of the connected cluster."""
    return int(ray.cluster_resources().get("GPU", 0))


def cluster_cpus(ray) -> int:
    """CPUs of the connected cluster (at least 1)."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)))
