"""Triton configs written by write_repository, parsed back and checked against the ONNX graphs
and against each other (every ensemble edge joins tensors of the same dtype and dims)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tritonclient.grpc.model_config_pb2")

from resrank_export.errors import NotAvailableError, ResRankExportError  # noqa: E402
from resrank_export.triton.config import TritonConfig, parse_config  # noqa: E402
from resrank_export.triton.repository import MARKER_FILE, write_repository  # noqa: E402

ONNX_TO_TRITON = {1: "TYPE_FP32", 7: "TYPE_INT64", 6: "TYPE_INT32", 10: "TYPE_FP16"}


def _configs(repo: Path) -> dict:
    return {p.parent.name: parse_config(p.read_text()) for p in repo.glob("*/config.pbtxt")}


def _type_name(data_type: int) -> str:
    from tritonclient.grpc import model_config_pb2 as pb

    return pb.DataType.Name(data_type)


@pytest.fixture(scope="module")
def build_dir(tiny_build) -> Path:
    return tiny_build


@pytest.fixture(scope="module")
def index_dir(tiny_index) -> Path:
    """A 20-passage index of the embedded corpus, so the `resrank` ensemble is written too."""
    return tiny_index


@pytest.mark.parametrize("backend", ["python", "onnxruntime", "tensorrt"])
def test_graph_model_configs_match_onnx(build_dir, tmp_path, backend):
    import onnx

    write_repository(TritonConfig(build=build_dir, out=tmp_path / "repo", backend=backend,
                                  cc_model_filenames={"9.0": "model_sm90.plan"}))
    configs = _configs(tmp_path / "repo")
    for name in ("encoder", "reranker"):
        graph = onnx.load(str(build_dir / "onnx" / "fp32" / f"{name}.onnx"), load_external_data=False).graph
        config = configs[name]
        for tensors, declared in ((graph.input, config.input), (graph.output, config.output)):
            assert [t.name for t in tensors] == [t.name for t in declared]
            for tensor, entry in zip(tensors, declared):
                assert ONNX_TO_TRITON[tensor.type.tensor_type.elem_type] == _type_name(entry.data_type)
                onnx_dims = [d.dim_value if d.dim_value else -1 for d in tensor.type.tensor_type.shape.dim]
                assert onnx_dims[0] == -1 and list(entry.dims) == onnx_dims[1:]
        assert config.dynamic_batching.default_queue_policy.max_queue_size == 64
    platform = {"python": "", "onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan"}[backend]
    assert configs["reranker"].platform == platform
    if backend == "tensorrt":
        assert dict(configs["encoder"].cc_model_filenames) == {"9.0": "model_sm90.plan"}


@pytest.mark.parametrize("ensemble_name", ["resrank", "resrank_rerank"])
def test_ensemble_edges_join_matching_tensors(build_dir, index_dir, tmp_path, ensemble_name):
    summary = write_repository(TritonConfig(build=build_dir, out=tmp_path / "repo", index=index_dir))
    configs = _configs(tmp_path / "repo")
    assert summary["max_top_k"] == 20 and configs["faiss_lookup"].parameters["MAX_TOP_K"].string_value == "20"
    ensemble = configs[ensemble_name]
    assert ensemble.platform == "ensemble"
    produced = {t.name: (t.data_type, list(t.dims)) for t in ensemble.input}
    for step in ensemble.ensemble_scheduling.step:
        model = configs[step.model_name]
        assert model.max_batch_size == ensemble.max_batch_size or step.model_name == "encoder"
        inputs = {t.name: (t.data_type, list(t.dims)) for t in model.input}
        assert set(step.input_map) == set(inputs), step.model_name
        for name, source in step.input_map.items():
            assert produced[source] == inputs[name], (step.model_name, name, source)
        outputs = {t.name: (t.data_type, list(t.dims)) for t in model.output}
        for name, target in step.output_map.items():
            produced[target] = outputs[name]
    for tensor in ensemble.output:
        assert produced[tensor.name] == (tensor.data_type, list(tensor.dims))


def test_python_models_run_package_modules(build_dir, tmp_path):
    import resrank_export.triton.models as models

    write_repository(TritonConfig(build=build_dir, out=tmp_path / "repo"))
    entry = (Path(models.__file__).parent / "entry.py").read_text()
    for name, config in _configs(tmp_path / "repo").items():
        if config.backend != "python":
            continue
        module = config.parameters["RESRANK_MODEL"].string_value
        assert (Path(models.__file__).parent / f"{module}.py").is_file()
        assert (tmp_path / "repo" / name / "1" / "model.py").read_text() == entry


def test_refuses_to_replace_a_foreign_folder(build_dir, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ResRankExportError, match=MARKER_FILE):
        write_repository(TritonConfig(build=build_dir, out=foreign))
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_rewrite_replaces_previous_repository(build_dir, tmp_path):
    repo = tmp_path / "repo"
    write_repository(TritonConfig(build=build_dir, out=repo, backend="onnxruntime"))
    write_repository(TritonConfig(build=build_dir, out=repo, backend="python", max_batch_size=4))
    configs = _configs(repo)
    assert configs["reranker"].backend == "python" and configs["reranker"].max_batch_size == 4
    assert np.array_equal(np.frombuffer((repo / "reranker" / "1" / "model.onnx").read_bytes(), np.uint8),
                          np.frombuffer((build_dir / "onnx" / "fp32" / "reranker.onnx").read_bytes(), np.uint8))


def test_repository_serves_the_requested_precision(build_dir, tmp_path):
    """--precision int8 takes onnx/int8/ (never silently the FP32 graph), and a missing
    precision folder is a one-line error naming the path."""
    import shutil

    import onnx

    build = tmp_path / "build"
    shutil.copytree(build_dir, build)
    with pytest.raises(ResRankExportError, match=r"onnx/int8/encoder\.onnx: graph not found"):
        write_repository(TritonConfig(build=build, out=tmp_path / "missing", precision="int8"))
    (build / "onnx" / "int8").mkdir()
    for name in ("encoder", "reranker"):
        model = onnx.load(str(build / "onnx" / "fp32" / f"{name}.onnx"))
        model.doc_string = "stand-in for the INT8 graph"  # other bytes than the FP32 file
        onnx.save(model, str(build / "onnx" / "int8" / f"{name}.onnx"))
    summary = write_repository(TritonConfig(build=build, out=tmp_path / "repo", precision="int8"))
    assert summary["precision"] == "int8"
    for name in ("encoder", "reranker"):
        served = (tmp_path / "repo" / name / "1" / "model.onnx").read_bytes()
        assert served == (build / "onnx" / "int8" / f"{name}.onnx").read_bytes()
        assert served != (build / "onnx" / "fp32" / f"{name}.onnx").read_bytes()


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_gpu_precisions_on_the_python_backend_are_refused_before_writing(build_dir, tmp_path, precision):
    """The python backend runs its graphs on a CPU runtime, which has no BF16 kernels (nor serves
    FP8: its Q/DQ graph is checked there, not served): refused up front in one line, nothing
    written; the onnxruntime backend (a GPU server) may serve it."""
    for runtime in ("onnxruntime", "openvino"):
        with pytest.raises(NotAvailableError, match=f"{precision} with the python backend: {runtime}"):
            write_repository(TritonConfig(build=build_dir, out=tmp_path / "repo", precision=precision,
                                          cpu_runtime=runtime))
    assert not (tmp_path / "repo").exists()
    with pytest.raises(ResRankExportError, match=rf"onnx/{precision}/encoder\.onnx: graph not found"):
        write_repository(TritonConfig(build=build_dir, out=tmp_path / "repo", precision=precision, backend="onnxruntime"))


def test_tensorrt_flavour_takes_the_recorded_plans(build_dir, tmp_path):
    """Plans recorded in engines/<precision>/engines.json are copied into each model with its own
    cc_model_filenames (one plan per GPU architecture)."""
    import shutil

    from resrank_export.engine.manifest import EngineEntry, write_engine_manifest
    from resrank_export.engine.stage import engines_dir

    build = tmp_path / "build"
    shutil.copytree(build_dir, build)
    folder = engines_dir(build, "fp16")
    folder.mkdir(parents=True)
    entries = []
    for graph in ("encoder", "reranker"):
        for cc in ("8.9", "9.0"):
            plan = f"{graph}.sm{cc.replace('.', '')}.plan"
            (folder / plan).write_bytes(f"{graph} {cc}".encode())
            entries.append(EngineEntry(graph=graph, precision="fp16", plan=plan, tensorrt_version="10.13.3",
                                       gpu_name="test GPU", compute_capability=cc, source_sha256="0" * 64,
                                       profile={}, strongly_typed=True, workspace_bytes=1 << 30))
    write_engine_manifest(folder, entries)
    write_repository(TritonConfig(build=build, out=tmp_path / "repo", backend="tensorrt", precision="fp16"))
    configs = _configs(tmp_path / "repo")
    for graph in ("encoder", "reranker"):
        expected = {"8.9": f"{graph}.sm89.plan", "9.0": f"{graph}.sm90.plan"}
        assert dict(configs[graph].cc_model_filenames) == expected
        for cc, plan in expected.items():
            assert (tmp_path / "repo" / graph / "1" / plan).read_bytes() == f"{graph} {cc}".encode()


def test_session_settings_reach_the_python_models_sessions(build_dir, tmp_path):
    """The parameters written to config.pbtxt, read the way the python model reads them (Triton's
    JSON of the config -> entry.py's string values), give a session with exactly those options."""
    from google.protobuf import json_format

    from resrank_export.runtime import SessionSettings, ort_session

    write_repository(TritonConfig(build=build_dir, out=tmp_path / "repo", ort_threads=2, ort_spinning=False,
                                  ort_arena=False, ort_execution_mode="parallel"))
    config = json_format.MessageToDict(_configs(tmp_path / "repo")["encoder"], preserving_proto_field_name=True)
    params = {key: value["string_value"] for key, value in config["parameters"].items()}
    settings = SessionSettings.from_parameters(params)
    assert settings == SessionSettings(threads=2, spinning=False, arena=False, execution_mode="parallel")
    options = ort_session(tmp_path / "repo" / "encoder" / "1" / params["GRAPH"], settings=settings) \
        .get_session_options()
    assert options.intra_op_num_threads == 2 and not options.enable_cpu_mem_arena
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.execution_mode.name == "ORT_PARALLEL"
    with pytest.raises(ResRankExportError, match="'eager'.*sequential or parallel"):
        TritonConfig(build=build_dir, out=tmp_path / "bad", ort_execution_mode="eager").validate()


def test_openvino_runtime_parameters_and_refusals(build_dir, tmp_path):
    """--cpu-runtime openvino reaches the graph models' parameters; combinations it cannot serve
    are refused before anything is written."""
    from google.protobuf import json_format

    write_repository(TritonConfig(build=build_dir, out=tmp_path / "repo", cpu_runtime="openvino",
                                  openvino_compute="bf16", ort_threads=2))
    for name in ("encoder", "reranker"):
        config = json_format.MessageToDict(_configs(tmp_path / "repo")[name], preserving_proto_field_name=True)
        params = {key: value["string_value"] for key, value in config["parameters"].items()}
        assert (params["CPU_RUNTIME"], params["OPENVINO_COMPUTE"], params["ORT_THREADS"]) == ("openvino", "bf16", "2")
    refused = [({"backend": "onnxruntime"}, "--backend onnxruntime runs them itself"),
               ({"ort_fused": True}, "ORT-fused ones"),
               ({"openvino_compute": "fp16"}, "--openvino-compute 'fp16'")]
    for options, message in refused:
        with pytest.raises(ResRankExportError, match=message):
            write_repository(TritonConfig(build=build_dir, out=tmp_path / "bad", cpu_runtime="openvino", **options))
        assert not (tmp_path / "bad").exists()
    with pytest.raises(ResRankExportError, match="cpu_runtime 'tvm'"):
        TritonConfig(build=build_dir, out=tmp_path / "bad", cpu_runtime="tvm").validate()
    summary = (tmp_path / "repo" / MARKER_FILE).read_text()
    assert '"reason": "openvino/bf16: asked for"' in summary  # explicit choices are served as given


def test_auto_reads_the_gates_the_build_measured_for_the_served_graphs():
    """The served graphs' own gate: parity's `cpu_paths` for the exported graphs, the fidelity
    report (on the path it ran on) for a precision stage's; nothing else counts."""
    from resrank_export.triton.config import measured_gates

    parity = {"export": {"report": {"dtype": "fp32"}},
              "parity": {"report": {"cpu_paths": {"openvino/bf16": {"passed": True}}}}}
    assert measured_gates(parity, "fp32") == {"openvino/bf16": True}
    assert measured_gates(parity, "int8") == {}  # no fidelity report of int8 graphs

    def fidelity(path, *passed):
        return {**parity, "fidelity_int8": {"report": {"cpu_path": path, "gates": {"int8": [
            {"gate": f"g{i}", "passed": p} for i, p in enumerate(passed)]}}}}

    assert measured_gates(fidelity("openvino/bf16", True, True), "int8") == {"openvino/bf16": True}
    assert measured_gates(fidelity("openvino/bf16", True, False), "int8") == {"openvino/bf16": False}
    assert measured_gates(fidelity("onnxruntime/f32", True), "int8") == {"onnxruntime/f32": True}
    assert measured_gates({}, "fp32") == {}  # a folder without manifest: nothing measured
