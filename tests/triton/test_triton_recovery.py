"""Faults on a real tritonserver (python backend, CPU) under a few bounded client threads:
kill -9 of each composing model's stub (serve's watchdog must make readiness false, reload the
model and bring traffic back), a server restart mid-load, and corrupt files at startup through
the real `resrank-export serve` CLI. After each fault the same requests must return what they
returned before it. The deadlines asserted are the serving contract (docs/triton.md), not speed;
readiness is checked by the order of what a poller observed (not ready, then ready again), with
the times printed, not by a race against the poll interval."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tritonclient.grpc")
pytest.importorskip("pytriton")
pytest.importorskip("faiss")
pytest.importorskip("psutil")

from resrank_export.triton.client import ResRankClient  # noqa: E402

pytestmark = pytest.mark.slow
REQUEST_TIMEOUT = 10.0  # every client call; a call that hits it is a hang
RECOVERED_WITHIN = 30.0  # after the kill (or the restart)
POLL_SECONDS = 0.01  # between readiness checks: a reload keeps it false for seconds (a stub starting)
SCORE_ATOL = 1e-4
PYTHON_MODELS = ("query_tokenizer", "encoder", "faiss_lookup", "passage_encoder", "prompt_builder", "reranker",
                 "rank_sort")
PASSAGES = ["json.loads parses a JSON document into Python objects", "csv.reader iterates over the rows of a CSV file",
            "os.path.join joins path components"]
# What a client sees while a model is down, restarting or the server is away: all immediate and clear.
OUTAGE_ERRORS = ("is not healthy", "Request for unknown model", "has no available versions", "is not ready",
                 "Connection refused", "failed to connect", "Socket closed", "StatusCode.UNAVAILABLE",
                 "Connection reset", "connection closed", "RemoteDisconnected", "Broken pipe")


def _ready(http_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{http_url}/v2/health/ready", timeout=1) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _ask(client: ResRankClient, kind: str):
    return client.search("how do I parse JSON text", 5) if kind == "search" else client.rerank("read a csv", PASSAGES)


@dataclass
class Load:
    """Client threads (search and rerank, HTTP and gRPC) looping until stopped, and a readiness
    poller; every call is timed and its error kept."""

    http_url: str
    grpc_url: str
    clients: int = 3
    start: float = field(default_factory=time.monotonic)
    calls: list = field(default_factory=list)  # (kind, started, seconds, answer or None, error or None)
    readiness: list = field(default_factory=list)  # (time, ready) at every change

    def __post_init__(self):
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._poll)]
        self._threads += [threading.Thread(target=self._work, args=(i,)) for i in range(self.clients)]
        for thread in self._threads:
            thread.start()

    def _work(self, worker: int) -> None:
        kind = ("search", "rerank")[worker % 2]
        protocol = ("http", "grpc")[(worker // 2) % 2] if worker else "http"
        while not self._stop.is_set():
            # a new client per call: a failed call must not leave the next one a dead connection
            with ResRankClient(self.http_url if protocol == "http" else self.grpc_url, protocol,
                               timeout=REQUEST_TIMEOUT) as client:
                started = time.monotonic()
                try:
                    answer, error = _ask(client, kind), None
                except Exception as exc:  # noqa: BLE001 - every failure is recorded and checked below
                    answer, error = None, f"{type(exc).__name__}: {exc}"
                self.calls.append((kind, started, time.monotonic() - started, answer, error))
            if error is not None:
                time.sleep(0.05)  # a client backing off a little, as real ones do

    def _poll(self) -> None:
        last = None
        while not self._stop.is_set():
            ready = _ready(self.http_url)
            if ready != last:
                self.readiness.append((time.monotonic(), ready))
                last = ready
            time.sleep(POLL_SECONDS)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=REQUEST_TIMEOUT + 5)
        assert not any(thread.is_alive() for thread in self._threads), "a client thread hung"

    def first_ok_after(self, moment: float, kind: str) -> float | None:
        return min((s for k, s, _, answer, _ in self.calls if k == kind and s > moment and answer is not None),
                   default=None)

    def check(self, baseline: dict, fault_at: float) -> dict:
        """No call hung; every error is an outage error; answers equal the baseline; traffic of
        both kinds came back within RECOVERED_WITHIN. Returns the figures."""
        assert self.calls, "no request completed"
        slowest = max(seconds for _, _, seconds, _, _ in self.calls)
        assert slowest < REQUEST_TIMEOUT, f"a request took {slowest:.1f} s"
        errors = [error for *_, error in self.calls if error is not None]
        odd = [e for e in errors if not any(pattern in e for pattern in OUTAGE_ERRORS)]
        assert not odd, f"unexpected errors: {odd[:3]}"
        for kind, _, _, answer, _ in self.calls:
            if answer is not None:
                assert answer.ids == baseline[kind].ids
                np.testing.assert_allclose(answer.scores, baseline[kind].scores, rtol=0, atol=SCORE_ATOL)
        recovered = {kind: self.first_ok_after(fault_at, kind) for kind in baseline}
        for kind, moment in recovered.items():
            assert moment is not None and moment - fault_at < RECOVERED_WITHIN, f"{kind} did not recover"
        return {"calls": len(self.calls), "errors": len(errors), "slowest_s": round(slowest, 2),
                "recovered_s": {kind: round(moment - fault_at, 2) for kind, moment in recovered.items()}}


@pytest.fixture(scope="module")
def recovery_repository(triton_build, triton_index, tmp_path_factory) -> Path:
    from resrank_export.triton.config import TritonConfig
    from resrank_export.triton.repository import write_repository

    repository = tmp_path_factory.mktemp("recovery") / "model_repository"
    write_repository(TritonConfig(build=triton_build, out=repository, index=triton_index, max_batch_size=8))
    return repository


@pytest.fixture(scope="module")
def recovery_server(recovery_repository):
    from resrank_export.triton.server import ServerConfig, TritonServer

    with TritonServer(ServerConfig(repository=recovery_repository)) as server:
        yield server


@pytest.fixture(scope="module")
def baseline(recovery_server) -> dict:
    with ResRankClient(recovery_server.http_url, timeout=REQUEST_TIMEOUT) as client:
        return {kind: _ask(client, kind) for kind in ("search", "rerank")}


@pytest.mark.timeout(120, func_only=True)
@pytest.mark.parametrize("model", PYTHON_MODELS)
def test_stub_kill_under_load_is_detected_and_repaired(recovery_server, baseline, model):
    from resrank_export.triton.watchdog import live_stubs

    server = recovery_server
    server.check_running()
    assert _ready(server.http_url)
    restores = len(server.watchdog.restores)
    load = Load(server.http_url, server.grpc_url)
    try:
        time.sleep(1.0)
        victim = next(stub for stub in live_stubs(server.process.pid).values() if stub.model == model)
        killed_at = time.monotonic()
        os.kill(victim.pid, signal.SIGKILL)
        deadline = killed_at + RECOVERED_WITHIN
        while time.monotonic() < deadline and not (load.readiness[-1][1] and load.readiness[-1][0] > killed_at
                                                   and all(load.first_ok_after(killed_at, k) for k in baseline)):
            time.sleep(0.2)
        time.sleep(1.0)  # traffic after the recovery
    finally:
        load.stop()
    went_down = next((t for t, ready in load.readiness if t > killed_at and not ready), None)
    assert went_down is not None, f"readiness never went false: {load.readiness}"
    back_up = next((t for t, ready in load.readiness if t > went_down and ready), None)
    assert back_up is not None and back_up - killed_at < RECOVERED_WITHIN, f"never ready again: {load.readiness}"
    figures = load.check(baseline, killed_at)
    assert [r.model for r in server.watchdog.restores[restores:]] == [model]
    assert model in {stub.model for stub in live_stubs(server.process.pid).values()}
    print(f"\nkill -9 {victim.instance}: not ready after {went_down - killed_at:.2f} s, ready again after "
          f"{back_up - killed_at:.2f} s, {figures}")


@pytest.mark.timeout(240, func_only=True)
def test_server_restart_mid_load(recovery_server, recovery_repository, baseline):
    """The module's server is stopped under load and a new one starts on the same ports: the
    clients get connection errors meanwhile, and answers again once it is ready."""
    from resrank_export.triton.server import ServerConfig, TritonServer

    old = recovery_server
    ports = dict(old.ports)
    load = Load(old.http_url, old.grpc_url)
    try:
        time.sleep(1.0)
        stopped_at = time.monotonic()
        old.stop()
        config = ServerConfig(repository=recovery_repository, http_port=ports["http"], grpc_port=ports["grpc"],
                              metrics_port=ports["metrics"])
        stop_seconds = time.monotonic() - stopped_at
        with TritonServer(config) as new:
            restarted_at = time.monotonic()
            deadline = restarted_at + RECOVERED_WITHIN
            while time.monotonic() < deadline and not all(load.first_ok_after(restarted_at, k) for k in baseline):
                time.sleep(0.2)
            time.sleep(1.0)
            load.stop()
            new.check_running()
    finally:
        load.stop()
    errors = [error for _, started, _, _, error in load.calls if error is not None and started > stopped_at]
    assert errors, "the clients never noticed the restart"
    figures = load.check(baseline, restarted_at)
    print(f"\nrestart under load: stop {stop_seconds:.1f} s, start {restarted_at - stopped_at - stop_seconds:.1f} s, "
          f"then {figures}")


def _serve(repository: Path, *ports: int, **popen) -> subprocess.Popen:
    """The real CLI, importing this checkout's package."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                       os.environ.get("PYTHONPATH", "")]))
    options = [f"--{name}-port={port}" for name, port in zip(("http", "grpc", "metrics"), ports or (0, 0, 0))]
    return subprocess.Popen([sys.executable, "-m", "resrank_export", "serve", "--repository", str(repository),
                             *options], env=env, stderr=subprocess.PIPE, text=True, **popen)


