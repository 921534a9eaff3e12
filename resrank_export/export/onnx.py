"""ONNX export of the encoder and reranker graphs with `torch.onnx.export` (dynamo exporter),
dynamic batch / sequence / candidate axes, and the tokenizer files next to the graphs. The
weights are exported in `ExportConfig.dtype` (FP32, or FP16/BF16 straight from a half
checkpoint: `export/half.py`); inputs and outputs are FP32 in every dtype."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import io
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from resrank_export.errors import ResRankExportError
from resrank_export.export.half import EXTERNAL_DATA_THRESHOLD, auto_export_dtype
from resrank_export.isolated import run_isolated
from resrank_export.model.checkpoint import CONFIG_FILE, Checkpoint, stored_dtype
from resrank_export.model.reference import TORCH_DTYPES, load_encoder, load_reranker, passage_tokenizer, prompt_builder, torch_device
from resrank_export.model.specs import BATCH, CANDIDATES, SEQUENCE, GraphSpec, encoder_spec, reranker_spec

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


EXPORT_DTYPES = TORCH_DTYPES
AUTO = "auto"  # build only: `ExportConfig.for_precision` picks the dtype from the checkpoint
# Checkpoints whose weights pass this many bytes export each graph in a process of its own, which
# returns the memory the exporter keeps (isolated.py); smaller ones (the demo, tests) skip the
# few seconds a fresh process takes to import torch.
ISOLATE_BYTES = 256 << 20


@dataclass(frozen=True)
class ExportConfig:
    opset: int = 18
    external_data: bool | None = None  # None: decide from the model size
    dtype: str = "fp32"  # weights of the exported graphs: fp32, or fp16/bf16 without an FP32 copy; or AUTO
    device: str = "cpu"  # where PyTorch traces the modules (cuda: a GPU's memory holds the weights)
    isolate: bool | None = None  # each graph exported in its own process (isolated.py); None: past ISOLATE_BYTES

    def __post_init__(self):
        if self.dtype not in (AUTO, *EXPORT_DTYPES):
            raise ResRankExportError(f"--export-dtype {self.dtype!r}: expected one of {AUTO}, {', '.join(EXPORT_DTYPES)}")

    def for_precision(self, precision: str, checkpoint: Checkpoint) -> "ExportConfig":
        """AUTO resolved: an FP16/BF16 target of a checkpoint whose backbones store half weights (the
        Qwen3 releases: BF16) is exported in that dtype, so no FP32 copy of the weights is made (at
        4B one is 16 GB); anything else (fp32, int8, which ModelOpt quantizes from FP32 graphs, or an
        FP32 checkpoint) in FP32, which also gives the half graphs a fidelity report against FP32."""
        if self.dtype != AUTO:
            return self
        stored = [stored_dtype(d) for d in (checkpoint.encoder_dir, checkpoint.reranker_dir)]
        return dataclasses.replace(self, dtype=auto_export_dtype(precision, stored))


def graph_specs(checkpoint: Checkpoint) -> tuple[GraphSpec, GraphSpec]:
    return encoder_spec(checkpoint.encoder_dim), reranker_spec(checkpoint.encoder_dim)


def _sample_texts() -> list[str]:
    return [
        "The quick brown fox jumps over the lazy dog near the river bank.",
        "Transformers encode passages into dense vectors for retrieval.",
        "A short one.",
    ]


def _dynamic_shapes(spec: GraphSpec) -> dict:
    dims = {BATCH: torch.export.Dim("batch"), SEQUENCE: torch.export.Dim("sequence"),
            CANDIDATES: torch.export.Dim("candidates")}
    return {t.name: {i: dims[d] for i, d in enumerate(t.dims) if isinstance(d, str)} for t in spec.inputs}


def _export(module: torch.nn.Module, spec: GraphSpec, inputs: dict[str, np.ndarray], path: Path,
            config: ExportConfig) -> dict | None:
    """Write one graph; for a half dtype, returns what `keep_fp32` moved back to FP32."""
    params = sum(p.numel() * p.element_size() for p in module.parameters())
    external = config.external_data if config.external_data is not None else params > EXTERNAL_DATA_THRESHOLD
    device = next(module.parameters()).device
    args = tuple(torch.from_numpy(inputs[name]).to(device) for name in spec.input_names)
    captured = io.StringIO()
    # The exporter prints progress lines; keep them for --verbose instead of the terminal.
    with contextlib.redirect_stdout(captured), torch.inference_mode(False), torch.no_grad():
        program = torch.onnx.export(
            module, args, dynamo=True, opset_version=config.opset,
            input_names=spec.input_names, output_names=spec.output_names,
            dynamic_shapes=_dynamic_shapes(spec), optimize=True,
        )
    log.debug(captured.getvalue())
    program.save(str(path), external_data=external)
    del program  # its copy of the weights
    import onnx

    report = None
    if config.dtype != "fp32":
        from resrank_export.export.half import keep_fp32, precision_by_op

        model = onnx.load(str(path), load_external_data=False)  # the graph only: weights stay in their file
        moved = keep_fp32(model)
        report = {"moved_to_fp32": moved, "nodes": precision_by_op(model)}
        onnx.save(model, str(path))
    onnx.checker.check_model(str(path))
    return report


def _weights_bytes(checkpoint: Checkpoint) -> int:
    return sum(p.stat().st_size for d in (checkpoint.encoder_dir, checkpoint.reranker_dir)
               for p in [*d.glob("*.safetensors"), *d.glob("*.bin")])


def _export_graph(checkpoint: Checkpoint, spec: GraphSpec, inputs: dict[str, np.ndarray], path: Path,
                  config: ExportConfig) -> dict | None:
    """Load one module (encoder or reranker, by `spec`) in the export dtype and write its graph."""
    load = load_encoder if spec.name == "encoder" else load_reranker
    module = load(checkpoint, EXPORT_DTYPES[config.dtype]).to(torch_device(config.device))
    try:
        return _export(module, spec, inputs, path, config)
    finally:
        del module
        gc.collect()


def graphs_folder(out: Path, config: ExportConfig = ExportConfig()) -> Path:
    """Where `export_onnx` writes the graphs: out/onnx/<dtype>/."""
    return Path(out) / "onnx" / config.dtype


def export_onnx(checkpoint: Checkpoint, out: Path, config: ExportConfig = ExportConfig(),
                report: dict | None = None) -> dict[str, Path]:
    """Write encoder.onnx, reranker.onnx (under onnx/<dtype>/), tokenizers and resrank.json under
    `out`; one PyTorch module is alive at a time, in a process of its own past ISOLATE_BYTES (its
    memory then returns to the OS with it). `report`, if given, receives per graph what a half
    export kept in FP32."""
    out.mkdir(parents=True, exist_ok=True)
    enc_spec, rer_spec = graph_specs(checkpoint)
    texts = _sample_texts()
    enc_inputs = passage_tokenizer(checkpoint)(texts)
    # Distinct, non-1 sizes for every dynamic axis so the exporter keeps them symbolic.
    k = 3
    rer_inputs = prompt_builder(checkpoint).batch(texts[:2], k)
    rng = np.random.default_rng(0)
    rer_inputs["passage_embeddings"] = rng.standard_normal((2, k, checkpoint.encoder_dim)).astype(np.float32)

    if config.dtype == AUTO:
        raise ResRankExportError("--export-dtype auto is a build option (it follows --precision); export takes "
                                 f"one of {', '.join(EXPORT_DTYPES)}")
    graphs = graphs_folder(out, config)
    graphs.mkdir(parents=True, exist_ok=True)
    torch_device(config.device)  # a missing GPU is refused here, not in a child process
    isolate = config.isolate if config.isolate is not None else _weights_bytes(checkpoint) > ISOLATE_BYTES
    for spec, inputs in ((enc_spec, enc_inputs), (rer_spec, rer_inputs)):
        args = (checkpoint, spec, inputs, graphs / spec.filename, config)
        kept = run_isolated(_export_graph, *args, what=f"export of {spec.name}") if isolate else _export_graph(*args)
        if report is not None and kept is not None:
            report[spec.name] = kept
        log.info("exported %s (%s weights)", graphs / spec.filename, config.dtype)

    for role, source in (("encoder", checkpoint.encoder_dir), ("reranker", checkpoint.reranker_dir)):
        target = out / "tokenizer" / role
        target.mkdir(parents=True, exist_ok=True)
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, target / name)
    shutil.copy2(checkpoint.root / CONFIG_FILE, out / CONFIG_FILE)
    return {"encoder": graphs / enc_spec.filename, "reranker": graphs / rer_spec.filename}
