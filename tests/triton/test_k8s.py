"""`resrank-export k8s`: manifests for a real model repository (tiny export), validated offline
against the Kubernetes API schemas bundled in kubernetes-validate and the KServe schema, and
checked to reference each other (ports, claim, HPA target, adapter metric name)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

pytest.importorskip("tritonclient.grpc.model_config_pb2")
pytest.importorskip("kubernetes_validate")
yaml = pytest.importorskip("yaml")

from resrank_export.errors import ResRankExportError  # noqa: E402
from resrank_export.triton.config import TritonConfig  # noqa: E402
from resrank_export.triton.k8s import (  # noqa: E402
    ADAPTER_VALUES, QUEUE_METRIC, K8sConfig, validate_folder, validate_resource, write_manifests)
from resrank_export.triton.repository import MARKER_FILE, write_repository  # noqa: E402


@pytest.fixture(scope="module")
def repositories(tiny_build, tmp_path_factory) -> dict[str, Path]:
    """{backend: model repository of the tiny export} for the python and tensorrt flavours."""
    folder = tmp_path_factory.mktemp("k8s-repos")
    for backend in ("python", "tensorrt"):
        write_repository(TritonConfig(build=tiny_build, out=folder / backend, backend=backend))
    return {backend: folder / backend for backend in ("python", "tensorrt")}


@pytest.fixture(scope="module")
def repository(repositories) -> Path:
    return repositories["python"]


def _load(folder: Path) -> dict:
    """{relative file: [resources]} for every YAML file under folder."""
    return {str(p.relative_to(folder)): list(yaml.safe_load_all(p.read_text())) for p in folder.rglob("*.yaml")}


def _one(files: dict, name: str) -> dict:
    (resource,) = files[name]
    return resource


def test_pvc_manifests_validate_and_fit_together(repository, tmp_path):
    out = tmp_path / "k8s"
    write_manifests(K8sConfig(repository=repository, out=out, name="rr", gpus=1, max_replicas=6))
    files = _load(out)
    assert validate_folder(out) == sum(len(v) for k, v in files.items() if k != str(ADAPTER_VALUES)) == 7

    deployment = _one(files, "deployment.yaml")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["startupProbe"]["httpGet"]["path"] == container["readinessProbe"]["httpGet"]["path"] == \
        "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container["readinessProbe"]["httpGet"]["port"] in port_names
    assert f"--http-port={port_names['http']}" in container["args"] and "--strict-readiness=true" in container["args"]
    assert container["resources"]["requests"]["nvidia.com/gpu"] == container["resources"]["limits"]["nvidia.com/gpu"] == 1

    service = _one(files, "service.yaml")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert {p["targetPort"] for p in service["spec"]["ports"]} == set(port_names)

    pvc = _one(files, "pvc.yaml")
    claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert claims == [pvc["metadata"]["name"]] and pvc["spec"]["accessModes"] == ["ReadOnlyMany"]
    assert "--model-repository=/models" in container["args"]

    hpa = _one(files, "hpa.yaml")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["spec"]["maxReplicas"] == 6
    (rule,) = _one(files, str(ADAPTER_VALUES))["rules"]["custom"]
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == rule["name"]["as"] == QUEUE_METRIC
    assert "nv_inference_queue_duration_us" in rule["metricsQuery"] and "nv_inference_request_success" in rule["metricsQuery"]

    isvc = _one(files, "kserve/inferenceservice.yaml")
    model = isvc["spec"]["predictor"]["model"]
    assert model["storageUri"] == f"pvc://{pvc['metadata']['name']}/"
    assert model["readinessProbe"]["httpGet"]["port"] in {p["containerPort"] for p in model["ports"]}
    assert _one(files, "kserve/hpa.yaml")["spec"]["scaleTargetRef"]["name"] == f"{isvc['metadata']['name']}-predictor"
    assert isvc["metadata"]["annotations"]["serving.kserve.io/autoscalerClass"] == "external"


def test_s3_store_has_no_claim(repository, tmp_path):
    out = tmp_path / "k8s"
    write_manifests(K8sConfig(repository=repository, out=out, model_store="s3://bucket/models", s3_secret="aws"))
    files = _load(out)
    assert "pvc.yaml" not in files and "kserve/pvc.yaml" not in files
    assert validate_folder(out) == 5
    (container,) = _one(files, "deployment.yaml")["spec"]["template"]["spec"]["containers"]
    assert "--model-repository=s3://bucket/models" in container["args"]
    assert container["envFrom"] == [{"secretRef": {"name": "aws"}}]
    assert "nvidia.com/gpu" not in container["resources"]["requests"]
    assert _one(files, "kserve/inferenceservice.yaml")["spec"]["predictor"]["model"]["storageUri"] == "s3://bucket/models"


def test_validation_catches_broken_resources(repository, tmp_path):
    """The validators can fail: a wrong type in a Deployment, an unknown field in the
    InferenceService, a misspelt probe field."""
    out = tmp_path / "k8s"
    write_manifests(K8sConfig(repository=repository, out=out))
    files = _load(out)
    deployment = copy.deepcopy(_one(files, "deployment.yaml"))
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(ResRankExportError, match="Deployment resrank: spec.replicas"):
        validate_resource(deployment, "1.31.0")
    probe = copy.deepcopy(_one(files, "deployment.yaml"))
    probe["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {}
    with pytest.raises(ResRankExportError, match="Deployment resrank"):
        validate_resource(probe, "1.31.0")
    isvc = copy.deepcopy(_one(files, "kserve/inferenceservice.yaml"))
    isvc["spec"]["predictor"]["model"]["storageUrl"] = "pvc://x/"
    with pytest.raises(ResRankExportError, match="InferenceService resrank: spec.predictor.model"):
        validate_resource(isvc, "1.31.0")
    (out / "broken.yaml").write_text(yaml.safe_dump(deployment))
    with pytest.raises(ResRankExportError, match="broken.yaml"):
        validate_folder(out)


def test_bad_input_is_refused(repository, repositories, tmp_path):
    with pytest.raises(ResRankExportError, match="resrank_repository.json: not found"):
        write_manifests(K8sConfig(repository=tmp_path, out=tmp_path / "k8s"))
    with pytest.raises(ResRankExportError, match="--memory '8 GB'"):
        write_manifests(K8sConfig(repository=repository, out=tmp_path / "k8s", memory="8 GB"))
    with pytest.raises(ResRankExportError, match="--model-store"):
        write_manifests(K8sConfig(repository=repository, out=tmp_path / "k8s", model_store="gs://bucket"))
    with pytest.raises(ResRankExportError, match="give --gpus N"):
        write_manifests(K8sConfig(repository=repositories["tensorrt"], out=tmp_path / "k8s"))
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(ResRankExportError, match="is not a resrank-export k8s folder"):
        write_manifests(K8sConfig(repository=repository, out=foreign))
    assert not (tmp_path / "k8s").exists() and (foreign / "notes.txt").read_text() == "keep"


def test_cli_writes_valid_manifests(repository, tmp_path):
    from click.testing import CliRunner

    from resrank_export.cli import main

    out = tmp_path / "k8s"
    result = CliRunner().invoke(main, ["k8s", "--repository", str(repository), "--out", str(out), "--gpus", "2",
                                       "--namespace", "search"], prog_name="resrank-export")
    assert result.exit_code == 0, result.output
    assert validate_folder(out) == 7
    deployment = _one(_load(out), "deployment.yaml")
    assert deployment["metadata"]["namespace"] == "search"
    assert deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 2
    result = CliRunner().invoke(main, ["k8s", "--repository", str(tmp_path / "none"), "--out", str(out)])
    assert result.exit_code == 1 and result.output.startswith("error: ") and len(result.output.splitlines()) == 1


def test_remote_shards_get_their_own_servers(tiny_build, tiny_index, tmp_path):
    """A repository whose router asks the shard Services: one Deployment + Service + HPA per shard
    loading only its shard, a front Deployment loading everything else, the Services at the
    router's addresses."""
    from resrank_export.triton.config import parse_config
    from resrank_export.triton.k8s import shard_urls

    config = K8sConfig(repository=tmp_path / "repo", out=tmp_path / "k8s", namespace="search", gpus=1)
    urls = shard_urls(config, 2)
    write_repository(TritonConfig(build=tiny_build, out=config.repository, index=tiny_index, index_shards=2,
                                  shard_urls=tuple(urls)))
    router = parse_config((config.repository / "faiss_lookup" / "config.pbtxt").read_text())
    assert router.parameters["SHARD_URLS"].string_value == ",".join(urls)
    write_manifests(config)
    files = _load(config.out)
    assert validate_folder(config.out) == 7 + 2 * 3

    (front,) = _one(files, "deployment.yaml")["spec"]["template"]["spec"]["containers"]
    loaded = [a.split("=", 1)[1] for a in front["args"] if a.startswith("--load-model=")]
    assert "--model-control-mode=explicit" in front["args"]
    assert sorted(loaded) == sorted(m for m in json.loads((config.repository / MARKER_FILE).read_text())["models"]
                                    if not m.startswith("faiss_lookup_"))
    selectors = [_one(files, "deployment.yaml")["spec"]["selector"]["matchLabels"]]
    for number, url in enumerate(urls):
        shard_deployment, shard_service, shard_hpa = files[f"shard-{number}.yaml"]
        (container,) = shard_deployment["spec"]["template"]["spec"]["containers"]
        assert [a for a in container["args"] if a.startswith("--load-model=")] == [f"--load-model=faiss_lookup_{number}"]
        assert "nvidia.com/gpu" not in container["resources"]["requests"]
        host, port = url.split(":")
        name, namespace = host.split(".")[:2]
        assert (shard_service["metadata"]["name"], shard_service["metadata"]["namespace"]) == (name, namespace)
        assert int(port) in {p["port"] for p in shard_service["spec"]["ports"] if p["name"] == "grpc"}
        assert shard_service["spec"]["selector"] == shard_deployment["spec"]["selector"]["matchLabels"]
        assert shard_hpa["spec"]["scaleTargetRef"]["name"] == shard_deployment["metadata"]["name"]
        selectors.append(shard_deployment["spec"]["selector"]["matchLabels"])
    assert len({tuple(sorted(s.items())) for s in selectors}) == 3  # no Deployment selects another's pods

    with pytest.raises(ResRankExportError, match="shard 0 is asked at 10.0.0.1:8001, not at its Service"):
        write_repository(TritonConfig(build=tiny_build, out=tmp_path / "other", index=tiny_index, index_shards=2,
                                      shard_urls=("10.0.0.1:8001", urls[1])))
        write_manifests(K8sConfig(repository=tmp_path / "other", out=tmp_path / "k8s-other", namespace="search"))