def _corrupt(path: Path) -> None:
    """Replace the file (unlinked first: repository files are hard links into the build)."""
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(b"\x00corrupt\xff" * 64 + data[: len(data) // 3])


@pytest.mark.timeout(300, func_only=True)
@pytest.mark.parametrize("relative", ["faiss_lookup/1/index/index.faiss", "encoder/1/model.onnx"])
def test_corrupt_file_at_startup_is_one_line_and_nonzero_exit(triton_build, triton_index, tmp_path, relative):
    from resrank_export.triton.config import TritonConfig
    from resrank_export.triton.repository import write_repository

    repository = tmp_path / "model_repository"
    write_repository(TritonConfig(build=triton_build, out=repository, index=triton_index))
    _corrupt(repository / relative)
    serve = _serve(repository)
    _, stderr = serve.communicate(timeout=240)
    lines = stderr.strip().splitlines()
    assert serve.returncode != 0
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert str(repository / relative) in lines[0], lines[0]
    print(f"\n{lines[0]}")


@pytest.mark.timeout(300, func_only=True)
def test_model_that_cannot_be_reloaded_stops_serve(triton_build, triton_index, tmp_path):
    """Its index broke while serving, then its stub died: the reloads fail, and `serve` stops
    with one line naming the model and the file, instead of serving without it."""
    import psutil

    from resrank_export.triton.config import TritonConfig
    from resrank_export.triton.repository import write_repository
    from resrank_export.triton.server import free_port
    from resrank_export.triton.watchdog import live_stubs

    repository = tmp_path / "model_repository"
    write_repository(TritonConfig(build=triton_build, out=repository, index=triton_index))
    ports = [free_port() for _ in range(3)]
    http_url = f"127.0.0.1:{ports[0]}"
    serve = _serve(repository, *ports)
    try:
        deadline = time.monotonic() + 180
        while not _ready(http_url) and serve.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _ready(http_url), "serve never became ready"
        server_pid = psutil.Process(serve.pid).children()[0].pid
        _corrupt(repository / "faiss_lookup/1/index/index.faiss")
        victim = next(stub for stub in live_stubs(server_pid).values() if stub.model == "faiss_lookup")
        killed_at = time.monotonic()
        os.kill(victim.pid, signal.SIGKILL)
        readiness = []  # (seconds after the kill, ready) while serve runs, until it exits or is ready again
        while serve.poll() is None and time.monotonic() < killed_at + 150:
            readiness.append((time.monotonic() - killed_at, _ready(http_url)))
            if readiness[-1][1] and not all(ready for _, ready in readiness):
                break
            time.sleep(0.2)
        went_down = next((i for i, (_, ready) in enumerate(readiness) if not ready), None)
        assert went_down is not None, "readiness never went false"
        ready_after = [t for t, ready in readiness[went_down:] if ready]
        assert not ready_after, f"ready again {ready_after[0]:.1f} s after the kill without faiss_lookup"
        _, stderr = serve.communicate(timeout=30)
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
    assert serve.returncode != 0
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: model faiss_lookup could not be reloaded"), stderr
    assert "index.faiss" in last, last
    print(f"\nexit {serve.returncode} {time.monotonic() - killed_at:.1f} s after the kill: {last}")


@pytest.mark.parametrize("version, refused", [("1.26.4", False), ("1.24.0", False), ("2.0.0", True), ("2.4.6", True)])
def test_numpy_2_is_refused_before_the_stub_garbles_strings(version, refused):
    """Measured: numpy 2.4.6 with nvidia-pytriton 0.5.7 and 0.7.0 breaks every string request."""
    from resrank_export.errors import MissingDependencyError
    from resrank_export.triton.server import check_stub_numpy

    if refused:
        with pytest.raises(MissingDependencyError, match=f"numpy {version} is installed"):
            check_stub_numpy(version)
    else:
        check_stub_numpy(version)


@pytest.mark.timeout(300, func_only=True)
def test_a_killed_serve_takes_its_server_with_it(triton_build, triton_index, tmp_path):
    """kill -9 of `serve` (an OOM kill): tritonserver dies too instead of holding the ports with
    no watchdog left."""
    import psutil

    from resrank_export.triton.config import TritonConfig
    from resrank_export.triton.repository import write_repository
    from resrank_export.triton.server import free_port

    repository = tmp_path / "model_repository"
    write_repository(TritonConfig(build=triton_build, out=repository, index=triton_index))
    ports = [free_port() for _ in range(3)]
    serve = _serve(repository, *ports)
    try:
        deadline = time.monotonic() + 180
        while not _ready(f"127.0.0.1:{ports[0]}") and serve.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _ready(f"127.0.0.1:{ports[0]}"), "serve never became ready"
        server = psutil.Process(serve.pid).children()[0]
        assert "tritonserver" in server.name()
        serve.kill()
        serve.wait()
        gone, _ = psutil.wait_procs([server], timeout=15)
        assert gone, f"tritonserver {server.pid} outlived the serve process that started it"
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
