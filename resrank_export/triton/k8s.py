"""`write_manifests`: a model repository -> Kubernetes manifests that serve it with Triton.

Resources are Python dicts dumped with PyYAML and validated before they are written: the core
kinds against the API schemas bundled in `kubernetes-validate`, the KServe `InferenceService`
against `kserve_inferenceservice.schema.json` (beside this module; KServe ships no offline
schema, so it lists exactly the fields written here). The autoscaler follows Triton's
deploy/k8s-onprem chart: a prometheus-adapter rule turns `nv_inference_queue_duration_us` into
an average queue time per request, and the HorizontalPodAutoscaler targets it per pod.

Output folder (written atomically):
  deployment.yaml, service.yaml, hpa.yaml, [pvc.yaml]   `kubectl apply -f <out>`
  [shard-<i>.yaml]                                      with `triton --shard-url`: one Triton per shard
  kserve/inferenceservice.yaml, kserve/hpa.yaml, [pvc]  `kubectl apply -f <out>/kserve` (instead)
  prometheus-adapter/values.yaml                        `helm install ... -f` (not a resource)
  README.md                                             what to run; marks the folder as ours
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from resrank_export.errors import ResRankExportError
from resrank_export.fs import atomic_dir, refuse_foreign_folder
from resrank_export.lazy import require

log = logging.getLogger(__name__)
README_FILE = "README.md"
KSERVE_SCHEMA = Path(__file__).with_name("kserve_inferenceservice.schema.json")
QUEUE_METRIC = "avg_time_queue_us"  # the adapter's name for queue time per request (as in Triton's chart)
ADAPTER_VALUES = Path("prometheus-adapter") / "values.yaml"
MODELS_MOUNT = "/models"
KSERVE_MODELS_MOUNT = "/mnt/models"  # where KServe's storage initializer puts storageUri
PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
KSERVE_PORTS = {"http": 8080, "grpc": 9000, "metrics": 8002}  # KServe's Triton runtime ports
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|Ki|Mi|Gi|Ti|M|G|T)?$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,50}[a-z0-9])?$")


@dataclass(frozen=True)
class K8sConfig:
    """What `write_manifests` deploys. `model_store` None: the repository lives on a
    PersistentVolumeClaim (copied there by you, see README.md); else Triton reads s3://."""

    repository: Path
    out: Path
    name: str = "resrank"
    namespace: str = "default"
    image: str = "resrank-triton:latest"  # docker/Dockerfile: Triton + this package for the python models
    model_store: str | None = None  # s3://bucket/prefix holding the repository
    s3_secret: str | None = None  # Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_DEFAULT_REGION
    service_account: str | None = None  # pods' ServiceAccount (KServe's storage initializer takes S3
    # credentials from the one named here)
    storage: str = "20Gi"  # PersistentVolumeClaim size
    storage_class: str | None = None
    gpus: int = 0  # nvidia.com/gpu per pod
    cpu: str = "2"
    memory: str = "8Gi"
    shm: str = "1Gi"  # /dev/shm: the python backend passes tensors through shared memory
    min_replicas: int = 1
    max_replicas: int = 4
    # Requests wait in the queue while a model runs (plus max_queue_delay_us where one is set);
    # scale out when the average wait is well past one model run.
    queue_target_us: int = 10_000
    startup_seconds: int = 900  # loading graphs and the index can take minutes
    kubernetes_version: str = "1.31.0"  # API schemas the manifests are validated against

    def validate(self) -> None:
        if not _DNS_LABEL.match(self.name):
            raise ResRankExportError(f"--name {self.name!r}: expected a DNS label (lowercase letters, digits, '-')")
        if not _DNS_LABEL.match(self.namespace):
            raise ResRankExportError(f"--namespace {self.namespace!r}: expected a DNS label")
        for field in ("storage", "cpu", "memory", "shm"):
            if not _QUANTITY.match(getattr(self, field)):
                raise ResRankExportError(f"--{field} {getattr(self, field)!r}: expected a Kubernetes quantity "
                                         "such as 500m, 2, 8Gi")
        if self.model_store is not None and not re.match(r"^s3://[^/]+", self.model_store):
            raise ResRankExportError(f"--model-store {self.model_store!r}: expected s3://bucket[/prefix]")
        if self.s3_secret is not None and self.model_store is None:
            raise ResRankExportError("--s3-secret is only used with --model-store s3://...")
        if self.gpus < 0 or self.min_replicas < 1 or self.max_replicas < self.min_replicas:
            raise ResRankExportError(f"expected gpus >= 0 and 1 <= min replicas <= max replicas; got gpus "
                                     f"{self.gpus}, replicas {self.min_replicas}..{self.max_replicas}")
        if self.queue_target_us < 1 or self.startup_seconds < 10:
            raise ResRankExportError("queue target must be >= 1 us and startup time >= 10 s")


