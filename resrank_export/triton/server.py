"""Launcher for the real `tritonserver` binary shipped in the nvidia-pytriton wheel: a writable
python-backend folder with the stub for this Python, an environment that makes the stub use this
interpreter's packages, free loopback ports, a readiness wait that scans the log (a stub that
cannot start makes Triton wait forever), a watchdog that reloads a model whose stub died, and a
clean stop. Models load in explicit mode so that the watchdog can reload one; the
model-repository API is restricted to a per-server key that only the watchdog holds."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from resrank_export.errors import MissingDependencyError, ResRankExportError
from resrank_export.lazy import require

log = logging.getLogger(__name__)
# Log lines after which the server will never become ready.
FATAL_LOG_PATTERNS = ("error while loading shared libraries", "failed to load", "Traceback (most recent call last)")
# Triton's line for a model that failed to load; the reason is a quoted string with escaped newlines.
LOAD_FAILURE = re.compile(r"failed to load '([^']+)' version \d+: (?:[A-Za-z]+: )?(.*?)(?:\\n|\"?$)", re.M)
REPOSITORY_KEY_HEADER = "resrank-repository-key"
DOCKER_IMAGE = "nvcr.io/nvidia/tritonserver:24.10-py3"


class ServerError(ResRankExportError):
    """tritonserver did not start, or stopped while it should be serving."""


@dataclass(frozen=True)
class ServerConfig:
    repository: Path
    host: str = "127.0.0.1"
    http_port: int = 0  # 0: a free port
    grpc_port: int = 0
    metrics_port: int = 0
    startup_timeout: float = 180.0
    exit_timeout: int = 10
    log_verbose: int = 0
    watchdog_interval: float = 0.5  # seconds between looks at the stubs; 0: no watchdog


@dataclass(frozen=True)
class TritonInstall:
    binary: Path
    python_backend: Path
    stub: Path
    caches: Path

    @classmethod
    def find(cls) -> "TritonInstall":
        spec = importlib.util.find_spec("pytriton")  # finds the wheel without importing pytriton
        if spec is None or spec.origin is None:
            raise MissingDependencyError("serving needs the 'nvidia-pytriton' package (its wheel ships tritonserver); "
                                         "pip install 'resrank-export[triton]'")
        root = Path(spec.origin).parent / "tritonserver"
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        install = cls(root / "bin" / "tritonserver", root / "backends" / "python",
                      root / "python_backend_stubs" / version / "triton_python_backend_stub", root / "caches")
        for path in (install.binary, install.python_backend, install.stub):
            if not path.exists():
                raise MissingDependencyError(f"{path}: not found in the nvidia-pytriton wheel (Python {version})")
        return install


def check_stub_numpy(version: str) -> None:
    """The python-backend stub of every nvidia-pytriton wheel so far is built with pybind11 < 2.12,
    which reads numpy 1's array layout: under numpy 2 every string tensor arrives garbled
    (`unpack_from requires a buffer of at least ...`) or the stub dies. Refuse before starting."""
    if int(version.split(".")[0]) >= 2:
        raise MissingDependencyError(f"numpy {version} is installed, but tritonserver's python-backend stub "
                                     "(nvidia-pytriton) garbles string tensors with numpy 2; pip install 'numpy<2'")


def check_model_configs(repository: Path) -> None:
    """Every <model>/config.pbtxt parses as Triton's ModelConfig (the same protobuf Triton reads):
    an edited or truncated file is one line naming it, not Triton's "failed to load" without it."""
    from google.protobuf import text_format

    model_config_pb2 = require("tritonclient.grpc.model_config_pb2", "serving (pip install 'resrank-export[triton]')")
    for path in sorted(repository.glob("*/config.pbtxt")):
        try:
            text_format.Parse(path.read_text(encoding="utf-8"), model_config_pb2.ModelConfig())
        except (text_format.ParseError, UnicodeDecodeError) as exc:
            raise ServerError(f"{path}: not a valid Triton model configuration ({exc})") from None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _backend_dir(install: TritonInstall, work: Path) -> Path:
    """<work>/backends/python: the backend library beside the stub for this Python (the backend
    looks for the stub next to itself). Symlinks keep the stub's $ORIGIN RPATH valid."""
    python = work / "backends" / "python"
    python.mkdir(parents=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        (python / name).symlink_to(install.python_backend / name)
    (python / install.stub.name).symlink_to(install.stub)
    return python.parent


def _environment() -> dict[str, str]:
    """The stub embeds libpython and finds its packages through `python3` on PATH, so this
    interpreter's lib folder goes first on LD_LIBRARY_PATH and its bin folder first on PATH."""
    env = os.environ.copy()
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    env["LD_LIBRARY_PATH"] = ":".join(p for p in (libdir, env.get("LD_LIBRARY_PATH", "")) if p)
    env["PATH"] = os.pathsep.join((str(Path(sys.executable).parent), env.get("PATH", "")))
    return env


class TritonServer:
    """A running tritonserver; use as a context manager or call start()/stop()."""

    def __init__(self, config: ServerConfig):
        for name in ("http", "grpc", "metrics"):
            port = getattr(config, f"{name}_port")
            if not 0 <= port <= 65535:
                raise ServerError(f"--{name}-port {port}: expected 0 (a free port) to 65535")
        self.config = config
        self.process: subprocess.Popen | None = None
        self.ports = {name: getattr(config, f"{name}_port") or free_port(config.host)
                      for name in ("http", "grpc", "metrics")}
        self._work: Path | None = None
        self._log_handle = None
        self.repository_key = secrets.token_hex(16)
        self.watchdog = None

    @property
    def http_url(self) -> str:
        return f"{self.config.host}:{self.ports['http']}"

    @property
    def grpc_url(self) -> str:
        return f"{self.config.host}:{self.ports['grpc']}"

    @property
    def log_path(self) -> Path:
        return self._work / "tritonserver.log"

    def command(self, install: TritonInstall, backends: Path) -> list[str]:
        c, host = self.config, self.config.host
        return [str(install.binary), f"--model-repository={Path(c.repository).resolve()}",
                f"--backend-directory={backends}", f"--cache-directory={install.caches}",
                f"--http-address={host}", f"--http-port={self.ports['http']}",
                f"--grpc-address={host}", f"--grpc-port={self.ports['grpc']}",
                f"--metrics-address={host}", f"--metrics-port={self.ports['metrics']}",
                "--allow-gpu-metrics=false", "--pinned-memory-pool-byte-size=0", "--cuda-memory-pool-byte-size=0:0",
                "--strict-readiness=true", "--exit-on-error=true", f"--exit-timeout-secs={c.exit_timeout}",
                "--model-control-mode=explicit", "--load-model=*",
                f"--http-restricted-api=model-repository:{REPOSITORY_KEY_HEADER}={self.repository_key}",
                f"--grpc-restricted-protocol=model-repository:{REPOSITORY_KEY_HEADER}={self.repository_key}",
                f"--log-verbose={c.log_verbose}"]

    def start(self) -> "TritonServer":
        if not (Path(self.config.repository) / "resrank_repository.json").is_file():
            raise ServerError(f"{self.config.repository}: not a model repository written by `resrank-export triton`")
        check_model_configs(Path(self.config.repository))
        install = TritonInstall.find()
        check_stub_numpy(importlib.metadata.version("numpy"))
        self._work = Path(tempfile.mkdtemp(prefix="resrank-triton-"))
        command = self.command(install, _backend_dir(install, self._work))
        log.debug("starting %s", " ".join(command))
        self._log_handle = open(self.log_path, "wb")
        self.process = subprocess.Popen(command, env=_environment(), stdout=self._log_handle,
                                        stderr=subprocess.STDOUT, start_new_session=True,
                                        preexec_fn=_die_with_parent)
        try:
            self._wait_ready()
            if self.config.watchdog_interval > 0:
                from resrank_export.triton.watchdog import StubWatchdog

                self.watchdog = StubWatchdog(self.process, self.http_url, {REPOSITORY_KEY_HEADER: self.repository_key},
                                             self.config.watchdog_interval).start()
        except BaseException:
            self.stop(keep_log=True)
            raise
        log.info("tritonserver ready: HTTP %s, gRPC %s, metrics %s:%d", self.http_url, self.grpc_url,
                 self.config.host, self.ports["metrics"])
        return self

    def _log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.config.startup_timeout
        url = f"http://{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"tritonserver exited with code {self.process.returncode} while starting; "
                                  f"log {self.log_path}:\n{self._log_tail()}")
            text = self.log_path.read_text(errors="replace")
            failure = LOAD_FAILURE.search(text)
            if failure is not None:  # one line: the model and its first error line (our models name the file)
                reason = re.sub(r"\\(.)", r"\1", failure.group(2))  # Triton's quoting: \" and \\
                raise ServerError(f"model {failure.group(1)} failed to load: {reason} (log {self.log_path})")
            for pattern in FATAL_LOG_PATTERNS:
                if pattern in text:
                    raise ServerError(f"tritonserver cannot load the repository ({pattern!r}); "
                                      f"log {self.log_path}:\n{self._log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise ServerError(f"tritonserver not ready after {self.config.startup_timeout:.0f}s; log {self.log_path}")

    def check_running(self) -> None:
        if self.process is None or self.process.poll() is not None:
            raise ServerError(f"tritonserver is not running; log {self.log_path}:\n{self._log_tail()}")

    def wait(self) -> int:
        """Block until the server exits (used by `serve`)."""
        return self.process.wait()

    def stop(self, keep_log: bool = False) -> int | None:
        """SIGTERM, then SIGKILL if it does not exit within exit_timeout + 20 s. Close clients
        first: open HTTP keep-alive connections make Triton wait the whole exit timeout."""
        code = None
        if self.watchdog is not None:
            self.watchdog.stop()
            self.watchdog = None
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(self.config.exit_timeout + 20)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
            code = self.process.returncode
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None
        if self._work is not None and not keep_log:
            shutil.rmtree(self._work, ignore_errors=True)
        return code

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop(keep_log=exc[0] is not None)


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it when the process that started it dies, however that
    dies (an OOM kill of `serve` must not leave a server holding the ports, with no watchdog).
    Linux's prctl(PR_SET_PDEATHSIG); elsewhere nothing."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def serve(config: ServerConfig) -> int:
    """`resrank-export serve`: run until Ctrl-C or SIGTERM, then stop cleanly. Both signals get
    explicit handlers (a shell starts background jobs with SIGINT ignored)."""
    server = TritonServer(config).start()

    def forward(signum, frame) -> None:
        log.info("stopping tritonserver")
        if server.watchdog is not None:
            server.watchdog.stop()
        server.process.send_signal(signal.SIGTERM)

    previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        failure = server.watchdog.failure if server.watchdog is not None else None
        code = server.stop()
    log.info("tritonserver exited with code %s", code)
    if failure is not None:
        raise ServerError(failure)
    return code or 0


def docker_command(config: ServerConfig, image: str = DOCKER_IMAGE) -> str:
    """The equivalent NGC container command for a GPU host. The python models need this package
    and its runtime dependencies inside the container; the repository's RESRANK_PACKAGE_PATH
    folder is mounted at the same path."""
    from resrank_export.triton.config import PACKAGE_PARENT

    repo = Path(config.repository).resolve()
    ports = {"http": config.http_port or 8000, "grpc": config.grpc_port or 8001, "metrics": config.metrics_port or 8002}
    publish = " ".join(f"-p 127.0.0.1:{port}:{port}" for port in ports.values())
    return (f"docker run --gpus all --rm --shm-size=1g {publish} -v {repo}:/models:ro "
            f"-v {PACKAGE_PARENT}:{PACKAGE_PARENT}:ro {image} bash -c \"pip install 'tokenizers>=0.21' "
            f"'onnxruntime-gpu>=1.20' 'faiss-cpu>=1.8' 'numpy<2' && tritonserver --model-repository=/models "
            f"--http-port={ports['http']} --grpc-port={ports['grpc']} --metrics-port={ports['metrics']}\"")
