"""Optimisation profiles (min / opt / max input shapes) for the encoder and reranker graphs,
derived from the build's declared maxima. The reranker's sequence bound comes from the real
PromptBuilder and template, so a profile admits every prompt the serving code can produce."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from resrank_export.errors import EngineError
from resrank_export.model.checkpoint import CONFIG_FILE, ResRankConfig
from resrank_export.model.specs import BATCH, CANDIDATES, SEQUENCE, GraphSpec, encoder_spec, reranker_spec
from resrank_export.model.text import QUERY_MARKER, PromptBuilder

LEVELS = ("min", "opt", "max")
# A query's tokens can merge with the template text around it (BPE), so its token count inside
# the prompt may differ from its count alone by one at each end.
QUERY_BOUNDARY_SLACK = 2
# Passages the repository's passage_encoder sends to the encoder engine in one run (a rerank of
# more candidates takes several runs).
PASSAGE_RUN_ROWS = 64
GIB = 1 << 30


@dataclass(frozen=True)
class EngineConfig:
    """Engine stage settings. Token maxima default to resrank.json (what the tokenizers
    truncate to); None for an opt size means: derived from the max (see `profile_sizes`)."""

    max_batch: int = 8
    max_candidates: int | None = None  # <= resrank.json max_candidates
    max_query_tokens: int | None = None  # >= resrank.json max_query_tokens
    max_passage_tokens: int | None = None  # >= resrank.json max_passage_tokens
    max_encoder_batch: int | None = None  # default max(max_batch, max_candidates): rerank-only encodes k passages
    opt_batch: int | None = None
    opt_candidates: int | None = None
    opt_query_tokens: int | None = None
    opt_passage_tokens: int | None = None
    workspace_bytes: int = 4 * GIB
    timing_cache: Path | None = None  # default: <build>/engines/timing.<gpu>.cache


@dataclass(frozen=True)
class ShapeRange:
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def to_json(self) -> dict[str, list[int]]:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


Profile = dict[str, ShapeRange]  # input name -> shapes


@dataclass(frozen=True)
class BuildGraphs:
    """What the profiles need from a build folder: its resrank.json, the reranker tokenizer
    and the encoder dimension (read from the exported reranker graph)."""

    config: ResRankConfig
    reranker_tokenizer: Path
    encoder_dim: int

    @classmethod
    def from_build(cls, build: Path, graphs_dir: Path) -> "BuildGraphs":
        config_path = Path(build) / CONFIG_FILE
        if not config_path.is_file():
            raise EngineError(f"{config_path}: file not found; is {build} a resrank-export build folder?")
        config = ResRankConfig.from_json(json.loads(config_path.read_text()), config_path)
        return cls(config, Path(build) / "tokenizer" / "reranker" / "tokenizer.json",
                   _encoder_dim(Path(graphs_dir) / "reranker.onnx"))

    def specs(self) -> dict[str, GraphSpec]:
        return {"encoder": encoder_spec(self.encoder_dim), "reranker": reranker_spec(self.encoder_dim)}

    def prompt_builder(self) -> PromptBuilder:
        c = self.config
        return PromptBuilder(self.reranker_tokenizer, c.prompt_template, c.placeholder_token,
                             c.max_query_tokens, c.max_candidates)


def _encoder_dim(reranker_graph: Path) -> int:
    import onnx

    if not reranker_graph.is_file():
        raise EngineError(f"{reranker_graph}: file not found; run `resrank-export build` first")
    model = onnx.load(str(reranker_graph), load_external_data=False)
    for value in model.graph.input:
        if value.name == "passage_embeddings":
            last = value.type.tensor_type.shape.dim[-1]
            if last.dim_value > 0:
                return last.dim_value
    raise EngineError(f"{reranker_graph}: input 'passage_embeddings' has no fixed last dimension")


def _half(value: int) -> int:
    return max(1, (value + 1) // 2)


def _setting(name: str, value: int | None, default: int, low: int, high: int | None, why: str) -> int:
    """The configured value (or its default), checked to lie in low..high."""
    value = default if value is None else value
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in {low}..{high}"
        raise EngineError(f"engine setting {name} is {value}; expected {bound} ({why})")
    return value


def prompt_length(builder: PromptBuilder, query_tokens: int, k: int) -> int:
    """Upper bound on the reranker prompt length for a query of `query_tokens` tokens and k
    slots: the template and slot block measured with the real tokenizer, plus the query
    tokens at each {query} marker (with a boundary slack)."""
    fixed = len(builder.build("", k).ids)
    occurrences = builder.template.count(QUERY_MARKER)
    return fixed + occurrences * (query_tokens + QUERY_BOUNDARY_SLACK)


def profile_sizes(graphs: BuildGraphs, config: EngineConfig) -> dict[str, dict[str, dict[str, int]]]:
    """graph -> level -> symbolic axis sizes, validated against resrank.json."""
    ck, c = graphs.config, config
    k_max = _setting("max_candidates", c.max_candidates, ck.max_candidates, 1, ck.max_candidates,
                     f"the prompt builder accepts at most {ck.max_candidates} candidates (resrank.json)")
    q_max = _setting("max_query_tokens", c.max_query_tokens, ck.max_query_tokens, ck.max_query_tokens, None,
                     f"queries are truncated to {ck.max_query_tokens} tokens (resrank.json); "
                     "a smaller profile would reject long queries")
    p_max = _setting("max_passage_tokens", c.max_passage_tokens, ck.max_passage_tokens, ck.max_passage_tokens,
                     None, f"passages are truncated to {ck.max_passage_tokens} tokens (resrank.json); "
                           "a smaller profile would reject long passages")
    b_max = _setting("max_batch", c.max_batch, 1, 1, None, "at least one request")
    e_max = _setting("max_encoder_batch", c.max_encoder_batch, max(b_max, k_max), 1, None, "at least one text")
    b_opt = _setting("opt_batch", c.opt_batch, _half(b_max), 1, b_max, "at most max_batch")
    k_opt = _setting("opt_candidates", c.opt_candidates, k_max, 1, k_max, "at most max_candidates")
    q_opt = _setting("opt_query_tokens", c.opt_query_tokens, _half(q_max), 0, q_max, "at most max_query_tokens")
    p_opt = _setting("opt_passage_tokens", c.opt_passage_tokens, _half(p_max), 1, p_max,
                     "at most max_passage_tokens")
    builder = graphs.prompt_builder()
    return {
        "encoder": {
            "min": {BATCH: 1, SEQUENCE: 1},
            "opt": {BATCH: _half(e_max), SEQUENCE: p_opt},
            "max": {BATCH: e_max, SEQUENCE: p_max},
        },
        "reranker": {
            "min": {BATCH: 1, CANDIDATES: 1, SEQUENCE: len(builder.build("", 1).ids)},
            "opt": {BATCH: b_opt, CANDIDATES: k_opt, SEQUENCE: prompt_length(builder, q_opt, k_opt)},
            "max": {BATCH: b_max, CANDIDATES: k_max, SEQUENCE: prompt_length(builder, q_max, k_max)},
        },
    }


def profiles_for(spec: GraphSpec, sizes: dict[str, dict[str, int]]) -> Profile:
    """min/opt/max shape of every input of `spec` from the per-level axis sizes."""
    resolved = {level: spec.resolve(sizes[level]) for level in LEVELS}
    return {name: ShapeRange(*(resolved[level][name] for level in LEVELS)) for name in spec.input_names}


def engine_profiles(graphs: BuildGraphs, config: EngineConfig) -> dict[str, Profile]:
    """graph name -> its optimisation profile."""
    sizes = profile_sizes(graphs, config)
    return {name: profiles_for(spec, sizes[name]) for name, spec in graphs.specs().items()}
