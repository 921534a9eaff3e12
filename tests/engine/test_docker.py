"""docker/: the Dockerfile is lint-clean (hadolint), the shell scripts pass shellcheck, and the
entrypoint's logic runs on CPU with a fake GPU runtime (environment variables), fake plans and a
fake `tritonserver` that records how it was started."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from resrank_export.engine.manifest import EngineEntry, GpuRuntime, plan_filename, write_engine_manifest
from resrank_export.engine.stage import engines_dir, source_hash

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
RUNTIME = GpuRuntime("10.13.3.9", "NVIDIA L4", "8.9")


def test_dockerfile_is_lint_clean(linter):
    result = subprocess.run([linter("hadolint"), str(DOCKER / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", [DOCKER / "entrypoint.sh", REPO / "scripts" / "gpu_check.sh"])
def test_shell_scripts_pass_shellcheck(linter, script):
    result = subprocess.run([linter("shellcheck"), str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_compose_health_check_probes_triton_readiness():
    yaml = pytest.importorskip("yaml")
    service = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]["resrank"]
    assert "/v2/health/ready" in " ".join(service["healthcheck"]["test"])
    assert service["build"]["dockerfile"] == "docker/Dockerfile"
    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert "nvcr.io/nvidia/tritonserver:25.10-py3" in dockerfile and "tensorrt-cu13==10.13.3.9" in dockerfile


@pytest.fixture()
def served(tiny_export, tmp_path):
    """A build folder with fake plans for RUNTIME, a tensorrt-flavour repository and a fake server."""
    from google.protobuf import text_format

    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    _, graphs = tiny_export()
    build = tmp_path / "build"
    shutil.copytree(graphs["encoder"].parent.parent.parent, build)
    folder = engines_dir(build, "fp32")
    folder.mkdir(parents=True)
    entries = []
    for graph in ("encoder", "reranker"):
        entry = EngineEntry(graph=graph, precision="fp32", plan=plan_filename(graph, RUNTIME),
                            tensorrt_version=RUNTIME.tensorrt_version, gpu_name=RUNTIME.gpu_name,
                            compute_capability=RUNTIME.compute_capability,
                            source_sha256=source_hash(build, "fp32", graph), profile={}, strongly_typed=True,
                            workspace_bytes=1 << 30)
        (folder / entry.plan).write_bytes(b"fake plan")
        entries.append(entry)
    write_engine_manifest(folder, entries)
    repository = tmp_path / "repository"
    for graph in ("encoder", "reranker"):
        (repository / graph).mkdir(parents=True)
        config = model_config_pb2.ModelConfig(name=graph, platform="tensorrt_plan")
        (repository / graph / "config.pbtxt").write_text(text_format.MessageToString(config))
    server = tmp_path / "tritonserver"
    server_log = tmp_path / "server.args"
    server.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > {server_log}\n')
    server.chmod(0o755)
    return build, repository, server, server_log


def _entrypoint(served, runtime: GpuRuntime, *args: str) -> subprocess.CompletedProcess:
    build, repository, server, _ = served
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(REPO), "TRITONSERVER": str(server),
           "RESRANK_BUILD": str(build), "RESRANK_REPOSITORY": str(repository), "RESRANK_PRECISION": "fp32",
           "RESRANK_TENSORRT_VERSION": runtime.tensorrt_version, "RESRANK_GPU_NAME": runtime.gpu_name,
           "RESRANK_GPU_COMPUTE_CAPABILITY": runtime.compute_capability}
    return subprocess.run(["bash", str(DOCKER / "entrypoint.sh"), *args], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.mark.slow
def test_entrypoint_serves_compatible_plans(served):
    from google.protobuf import text_format

    from tritonclient.grpc import model_config_pb2

    build, repository, _, server_log = served
    result = _entrypoint(served, RUNTIME, "--log-verbose=1")
    assert result.returncode == 0, result.stderr
    assert "encoder: keep" in result.stdout and "reranker: keep" in result.stdout
    assert server_log.read_text().splitlines() == [f"--model-repository={repository}", "--log-verbose=1"]
    config = text_format.Parse((repository / "reranker" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert dict(config.cc_model_filenames) == {"8.9": "reranker.sm89.plan"}
    assert (repository / "reranker" / "1" / "reranker.sm89.plan").read_bytes() == b"fake plan"


@pytest.mark.slow
@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed: the entrypoint would really build")
@pytest.mark.parametrize("runtime, reason", [
    (GpuRuntime("10.13.3.9", "NVIDIA H100", "9.0"), "compute capability 9.0"),
    (GpuRuntime("10.14.1.48", "NVIDIA L4", "8.9"), "this machine has TensorRT 10.14.1.48"),
])
def test_entrypoint_rebuilds_incompatible_plans_before_serving(served, runtime, reason):
    """On another GPU or TensorRT release the entrypoint goes on to build (here: fails for want
    of TensorRT, exit code 2) and never starts the server with the old plans."""
    _, _, _, server_log = served
    result = _entrypoint(served, runtime)
    assert result.returncode == 2
    assert "tensorrt" in result.stderr.lower()
    assert not server_log.exists()
    dry = subprocess.run([sys.executable, "-m", "resrank_export", "engines", "ensure", "--build", str(served[0]),
                          "--precision", "fp32", "--dry-run", "--tensorrt-version", runtime.tensorrt_version,
                          "--compute-capability", runtime.compute_capability],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert dry.returncode == 0, dry.stderr
    decisions = [line for line in dry.stdout.splitlines() if line.startswith(("encoder:", "reranker:"))]
    assert len(decisions) == 2 and all(": build - " in line and reason in line for line in decisions)