def read_repository(repository: Path) -> dict:
    """The repository's marker summary, plus `needs_gpu` (a tensorrt backend or KIND_GPU instances)."""
    from resrank_export.triton.config import parse_config
    from resrank_export.triton.repository import MARKER_FILE

    marker = Path(repository) / MARKER_FILE
    if not marker.is_file():
        raise ResRankExportError(f"{marker}: not found; --repository must be a folder written by "
                                 "`resrank-export triton` (or <build>/model_repository)")
    summary = json.loads(marker.read_text())
    kinds = {group.kind for path in Path(repository).glob("*/config.pbtxt")
             for group in parse_config(path.read_text()).instance_group}
    gpu_kind = require("tritonclient.grpc.model_config_pb2", "reading Triton configs").ModelInstanceGroup.KIND_GPU
    summary["needs_gpu"] = summary.get("backend") == "tensorrt" or gpu_kind in kinds
    return summary


def _labels(config: K8sConfig, server: str | None = None) -> dict:
    """`server`: the Deployment's name (default the front server's), so each selects only its pods."""
    return {"app.kubernetes.io/name": config.name, "app.kubernetes.io/instance": server or config.name,
            "app.kubernetes.io/component": "triton", "app.kubernetes.io/managed-by": "resrank-export"}


def _metadata(config: K8sConfig, name: str | None = None, server: str | None = None) -> dict:
    return {"name": name or config.name, "namespace": config.namespace, "labels": _labels(config, server)}


def shard_server_name(config: K8sConfig, number: int) -> str:
    return f"{config.name}-shard-{number}"


def shard_urls(config: K8sConfig, shards: int) -> list[str]:
    """The gRPC addresses of the shard Services this module writes: what `triton --shard-url` takes."""
    return [f"{shard_server_name(config, n)}.{config.namespace}.svc.cluster.local:{PORTS['grpc']}"
            for n in range(shards)]


def _claim_name(config: K8sConfig) -> str:
    return f"{config.name}-models"


def _resources(config: K8sConfig, gpus: int) -> dict:
    requests = {"cpu": config.cpu, "memory": config.memory}
    limits = {"memory": config.memory}
    if gpus:  # extended resources: requests must equal limits
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = gpus
    return {"requests": requests, "limits": limits}


