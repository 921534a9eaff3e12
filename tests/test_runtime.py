"""Token-budget encoder batching: groups respect both bounds and keep every row once, and the
encoded vectors equal one-text-at-a-time runs of the real graph, in input order."""

from __future__ import annotations

import numpy as np
import pytest

from resrank_export.runtime import (BF16_FLAGS, CpuCapabilities, choose_cpu_path, cpu_flags, encode_texts, length_batches,
                                    ort_session, path_candidates, probe_cpu, run_session)


@pytest.mark.parametrize("max_rows, max_tokens", [(4, 40), (32, 16384), (1, 10), (3, 7)])
def test_length_batches_bound_rows_and_tokens(max_rows, max_tokens):
    lengths = np.random.default_rng(0).integers(1, 30, size=57)
    groups = length_batches(lengths, max_rows, max_tokens)
    assert sorted(np.concatenate(groups).tolist()) == list(range(len(lengths)))
    previous = 0
    for rows in groups:
        assert len(rows) <= max_rows
        assert len(rows) == 1 or len(rows) * lengths[rows].max() <= max_tokens
        assert lengths[rows].min() >= previous  # shortest first
        previous = lengths[rows].max()


def test_encode_texts_equals_single_runs_in_input_order(tiny_export):
    from resrank_export.model.reference import passage_tokenizer

    checkpoint, graphs = tiny_export()
    session, tokenizer = ort_session(graphs["encoder"]), passage_tokenizer(checkpoint)
    texts = [("word " * n).strip() for n in (40, 3, 17, 1, 60, 8, 25, 2)]
    single = np.concatenate([run_session(session, tokenizer([t]))[0] for t in texts])
    for max_tokens in (16, 64, 16384):
        batched = encode_texts(session, tokenizer, texts, batch_size=3, max_batch_tokens=max_tokens)
        assert np.abs(batched - single).max() <= 1e-5, max_tokens
    assert encode_texts(session, tokenizer, [], batch_size=3).shape[0] == 0


def test_openvino_session_computes_what_onnx_runtime_does(tiny_export, tmp_path):
    """Both tiny graphs (BERT encoder, Qwen3 reranker) on OpenVINO's CPU plugin against ONNX
    Runtime on the same inputs: FP32 compute to the FP32 parity gate, BF16 compute close."""
    pytest.importorskip("openvino")
    from resrank_export.export.onnx import graph_specs
    from resrank_export.precision.calibration import CalibrationConfig, build_calibration_set, load_calibration
    from resrank_export.runtime import OpenVINOSession

    checkpoint, graphs = tiny_export()
    calib = tmp_path / "calib"
    build_calibration_set(checkpoint, calib, CalibrationConfig(encoder_samples=8, reranker_queries=4, retrieval_pool=50))
    for spec in graph_specs(checkpoint):
        inputs = load_calibration(calib, spec)
        expected = run_session(ort_session(graphs[spec.name]), inputs)[0]
        exact = OpenVINOSession(graphs[spec.name], compute="f32")
        assert exact.compute == "f32"
        assert [i.name for i in exact.get_inputs()] == [i.name for i in ort_session(graphs[spec.name]).get_inputs()]
        assert np.abs(run_session(exact, inputs)[0] - expected).max() <= 1e-4, spec.name
        half = OpenVINOSession(graphs[spec.name], compute="bf16")
        assert np.abs(run_session(half, inputs)[0] - expected).max() <= 0.05, (spec.name, half.compute)


def test_openvino_session_keeps_the_graphs_names_of_a_half_export(tiny_checkpoint, tmp_path):
    """A graph exported in FP16 casts its float input and output (`_to_copy`): the compiled ports
    may answer to those names, the session keeps the graph's own (the 0.6B FP16 reranker served on
    OpenVINO failed every request with KeyError '_to_copy')."""
    pytest.importorskip("openvino")
    from resrank_export.export.onnx import ExportConfig, export_onnx, graph_specs
    from resrank_export.precision.calibration import CalibrationConfig, build_calibration_set, load_calibration
    from resrank_export.runtime import OpenVINOSession

    checkpoint = tiny_checkpoint()
    graphs = export_onnx(checkpoint, tmp_path / "half", ExportConfig(dtype="fp16"))
    build_calibration_set(checkpoint, tmp_path / "calib", CalibrationConfig(encoder_samples=4, reranker_queries=2,
                                                                            retrieval_pool=50))
    for spec in graph_specs(checkpoint):
        inputs = load_calibration(tmp_path / "calib", spec)
        reference = ort_session(graphs[spec.name])
        session = OpenVINOSession(graphs[spec.name], compute="f32")
        assert [i.name for i in session.get_inputs()] == [i.name for i in reference.get_inputs()]
        assert [o.name for o in session.get_outputs()] == [o.name for o in reference.get_outputs()]
        np.testing.assert_allclose(run_session(session, inputs)[0], run_session(reference, inputs)[0], atol=2e-2)


def test_openvino_session_refuses_what_it_cannot_run(tmp_path):
    pytest.importorskip("openvino")
    from resrank_export.errors import InputDataError, NotAvailableError, ResRankExportError
    from resrank_export.runtime import OpenVINOSession

    with pytest.raises(InputDataError, match="graph not found"):
        OpenVINOSession(tmp_path / "missing.onnx")
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a graph")
    with pytest.raises(NotAvailableError, match=r"broken\.onnx: OpenVINO's CPU plugin could not load it: .+"):
        OpenVINOSession(broken)
    with pytest.raises(ResRankExportError, match="compute precision 'fp8'"):
        OpenVINOSession(broken, compute="fp8")


# --- the served CPU path `auto` picks: a plain function of the CPU, the installed runtimes and the
# build's measured gates, so both kinds of CPU are tested on any machine
AMX = CpuCapabilities(bf16=True, source="test: amx_bf16")
AVX2 = CpuCapabilities(bf16=False, source="test: no BF16 flag")
BOTH = ("onnxruntime", "openvino")


@pytest.mark.parametrize("cpu, installed, gates, expected, reason", [
    (AMX, BOTH, {"openvino/bf16": True}, ("openvino", "bf16"), "fidelity gate passed in this build"),
    (AMX, BOTH, {"openvino/bf16": False}, ("onnxruntime", "f32"), "not openvino/bf16: its fidelity gate failed"),
    (AMX, BOTH, {}, ("onnxruntime", "f32"), "not openvino/bf16: this build has not measured its fidelity gate"),
    (AMX, ("onnxruntime",), {"openvino/bf16": True}, ("onnxruntime", "f32"), "openvino is not installed"),
    (AVX2, BOTH, {"openvino/bf16": True}, ("onnxruntime", "f32"), "this CPU has no native BF16 (test: no BF16 flag)"),
])
def test_choose_cpu_path(cpu, installed, gates, expected, reason):
    choice = choose_cpu_path(cpu, installed, gates)
    assert (choice.runtime, choice.compute) == expected
    assert reason in choice.reason


def test_bf16_paths_are_measured_only_on_a_cpu_with_native_bf16():
    assert path_candidates(AMX, BOTH) == (("openvino", "bf16"),)
    assert path_candidates(AVX2, BOTH) == ()
    assert path_candidates(AMX, ("onnxruntime",)) == ()


def test_probe_cpu_agrees_with_the_cpu_flags():
    """OpenVINO's capability list (or the flags themselves) says BF16 where /proc/cpuinfo lists
    AMX-BF16 or AVX512-BF16."""
    probed = probe_cpu()
    if cpu_flags() & set(BF16_FLAGS):
        assert probed.bf16, probed.source
    assert probed.source
