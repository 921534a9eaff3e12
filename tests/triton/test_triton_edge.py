"""`serve` and `query` refuse bad input with one line before starting or waiting on anything: a
port outside 0-65535 (it once started a server whose watchdog died, logging "ready" on port
70000), a config.pbtxt that is not a Triton model configuration (named, before tritonserver
starts), and a query with no server listening (the HTTP client's ConnectionRefusedError)."""

from __future__ import annotations

import shutil

import pytest
from click.testing import CliRunner

pytest.importorskip("tritonclient.grpc")

from resrank_export.cli import main  # noqa: E402
from resrank_export.triton.server import ServerConfig, ServerError, TritonServer, free_port  # noqa: E402


def _invoke(*args: str):
    return CliRunner().invoke(main, list(args), prog_name="resrank-export")


@pytest.fixture(scope="module")
def repository(tiny_build, tmp_path_factory):
    from resrank_export.triton.config import TritonConfig
    from resrank_export.triton.repository import write_repository

    out = tmp_path_factory.mktemp("edge") / "repository"
    write_repository(TritonConfig(build=tiny_build, out=out))
    return out


@pytest.mark.parametrize("option", ["--http-port", "--grpc-port", "--metrics-port"])
def test_a_port_past_65535_is_refused_before_starting(repository, option):
    result = _invoke("serve", "--repository", str(repository), option, "70000")
    assert result.exit_code == 2 and option in result.stderr and "65535" in result.stderr
    with pytest.raises(ServerError, match=f"{option} 70000: expected 0"):
        TritonServer(ServerConfig(repository=repository, **{option[2:].replace("-", "_"): 70000}))


def test_a_broken_config_pbtxt_is_named_before_tritonserver_starts(repository, tmp_path):
    broken = tmp_path / "repository"
    shutil.copytree(repository, broken)
    config = broken / "prompt_builder" / "config.pbtxt"
    config.write_text(config.read_text().replace("max_batch_size", "max_batch_sise", 1))
    result = _invoke("serve", "--repository", str(broken), "--http-port", "0", "--grpc-port", "0",
                     "--metrics-port", "0")
    assert result.exit_code == 1 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"error: {config}: not a valid Triton model configuration")
    assert "max_batch_sise" in result.stderr


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_query_without_a_server_is_one_line(protocol):
    url = f"127.0.0.1:{free_port()}"
    result = _invoke("query", "parse json", "--url", url, *(["--grpc"] if protocol == "grpc" else []))
    assert result.exit_code == 1 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"error: Triton at {url} ({protocol}): ")