def _probes(port: str | int, startup_seconds: int) -> dict:
    """Triton's own health endpoints: ready = every model loaded (with --strict-readiness), live =
    the process serves. The startup probe holds the other two off while models load."""
    def probe(path: str, period: int, failures: int) -> dict:
        return {"httpGet": {"path": path, "port": port}, "periodSeconds": period, "timeoutSeconds": 5,
                "failureThreshold": failures}

    return {"startupProbe": probe("/v2/health/ready", 10, max(1, startup_seconds // 10)),
            "readinessProbe": probe("/v2/health/ready", 5, 3),
            "livenessProbe": probe("/v2/health/live", 10, 3)}


def _server_args(model_repository: str, ports: dict) -> list[str]:
    return [f"--model-repository={model_repository}", f"--http-port={ports['http']}",
            f"--grpc-port={ports['grpc']}", f"--metrics-port={ports['metrics']}", "--allow-metrics=true",
            "--strict-readiness=true", "--exit-on-error=true", "--log-format=ISO8601"]


def _store(config: K8sConfig) -> tuple[str, list[dict], list[dict], list[dict]]:
    """(model repository argument, volumes, volume mounts, envFrom) of the plain Deployment."""
    shm_volume = {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": config.shm}}
    shm_mount = {"name": "dshm", "mountPath": "/dev/shm"}
    if config.model_store is not None:
        env_from = [{"secretRef": {"name": config.s3_secret}}] if config.s3_secret else []
        return config.model_store, [shm_volume], [shm_mount], env_from
    models = {"name": "models", "persistentVolumeClaim": {"claimName": _claim_name(config), "readOnly": True}}
    mount = {"name": "models", "mountPath": MODELS_MOUNT, "readOnly": True}
    return MODELS_MOUNT, [shm_volume, models], [shm_mount, mount], []


def deployment(config: K8sConfig, server: str | None = None, load: list[str] | None = None,
               gpus: int | None = None) -> dict:
    """Triton on the repository; `load` given: only those models (explicit model control), as
    the front server and the shard servers of a repository written with `--shard-url` do."""
    repository, volumes, mounts, env_from = _store(config)
    args = _server_args(repository, PORTS)
    if load is not None:
        args += ["--model-control-mode=explicit"] + [f"--load-model={model}" for model in load]
    container = {
        "name": "tritonserver", "image": config.image, "imagePullPolicy": "IfNotPresent",
        "command": ["tritonserver"], "args": args,
        "ports": [{"name": name, "containerPort": port} for name, port in PORTS.items()],
        "resources": _resources(config, config.gpus if gpus is None else gpus), "volumeMounts": mounts,
        **_probes("http", config.startup_seconds),
    }
    if env_from:
        container["envFrom"] = env_from
    pod = {"containers": [container], "volumes": volumes, "terminationGracePeriodSeconds": 40}
    if config.service_account:
        pod["serviceAccountName"] = config.service_account
    # Prometheus scrapes Triton's metrics port; the adapter rule below reads the queue-time series.
    annotations = {"prometheus.io/scrape": "true", "prometheus.io/port": str(PORTS["metrics"]),
                   "prometheus.io/path": "/metrics"}
    labels = _labels(config, server)
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _metadata(config, server, server),
            "spec": {"replicas": config.min_replicas, "selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels, "annotations": annotations},
                                  "spec": pod}}}


def service(config: K8sConfig, server: str | None = None) -> dict:
    ports = [{"name": name, "port": port, "targetPort": name, "protocol": "TCP"} for name, port in PORTS.items()]
    return {"apiVersion": "v1", "kind": "Service", "metadata": _metadata(config, server, server),
            "spec": {"type": "ClusterIP", "selector": _labels(config, server), "ports": ports}}


def persistent_volume_claim(config: K8sConfig) -> dict:
    """ReadOnlyMany: every replica mounts the same repository."""
    spec = {"accessModes": ["ReadOnlyMany"], "resources": {"requests": {"storage": config.storage}}}
    if config.storage_class:
        spec["storageClassName"] = config.storage_class
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": _metadata(config, _claim_name(config)),
            "spec": spec}


def autoscaler(config: K8sConfig, deployment_name: str) -> dict:
    """autoscaling/v2 on the per-pod average queue time per request (microseconds)."""
    metric = {"type": "Pods", "pods": {"metric": {"name": QUEUE_METRIC},
                                       "target": {"type": "AverageValue", "averageValue": config.queue_target_us}}}
    return {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
            "metadata": _metadata(config, deployment_name, deployment_name),
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment_name},
                     "minReplicas": config.min_replicas, "maxReplicas": config.max_replicas, "metrics": [metric]}}


def adapter_values(config: K8sConfig) -> dict:
    """prometheus-adapter Helm values: queue-time increase over requests served in 30 s, per pod
    (the rule of Triton's deploy/k8s-onprem chart; 1 + ... avoids dividing by zero when idle)."""
    labels = f'namespace="{config.namespace}",pod!=""'
    query = ("avg(delta(nv_inference_queue_duration_us{<<.LabelMatchers>>}[30s])"
             "/(1+delta(nv_inference_request_success{<<.LabelMatchers>>}[30s]))) by (<<.GroupBy>>)")
    rule = {"seriesQuery": f"nv_inference_queue_duration_us{{{labels}}}",
            "resources": {"overrides": {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}},
            "name": {"matches": "nv_inference_queue_duration_us", "as": QUEUE_METRIC},
            "metricsQuery": query}
    return {"rules": {"custom": [rule]}}


