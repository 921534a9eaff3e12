"""`write_repository`: a build folder (+ an index folder) -> a Triton model repository with the
composing models, the `resrank` ensemble (query -> reranked top-k) and the `resrank_rerank`
ensemble (query + the user's passages -> order). Written atomically."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

from resrank_export.engine.profiles import PASSAGE_RUN_ROWS
from resrank_export.errors import ResRankExportError
from resrank_export.export.half import external_data_files
from resrank_export.fs import atomic_dir, link_or_copy, refuse_foreign_folder
from resrank_export.index.layout import read_index_info
from resrank_export.model.checkpoint import CONFIG_FILE, ResRankConfig
from resrank_export.model.specs import GraphSpec
from resrank_export.precision.ort_optimize import ort_graph_path
from resrank_export.triton.config import (
    RERANK_ENSEMBLE,
    RERANK_OUTPUTS,
    RERANK_STEPS,
    RETRIEVE_ENSEMBLE,
    RETRIEVE_OUTPUTS,
    RETRIEVE_STEPS,
    TritonConfig,
    ensemble_config,
    graph_model_config,
    model_specs,
    python_model_config,
    resolve_cpu_runtime,
    to_text,
)
from resrank_export.triton.shards import shard_bounds, shard_model_name, split_index

log = logging.getLogger(__name__)
MARKER_FILE = "resrank_repository.json"  # Triton ignores files at the repository root
ENTRY_MODULE = Path(__file__).parent / "models" / "entry.py"


def _graph_path(build: Path, name: str, precision: str = "fp32") -> Path:
    path = build / "onnx" / precision / f"{name}.onnx"
    if not path.is_file():
        raise ResRankExportError(f"{path}: graph not found; run `resrank-export build --out {build} "
                                 f"--precision {precision}` first")
    return path


def encoder_dim(build: Path) -> int:
    """The embedding size, read from encoder.onnx's output (weights are not loaded)."""
    import onnx

    from resrank_export.index.encode import encoder_graph

    # the exported graph, whatever its dtype (every precision has its dims); missing: a one-line error
    path = _graph_path(build, "encoder", encoder_graph(build).parent.name)
    dims = onnx.load(str(path), load_external_data=False).graph.output[0].type.tensor_type.shape.dim
    if len(dims) != 2 or not dims[1].dim_value:
        raise ResRankExportError(f"{path}: output is not [batch, dim]")
    return dims[1].dim_value


def _read_build(build: Path) -> ResRankConfig:
    path = build / CONFIG_FILE
    if not path.is_file():
        raise ResRankExportError(f"{path}: file not found; --build must be a resrank-export build folder")
    for role in ("encoder", "reranker"):
        tokenizer = build / "tokenizer" / role / "tokenizer.json"
        if not tokenizer.is_file():
            raise ResRankExportError(f"{tokenizer}: file not found; --build must be a resrank-export build folder")
    return ResRankConfig.from_json(json.loads(path.read_text()), path)


def _write_model(repo: Path, model, files: dict[str, Path]) -> None:
    """<repo>/<name>/config.pbtxt and version 1 with `files` ({name in version folder: source})."""
    version = repo / model.name / "1"
    version.mkdir(parents=True)
    (repo / model.name / "config.pbtxt").write_text(to_text(model))
    for name, source in files.items():
        if source.is_dir():
            shutil.copytree(source, version / name, copy_function=link_or_copy)
        elif source.suffix == ".py":  # a copy: editing the repository must not edit the package
            shutil.copy2(source, version / name)
        else:
            link_or_copy(str(source), str(version / name))


def _graph_model(config: TritonConfig, spec: GraphSpec) -> tuple[TritonConfig, dict[str, Path]]:
    """(config for this model, files of its version folder). ONNX flavours take the graph of the
    build's precision; the tensorrt flavour takes the plans recorded in the build's engine
    manifest (one per GPU architecture, chosen by Triton through cc_model_filenames)."""
    if config.backend != "tensorrt":
        graph = _graph_path(config.build, spec.name, config.precision)
        if config.ort_fused:
            graph = ort_graph_path(graph)
            if not graph.is_file():
                raise ResRankExportError(f"{graph}: fused graph not found; run `resrank-export build --out "
                                         f"{config.build} --precision {config.precision} --ort-optimize` first")
        # the weights past 1 GiB sit in a side file the graph names (`encoder.onnx.data`): it goes
        # beside model.onnx under its own name, where ONNX Runtime looks for it
        sides = external_data_files(graph)
        for side in sides:
            if not side.is_file():
                raise ResRankExportError(f"{side}: the weights of {graph} are missing (the graph stores them in this "
                                         "file); rebuild the graph")
        return config, {"model.onnx": graph, **{side.name: side for side in sides}}
    from resrank_export.engine.manifest import cc_model_filenames, read_engine_manifest
    from resrank_export.engine.stage import engines_dir

    folder = engines_dir(config.build, config.precision)
    names = {**cc_model_filenames(read_engine_manifest(folder), spec.name), **config.cc_model_filenames}
    files = {plan: folder / plan for plan in names.values() if (folder / plan).is_file()}
    if not files:
        log.warning("no %s plan in %s: run `resrank-export engines ensure --build %s --precision %s --repository "
                    "REPO` on the target GPU before Triton can load %s", spec.name, folder, config.build,
                    config.precision, spec.name)
    return replace(config, cc_model_filenames=names), files


