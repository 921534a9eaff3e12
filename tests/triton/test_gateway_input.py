"""The gateway's edge, without Triton: what it refuses before any Triton call. The real app on a
real uvicorn server (in a thread) over a tiny repository, with nothing listening at its Triton
address, so a body that passes validation gets 503: strict numbers and booleans (true, "2", 2.5
are not a top_n), 415 for a body that is not JSON, and FastAPI's own errors (a body that is not
UTF-8, an unknown route) in the {"message"} shape of every other 4xx. The command refuses an empty
API key (option or variable) and an address it cannot listen on, with one line, before serving."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from click.testing import CliRunner

requests = pytest.importorskip("requests")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from resrank_export.cli import main  # noqa: E402
from resrank_export.triton.gateway import API_KEY_ENV  # noqa: E402
from resrank_export.triton.server import free_port  # noqa: E402

API_KEY = "edge-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
GOOD = {"query": "json", "documents": ["ok", "fine"]}


@pytest.fixture(scope="module")
def gateway_url(tiny_build, tiny_index, tmp_path_factory):
    from resrank_export.triton.config import TritonConfig
    from resrank_export.triton.gateway import GatewayConfig, create_app
    from resrank_export.triton.repository import write_repository

    repository = tmp_path_factory.mktemp("gateway-edge") / "repository"
    write_repository(TritonConfig(build=tiny_build, out=repository, index=tiny_index))
    config = GatewayConfig(repository=repository, triton_url=f"127.0.0.1:{free_port()}", port=free_port(),
                           api_key=API_KEY, timeout_s=5)
    server = uvicorn.Server(uvicorn.Config(create_app(config), host=config.host, port=config.port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "gateway did not start"
        time.sleep(0.1)
    yield f"http://127.0.0.1:{config.port}"
    server.should_exit = True
    thread.join(30)


def _post(url: str, body, **headers):
    return requests.post(f"{url}/v1/rerank", json=body, headers={**AUTH, **headers}, timeout=30)


def test_a_valid_body_reaches_triton(gateway_url):
    """The reference for the refusals below: a body that passes validation gets Triton's 503."""
    answer = _post(gateway_url, {**GOOD, "top_n": 1, "return_documents": True})
    assert answer.status_code == 503 and "unavailable" in answer.json()["message"]


@pytest.mark.parametrize("field, value", [("top_n", True), ("top_n", "2"), ("top_n", 2.5), ("top_n", 2.0),
                                          ("return_documents", "yes"), ("return_documents", 1)])
def test_numbers_and_booleans_are_strict(gateway_url, field, value):
    answer = _post(gateway_url, {**GOOD, field: value})
    assert answer.status_code == 422, answer.text
    assert answer.json()["message"].startswith(f"{field}: ")


def test_search_top_k_is_strict(gateway_url):
    answer = requests.post(f"{gateway_url}/v1/search", json={"query": "json", "top_k": True}, headers=AUTH, timeout=30)
    assert answer.status_code == 422 and answer.json()["message"].startswith("top_k: "), answer.text


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "application/xml"])
def test_a_body_that_is_not_json_gets_415(gateway_url, content_type):
    import json

    answer = requests.post(f"{gateway_url}/v1/rerank", data=json.dumps(GOOD),
                           headers={**AUTH, "Content-Type": content_type}, timeout=30)
    assert answer.status_code == 415, answer.text
    assert content_type in answer.json()["message"] and "application/json" in answer.json()["message"]


def test_fastapi_errors_have_the_message_shape(gateway_url):
    not_utf8 = requests.post(f"{gateway_url}/v1/rerank", data=b'{"query": "\xff\xfe", "documents": ["ok"]}',
                             headers={**AUTH, "Content-Type": "application/json"}, timeout=30)
    assert not_utf8.status_code == 400 and set(not_utf8.json()) == {"message"}
    assert "UTF-8" in not_utf8.json()["message"]
    missing = requests.get(f"{gateway_url}/v1/nowhere", headers=AUTH, timeout=30)
    assert missing.status_code == 404 and set(missing.json()) == {"message"}


def _gateway(tmp_path, *args: str, env: dict | None = None):
    return CliRunner().invoke(main, ["gateway", "--repository", str(tmp_path / "repository"), *args], env=env)


@pytest.mark.parametrize("how", ["option", "variable"])
def test_an_empty_api_key_is_refused(tmp_path, how):
    args, env = (["--api-key", ""], None) if how == "option" else ([], {API_KEY_ENV: ""})
    result = _gateway(tmp_path, *args, env=env)
    assert result.exit_code == 1, result.output
    assert result.output.count("\n") == 1 and result.output.startswith("error: ")
    assert "--api-key" in result.output and "empty" in result.output


def test_an_address_it_cannot_listen_on_is_one_line(tmp_path):
    result = _gateway(tmp_path, "--host", "999.1.1.1")
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert "--host '999.1.1.1'" in result.output
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = _gateway(tmp_path, "--port", str(port))
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert f"--port {port}: cannot listen there" in result.output