def inference_service(config: K8sConfig) -> dict:
    """KServe v1beta1, raw-deployment mode. autoscalerClass external: KServe creates no HPA of its
    own, and kserve/hpa.yaml scales its `<name>-predictor` Deployment on the queue-time metric."""
    storage_uri = config.model_store or f"pvc://{_claim_name(config)}/"
    model = {
        "modelFormat": {"name": "triton"}, "protocolVersion": "v2", "storageUri": storage_uri, "image": config.image,
        "command": ["tritonserver"], "args": _server_args(KSERVE_MODELS_MOUNT, KSERVE_PORTS),
        "ports": [{"name": "h2c" if name == "grpc" else name, "containerPort": port, "protocol": "TCP"}
                  for name, port in KSERVE_PORTS.items() if name != "metrics"],
        "resources": _resources(config, config.gpus), **_probes(KSERVE_PORTS["http"], config.startup_seconds),
    }
    annotations = {"serving.kserve.io/deploymentMode": "RawDeployment",
                   "serving.kserve.io/autoscalerClass": "external",
                   "prometheus.io/scrape": "true", "prometheus.io/port": str(KSERVE_PORTS["metrics"])}
    predictor = {"minReplicas": config.min_replicas, "maxReplicas": config.max_replicas, "model": model}
    if config.service_account:
        predictor["serviceAccountName"] = config.service_account
    return {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService",
            "metadata": {**_metadata(config), "annotations": annotations}, "spec": {"predictor": predictor}}


def manifests(config: K8sConfig, summary: dict) -> dict[Path, list[dict]]:
    """{file under out: resources} for both variants (without the adapter values). A repository
    whose router asks remote shards (`triton --shard-url`) gets a front Deployment without the
    shard models and shard-<i>.yaml per shard (Deployment, Service, HPA; no GPU: FAISS on CPU)."""
    from resrank_export.triton.shards import shard_model_name

    pvc = [] if config.model_store is not None else [persistent_volume_claim(config)]
    urls = summary.get("shard_urls") or []
    shard_models = [shard_model_name(n) for n in range(len(urls))]
    front = [m for m in summary["models"] if m not in shard_models] if urls else None
    files = {Path("deployment.yaml"): [deployment(config, load=front)], Path("service.yaml"): [service(config)],
             Path("hpa.yaml"): [autoscaler(config, config.name)],
             Path("kserve/inferenceservice.yaml"): [inference_service(config)],
             Path("kserve/hpa.yaml"): [autoscaler(config, f"{config.name}-predictor")]}
    if pvc:
        files[Path("pvc.yaml")] = files[Path("kserve/pvc.yaml")] = pvc
    for number, model in enumerate(shard_models):
        server = shard_server_name(config, number)
        files[Path(f"shard-{number}.yaml")] = [deployment(config, server, load=[model], gpus=0),
                                               service(config, server), autoscaler(config, server)]
    return files


def check_shard_urls(config: K8sConfig, urls: list[str]) -> None:
    """The router's addresses must be the shard Services written here (short or full DNS name)."""
    for number, (url, expected) in enumerate(zip(urls, shard_urls(config, len(urls)))):
        host, port = expected.rsplit(":", 1)
        service_name = shard_server_name(config, number)
        names = {service_name, f"{service_name}.{config.namespace}", f"{service_name}.{config.namespace}.svc", host}
        if url not in {f"{name}:{port}" for name in names}:
            raise ResRankExportError(
                f"{config.repository}: shard {number} is asked at {url}, not at its Service {expected}; rewrite the "
                "repository with " + " ".join(f"--shard-url {u}" for u in shard_urls(config, len(urls))))