def _lookup_models(config: TritonConfig, index: Path, count: int, max_candidates: int, specs: dict) -> dict:
    """{name: (parameters, files)} of the index lookup: one faiss_lookup holding the index or, with
    index_shards > 1, a faiss_lookup router plus faiss_lookup_<i> per slice (their index folders
    are written by split_index after the models; `specs` gains the shards' I/O)."""
    max_top_k = min(max_candidates, count)
    if config.index_shards == 1:
        return {"faiss_lookup": ({"MAX_TOP_K": str(max_top_k)}, {"index": index})}
    models, shard_top_k = {}, []
    for number, (start, stop) in enumerate(shard_bounds(count, config.index_shards)):
        name = shard_model_name(number)
        specs[name] = replace(specs["faiss_lookup"], name=name)
        shard_top_k.append(str(min(max_candidates, stop - start)))
        models[name] = ({"RESRANK_MODEL": "faiss_lookup", "MAX_TOP_K": shard_top_k[-1]}, {})
    router = {"RESRANK_MODEL": "faiss_router", "MAX_TOP_K": str(max_top_k), "SHARDS": ",".join(models),
              "SHARD_MAX_TOP_K": ",".join(shard_top_k), "SHARD_URLS": ",".join(config.shard_urls)}
    return {**models, "faiss_lookup": (router, {})}


def write_repository(config: TritonConfig) -> dict:
    """Write the model repository to `config.out`; returns the summary stored in MARKER_FILE."""
    config.validate()
    choice = resolve_cpu_runtime(config)
    config = replace(config, cpu_runtime=choice.runtime, openvino_compute=choice.compute)
    config.validate()  # the path picked, with the rest of the settings
    build, out = Path(config.build), Path(config.out)
    settings = _read_build(build)
    refuse_foreign_folder(out, MARKER_FILE, "a resrank-export model repository")
    specs = model_specs(encoder_dim(build))
    batch = config.max_batch_size
    encoder_batch = max(batch, min(settings.max_candidates, PASSAGE_RUN_ROWS))  # passages of one request go in one batch
    tokenizers = {role: build / "tokenizer" / role / "tokenizer.json" for role in ("encoder", "reranker")}
    settings_file = build / CONFIG_FILE
    python = {  # model -> (parameters, files)
        "query_tokenizer": ({}, {"tokenizer.json": tokenizers["encoder"], CONFIG_FILE: settings_file}),
        "passage_encoder": ({"ENCODER_MAX_BATCH": str(encoder_batch)},
                            {"tokenizer.json": tokenizers["encoder"], CONFIG_FILE: settings_file}),
        "prompt_builder": ({}, {"tokenizer.json": tokenizers["reranker"], CONFIG_FILE: settings_file}),
        "rank_sort": ({}, {}),
    }
    ensembles = [(RERANK_ENSEMBLE, RERANK_STEPS, RERANK_OUTPUTS)]
    summary = {"backend": config.backend, "precision": config.precision, "max_top_k": None,
               "ort_fused": config.ort_fused and config.backend != "tensorrt",
               "cpu_path": choice.to_json() if config.backend == "python" else None}
    if config.index is not None:
        index = Path(config.index)
        meta = read_index_info(index)
        max_top_k = min(settings.max_candidates, int(meta["count"]))
        python.update(_lookup_models(config, index, int(meta["count"]), settings.max_candidates, specs))
        ensembles.insert(0, (RETRIEVE_ENSEMBLE, RETRIEVE_STEPS, RETRIEVE_OUTPUTS))
        summary.update(max_top_k=max_top_k, index_shards=config.index_shards, shard_urls=list(config.shard_urls))
    else:
        log.warning("no index given: writing only the %s ensemble", RERANK_ENSEMBLE)

    with atomic_dir(out) as work:
        for name, (params, files) in python.items():
            model = python_model_config(specs[name], config, {"RESRANK_MODEL": name, **params})
            _write_model(work, model, {"model.py": ENTRY_MODULE, **files})
        if config.index is not None and config.index_shards > 1:
            split_index(Path(config.index), [work / shard_model_name(n) / "1" / "index"
                                             for n in range(config.index_shards)])
        for name, max_batch in (("encoder", encoder_batch), ("reranker", batch)):
            model_config, files = _graph_model(config, specs[name])
            if config.backend == "python":
                files["model.py"] = ENTRY_MODULE
            _write_model(work, graph_model_config(specs[name], model_config, max_batch), files)
        for name, steps, outputs in ensembles:
            _write_model(work, ensemble_config(specs[name], steps, outputs, batch), {})
        summary["models"] = sorted(p.name for p in work.iterdir() if p.is_dir())
        (work / MARKER_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    log.info("model repository written to %s (%s backend%s; models: %s)", out, config.backend,
             f", graphs on {choice.reason}" if config.backend == "python" else "", ", ".join(summary["models"]))
    return summary
