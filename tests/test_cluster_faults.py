"""Issue 19, the Ray path that fails fast and loses nothing: a wrong address fails in one line
within seconds, a cluster with token authentication says what to set, a worker that cannot see
the model folder gets its tensors through the object store, a task that fails twice keeps what
finished, and several devices read their own tensors while they work and report progress."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import tiny_model
from core.cli import main as cli
from core.models import MatrixInfo, iter_weights, wrap_model
from core.spectra import compute_spectra

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "0123456789abcdef0123456789abcdef"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(args: list[str], env: dict | None = None, timeout: float = 60) -> tuple[subprocess.CompletedProcess, float]:
    """``spectrascope ARGS`` in a fresh process (a hang is a failure, not a stuck test)."""
    start = time.monotonic()
    try:
        done = subprocess.run([sys.executable, "-m", "core.cli", *args], cwd=ROOT, env=env or dict(os.environ),
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"spectrascope {' '.join(args)} still ran after {timeout} s")
    return done, time.monotonic() - start


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny llama saved as a safetensors folder (no tokenizer needed for analysis)."""
    path = tmp_path_factory.mktemp("model")
    tiny_model("llama", seed=5).save_pretrained(path)
    return path


# --- a wrong address ---------------------------------------------------------------------------

@pytest.mark.parametrize("address", ["127.0.0.1:{port}", "no-such-host.invalid:6379"])
def test_a_ray_address_where_nothing_answers_fails_in_one_line_within_seconds(address, folder):
    address = address.format(port=_free_port())
    done, seconds = _cli(["analyze", "--model", str(folder), "--device", "cpu", "--ray", address, "--quiet"],
                         timeout=30)
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(_lines(done.stderr)) == 1, done.stderr
    assert address in done.stderr
    assert seconds < 30


