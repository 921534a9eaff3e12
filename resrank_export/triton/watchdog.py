"""`serve`'s watchdog for the python-backend stubs. Triton never restarts a stub that died (an
OOM kill, a crash in a native library, kill -9): every request to its model then fails with
`Stub process '<instance>' is not healthy` while the server and the model still report ready.
The watchdog looks at the stub processes under tritonserver; when one has exited it unloads that
model (Triton unloads the ensembles over it too, so strict readiness reports not ready) and
loads it again, which starts new stubs."""

from __future__ import annotations

import itertools
import logging
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from resrank_export.lazy import require

log = logging.getLogger(__name__)
STUB_NAME = "triton_python_backend_stub"
RETRY_DELAYS = (1.0, 2.0, 5.0, 10.0)  # between failed reloads; the last one repeats


@dataclass(frozen=True)
class Stub:
    pid: int
    model: str
    instance: str  # e.g. reranker_0_0, as Triton names it in its errors


def _stub_of(argv: list[str]) -> tuple[str, str] | None:
    """(model, instance) from a stub's command line: `<stub> <repo>/<model>/<version>/model.py
    <shm region> ... <instance name> <runtime>` (python_backend's stub launcher)."""
    if len(argv) < 3 or Path(argv[0]).name != STUB_NAME:
        return None
    model = Path(argv[1]).parent.parent.name
    instance = next((arg for arg in argv[2:] if arg.startswith(f"{model}_")), model)
    return model, instance


def live_stubs(server_pid: int) -> dict[int, Stub]:
    """The running (not exited, not zombie) stub processes under tritonserver, by pid."""
    psutil = require("psutil", "watching the python-backend stubs")
    stubs = {}
    try:
        children = psutil.Process(server_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return stubs
    for child in children:
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                continue
            found = _stub_of(child.cmdline())
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue
        if found is not None:
            stubs[child.pid] = Stub(child.pid, *found)
    return stubs


@dataclass(frozen=True)
class Restore:
    model: str
    instance: str
    seconds: float  # from detection until the model (and its ensembles) loaded again


class StubWatchdog:
    """A daemon thread: every `interval` seconds, compare the live stubs with the last look and
    reload each model that lost one. Reloads go through Triton's model-repository API, which
    `TritonServer` restricts to requests carrying `headers`."""

    def __init__(self, process: subprocess.Popen, http_url: str, headers: dict[str, str], interval: float):
        self.process = process
        self.headers = headers
        self.interval = interval
        self.restores: list[Restore] = []
        self._client = require("tritonclient.http", "reloading crashed models").InferenceServerClient(http_url)
        self._errors = require("tritonclient.utils", "reloading crashed models").InferenceServerException
        self._stop = threading.Event()
        self._known = live_stubs(process.pid)
        self._thread = threading.Thread(target=self._run, name="resrank-stub-watchdog", daemon=True)

    def start(self) -> "StubWatchdog":
        log.debug("watching %d python-backend stubs every %.1f s", len(self._known), self.interval)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Before stopping the server: its stubs exit then, and must not be reloaded."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=self.interval + 5)
        self._client.close()

    def _run(self) -> None:
        while not self._stop.wait(self.interval) and self.process.poll() is None:
            live = live_stubs(self.process.pid)
            lost = {stub.model: stub for pid, stub in self._known.items() if pid not in live}
            for model, stub in sorted(lost.items()):
                if not self._stop.is_set():
                    self._restore(stub)
            # after a reload its model's stubs are new processes: the next look starts from them
            self._known = live_stubs(self.process.pid) if lost else live

    def _restore(self, stub: Stub) -> None:
        log.warning("python-backend stub %s (pid %d) exited; reloading model %s", stub.instance, stub.pid, stub.model)
        detected = time.monotonic()
        for attempt in itertools.count():
            try:
                self._client.unload_model(stub.model, headers=self.headers)
                self._client.load_model(stub.model, headers=self.headers)
            except self._errors as exc:
                delay = RETRY_DELAYS[min(attempt, len(RETRY_DELAYS) - 1)]
                log.error("reloading model %s failed (%s); retrying in %.0f s", stub.model, exc.message(), delay)
                if self._stop.wait(delay) or self.process.poll() is not None:
                    return
                continue
            seconds = time.monotonic() - detected
            self.restores.append(Restore(stub.model, stub.instance, seconds))
            log.warning("model %s reloaded %.1f s after its stub exited", stub.model, seconds)
            return