def validate_resource(resource: dict, kubernetes_version: str) -> None:
    """Raise ResRankExportError naming the resource and the failing field."""
    kind, name = resource.get("kind"), resource.get("metadata", {}).get("name")
    if kind == "InferenceService":
        jsonschema = require("jsonschema", "validating the KServe InferenceService")
        error = jsonschema.exceptions.best_match(
            jsonschema.Draft202012Validator(json.loads(KSERVE_SCHEMA.read_text())).iter_errors(resource))
        if error is not None:
            path = ".".join(str(p) for p in error.absolute_path) or "(root)"
            raise ResRankExportError(f"InferenceService {name}: {path}: {error.message}")
        return
    validator = require("kubernetes_validate", "validating Kubernetes manifests")
    try:
        validator.validate(resource, kubernetes_version, strict=True)
    except validator.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path) or "(root)"
        raise ResRankExportError(f"{kind} {name}: {path}: {exc.message}") from None
    except validator.SchemaNotFoundError as exc:
        raise ResRankExportError(f"{kind} {name}: no schema for Kubernetes {kubernetes_version}: {exc}") from None


def validate_folder(folder: Path, kubernetes_version: str = K8sConfig.kubernetes_version) -> int:
    """Validate every resource of every manifest under `folder`; returns how many were checked."""
    yaml = require("yaml", "reading Kubernetes manifests")
    count = 0
    for path in sorted(Path(folder).rglob("*.yaml")):
        if path.relative_to(folder) == ADAPTER_VALUES:
            continue
        for resource in yaml.safe_load_all(path.read_text()):
            try:
                validate_resource(resource, kubernetes_version)
            except ResRankExportError as exc:
                raise ResRankExportError(f"{path}: {exc}") from None
            count += 1
    return count


def _readme(config: K8sConfig, summary: dict) -> str:
    copy = ("Triton reads the repository from " + config.model_store if config.model_store else
            f"Copy the repository into the claim first, e.g. from a pod that mounts `{_claim_name(config)}` "
            f"read-write: `kubectl cp {config.repository} <pod>:/models`")
    return "\n".join([
        f"# Kubernetes manifests for {config.name}", "",
        f"Written by `resrank-export k8s` from `{config.repository}` (models: {', '.join(summary['models'])}).", "",
        f"- {copy}.",
        "- Plain Deployment: `kubectl apply -f .` (Deployment, Service, HPA, PVC"
        + (f"; shard-<i>.yaml: one Triton per index shard, the router's {len(summary['shard_urls'])} addresses"
           if summary.get("shard_urls") else "") + ").",
        "- KServe instead: `kubectl apply -f kserve/`.",
        f"- Autoscaling needs Prometheus scraping port {PORTS['metrics']} and prometheus-adapter with "
        f"`helm install prometheus-adapter prometheus-community/prometheus-adapter -f {ADAPTER_VALUES}`.", ""])


def write_manifests(config: K8sConfig) -> dict:
    """Build, validate and write the manifests to `config.out`; returns {file: [kinds]}."""
    config.validate()
    summary = read_repository(config.repository)
    if summary["needs_gpu"] and not config.gpus:
        raise ResRankExportError(f"{config.repository}: its models run on GPUs (backend {summary['backend']} or "
                                 "KIND_GPU instances); give --gpus N")
    yaml = require("yaml", "writing Kubernetes manifests")
    refuse_foreign_folder(config.out, README_FILE, "a resrank-export k8s folder")
    check_shard_urls(config, summary.get("shard_urls") or [])
    files = manifests(config, summary)
    for resources in files.values():
        for resource in resources:
            validate_resource(resource, config.kubernetes_version)
    with atomic_dir(config.out) as work:
        for name, resources in {**files, ADAPTER_VALUES: [adapter_values(config)]}.items():
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            (work / name).write_text(yaml.safe_dump_all(resources, sort_keys=False))
        (work / README_FILE).write_text(_readme(config, summary))
    written = {str(name): [r["kind"] for r in resources] for name, resources in files.items()}
    log.info("Kubernetes manifests for %s written to %s", config.repository, config.out)
    return written