def test_a_ray_client_address_is_refused_in_one_line_naming_host_port(folder, capsys):
    rc = cli(["analyze", "--model", str(folder), "--device", "cpu", "--ray", "ray://head:10001", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert len(_lines(err)) == 1, err
    assert "ray://" in err and "HOST:PORT" in err


# --- a two-node cluster with token authentication, one node blind to the model folder -----------

def _ray_start(args: list[str], env: dict, cwd: Path, log: Path, cpus: int, prefix: list[str] = ()
               ) -> subprocess.Popen:
    ports = [_free_port() for _ in range(7)]
    base = 40000 + (ports[0] % 200) * 100          # a private worker port range per node
    command = [shutil.which("ray") or str(Path(sys.executable).parent / "ray"), "start", *args, "--block",
               "--num-cpus", str(cpus), "--disable-usage-stats",
               "--node-manager-port", str(ports[0]), "--object-manager-port", str(ports[1]),
               "--dashboard-agent-listen-port", str(ports[2]), "--dashboard-agent-grpc-port", str(ports[3]),
               "--metrics-export-port", str(ports[4]), "--runtime-env-agent-port", str(ports[5]),
               "--min-worker-port", str(base), "--max-worker-port", str(base + 60)]
    return subprocess.Popen([*prefix, *command], cwd=cwd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    """Stop one ``ray start --block`` and its processes (its own process group, nothing else)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, 9)
    except ProcessLookupError:
        pass


def _wait_for_nodes(address: str, env: dict, n: int, nodes: list, timeout: float = 90) -> None:
    probe = ("import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False); "
             "sys.exit(0 if len([x for x in ray.nodes() if x['Alive']]) >= int(sys.argv[2]) else 1)")
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert all(p.poll() is None for p in nodes), "a `ray start` of the test cluster ended; see its log"
        try:
            if subprocess.run([sys.executable, "-c", probe, address, str(n)], env=env, capture_output=True,
                              timeout=30).returncode == 0:
                return
        except subprocess.TimeoutExpired:
            pass
        time.sleep(2)
    pytest.fail(f"the test cluster at {address} did not get {n} nodes in {timeout} s")


@pytest.mark.slow
def test_a_two_node_cluster_with_a_node_blind_to_the_model_folder(folder, tmp_path):
    """The README's set-up: every node and the driver export RAY_AUTH_MODE=token and the token.
    A driver without the token is told so in one line within seconds; with it, the analysis
    succeeds although the node that runs the tasks cannot see the folder (the head, where the
    driver joins and sees the folder, has no CPU for them), and equals the local table."""
    pytest.importorskip("ray")
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"]).returncode != 0:
        pytest.skip("needs unshare -m (a private mount namespace hides the model folder from one node)")
    port = _free_port()
    address = f"127.0.0.1:{port}"
    token_env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN}
    plain_env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    (tmp_path / "head").mkdir()
    (tmp_path / "elsewhere").mkdir()
    temp = tempfile.mkdtemp(prefix="ss-ray-", dir="/tmp")      # Ray's socket paths must stay short
    head = _ray_start(["--head", "--port", str(port), "--include-dashboard", "false", "--temp-dir", temp],
                      token_env, tmp_path / "head", tmp_path / "head.log", cpus=0)
    blind = None
    try:
        time.sleep(5)
        # the second node: another working directory, and an empty tmpfs over the model folder
        blind = _ray_start(["--address", address], token_env, tmp_path / "elsewhere", tmp_path / "blind.log", cpus=2,
                           prefix=["unshare", "-m", "--propagation", "private", "sh", "-c",
                                   f"mount -t tmpfs tmpfs '{folder}' && exec \"$@\"", "sh"])
        _wait_for_nodes(address, token_env, 2, [head, blind])

        done, seconds = _cli(["analyze", "--model", str(folder), "--device", "cpu", "--ray", address, "--quiet"],
                             env=plain_env, timeout=60)
        assert done.returncode == 2, done.stderr[-2000:]
        assert len(_lines(done.stderr)) == 1, done.stderr
        assert address in done.stderr and "RAY_AUTH_MODE=token" in done.stderr
        assert seconds < 30

        local = tmp_path / "local.csv"
        assert cli(["analyze", "--model", str(folder), "--device", "cpu", "--no-cache", "--out", str(local),
                    "--quiet"]) == 0
        on_ray = tmp_path / "ray.csv"
        done, _ = _cli(["analyze", "--model", str(folder), "--device", "cpu", "--no-cache", "--ray", address,
                        "--out", str(on_ray), "--quiet"], env=token_env, timeout=240)
        assert done.returncode == 0, (done.stderr[-3000:], (tmp_path / "blind.log").read_text()[-2000:])
        pd.testing.assert_frame_equal(pd.read_csv(on_ray), pd.read_csv(local))
    finally:
        for proc in (blind, head):
            if proc is not None:
                _stop(proc)
        shutil.rmtree(temp, ignore_errors=True)


# --- a task that fails twice keeps what finished -------------------------------------------------

@pytest.mark.slow
def test_a_task_failing_twice_keeps_the_finished_spectra_and_a_rerun_computes_only_the_rest():
    ray = pytest.importorskip("ray")
    from core.analysis import Weights, spectra_on
    from core.executor import OnRay

    loaded = wrap_model(tiny_model("llama", seed=7))
    want = compute_spectra(iter_weights(loaded), device="cpu")
    planted = loaded.matrices[-1]
    module = loaded.module(planted.name)
    dense = module.weight
    module.weight = torch.nn.Parameter(dense.detach().to_sparse(), requires_grad=False)   # cannot be read
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,     # the workers import this checkout's core
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    try:
        with pytest.raises(RuntimeError, match="kept"):
            spectra_on(OnRay(True, "cpu"), Weights.of_model(loaded), groups=4, keep=True)
        module.weight = dense                                                            # the cause removed
        seen: list[int] = []
        got = spectra_on(OnRay(True, "cpu"), Weights.of_model(loaded), groups=4, keep=True,
                         progress=lambda done, total, _: seen.append(done))
    finally:
        ray.shutdown()
    assert 0 < seen[0] < len(want), seen           # the rerun started from the kept spectra
    assert [s.info.name for s in got] == [s.info.name for s in want]
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a.eigs, b.eigs)


# --- several devices read their own tensors while they work ------------------------------------

def test_several_devices_read_their_own_tensors_within_the_budget_and_report_progress():
    from core.analysis import Weights, spectra_on
    from core.executor import Devices

    torch.manual_seed(0)
    infos = [MatrixInfo(f"m{i}", i, "x", 32, 16) for i in range(12)]
    weights = {i.name: torch.randn(i.rows, i.cols) for i in infos}
    readers: set[str] = set()

    def read(name):                     # the checkpoint, one tensor at a time
        readers.add(threading.current_thread().name)
        return weights[name]

    seen: list[tuple[int, int]] = []
    got = spectra_on(Devices(["cpu", "cpu"]), Weights(infos, "fake", "fake:budget", read=read),
                     budget_bytes=3 * 32 * 16 * 8, progress=lambda done, total, _: seen.append((done, total)))
    want = compute_spectra(((i, weights[i.name]) for i in infos), device="cpu", workers=1)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a.eigs, b.eigs)
    assert seen and seen[-1] == (12, 12)
    assert len({d for d, _ in seen}) > 3              # matrix by matrix, not one step at the end
    assert len(readers) == 2 and threading.current_thread().name not in readers    # each device reads its own
