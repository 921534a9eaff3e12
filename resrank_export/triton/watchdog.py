"""`serve`'s watchdog for the python-backend stubs. Triton never restarts a stub that died (an
OOM kill, a crash in a native library, kill -9): every request to its model then fails with
`Stub process '<instance>' is not healthy` while the server and the model still report ready.
The watchdog counts the stub processes under tritonserver; when a model has lost one it unloads
that model (Triton unloads the ensembles over it too, so strict readiness reports not ready) and
loads it again, which starts new stubs. A model that cannot be loaded again (its files broke
meanwhile) stops the server: Triton would report ready without it."""

from __future__ import annotations

import logging
import signal
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from resrank_export.lazy import require

log = logging.getLogger(__name__)
STUB_NAME = "triton_python_backend_stub"
RETRY_DELAYS = (1.0, 2.0, 5.0)  # between failed reloads; after the last one the server is stopped


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
    seconds: float  # from detection until the model (and its ensembles) loaded again


class StubWatchdog:
    """A daemon thread: every `interval` seconds, count the live stubs of each python-backend
    model against its instance count (so a stub that died before the watchdog started counts
    too) and reload each model that is short of one. Reloads go through Triton's
    model-repository API, which `TritonServer` restricts to requests carrying `headers`."""

    def __init__(self, process: subprocess.Popen, http_url: str, headers: dict[str, str], interval: float):
        self.process = process
        self.headers = headers
        self.interval = interval
        self.restores: list[Restore] = []
        self.failure: str | None = None  # why the watchdog stopped the server
        self.http_url = http_url
        self.instances: dict[str, int] = {}
        self._http = require("tritonclient.http", "reloading crashed models")
        self._errors = require("tritonclient.utils", "reloading crashed models").InferenceServerException
        self._client = None  # made and used in the watchdog's thread only: the HTTP client is gevent-based
        self._stop = threading.Event()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="resrank-stub-watchdog", daemon=True)

    def _python_instances(self) -> dict[str, int]:
        """Instance count of every loaded python-backend model, from Triton's own configs."""
        counts = {}
        for entry in self._client.get_model_repository_index(headers=self.headers):
            config = self._client.get_model_config(entry["name"])
            if config.get("backend") == "python":
                counts[entry["name"]] = sum(int(group.get("count", 1)) for group in config.get("instance_group", []))
        return counts

    def start(self) -> "StubWatchdog":
        self._thread.start()
        self._started.wait(timeout=60)
        log.debug("watching the stubs of %s every %.1f s", self.instances, self.interval)
        return self

    def stop(self) -> None:
        """Before stopping the server: its stubs exit then, and must not be reloaded."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=self.interval + 5)

    def short_models(self) -> dict[str, int]:
        """Models with fewer live stubs than instances: {model: live stubs}."""
        live = Counter(stub.model for stub in live_stubs(self.process.pid).values())
        return {model: live[model] for model, count in self.instances.items() if live[model] < count}

    def _run(self) -> None:
        self._client = self._http.InferenceServerClient(self.http_url)
        try:
            try:
                self.instances = self._python_instances()
            except self._errors as exc:  # the server went away while starting: nothing to watch
                log.error("stub watchdog not started: %s", exc.message())
                return
            self._started.set()
            while not self._stop.wait(self.interval) and self.process.poll() is None:
                for model, live in sorted(self.short_models().items()):
                    if self._stop.is_set() or not self._restore(model, live):
                        return
        finally:
            self._started.set()
            self._client.close()

    def _restore(self, model: str, live: int) -> bool:
        """Unload and load the model; False when the watchdog stopped (or gave up on) the server."""
        log.warning("model %s has %d of %d python-backend stubs running (one exited); reloading it",
                    model, live, self.instances[model])
        detected = time.monotonic()
        for delay in RETRY_DELAYS + (None,):
            try:
                self._client.unload_model(model, headers=self.headers)
                self._client.load_model(model, headers=self.headers)
            except self._errors as exc:
                reason = exc.message().splitlines()[0]
                if delay is None:
                    self.failure = f"model {model} could not be reloaded after its stub exited: {reason}"
                    log.error("%s; stopping tritonserver", self.failure)
                    self.process.send_signal(signal.SIGTERM)
                    return False
                log.error("reloading model %s failed (%s); retrying in %.0f s", model, reason, delay)
                if self._stop.wait(delay) or self.process.poll() is not None:
                    return False
                continue
            seconds = time.monotonic() - detected
            self.restores.append(Restore(model, seconds))
            log.warning("model %s reloaded %.1f s after its stub exited", model, seconds)
            return True
        return False
