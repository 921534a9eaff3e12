"""Checkpoint loading: a valid folder is described correctly, and each way of breaking one is a
CheckpointError whose one-line message names the file, the field and the expected value."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from resrank_export.errors import CheckpointError
from resrank_export.model.checkpoint import CONFIG_FILE, PROJECTOR_FILE, ResRankConfig, load_checkpoint


def _edit_config(root: Path, **changes) -> None:
    path = root / CONFIG_FILE
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _remove(rel: str):
    def mutate(root: Path) -> None:
        target = root / rel
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    return mutate


def _write(rel: str, text: str):
    def mutate(root: Path) -> None:
        (root / rel).write_text(text)
    return mutate


def _config(**changes):
    return lambda root: _edit_config(root, **changes)


def _wrong_projector_dims(root: Path) -> None:
    save_file({"weight": torch.zeros(48, 16), "bias": torch.zeros(48)}, str(root / PROJECTOR_FILE))


def _wrong_mlp_inner_dim(root: Path) -> None:
    save_file({"0.weight": torch.zeros(64, 32), "0.bias": torch.zeros(64),
               "2.weight": torch.zeros(48, 64), "2.bias": torch.zeros(48)}, str(root / PROJECTOR_FILE))


LINEAR = {"projector": "linear", "pooling": "last", "encoder": "qwen3"}
MLP = {"pooling": "cls", "projector": "mlp2x_gelu"}

# (id, checkpoint variant, mutation, file the message must name, words the message must contain)
BROKEN = [
    ("no-config", {}, _remove(CONFIG_FILE), CONFIG_FILE, ["file not found"]),
    ("no-encoder-dir", {}, _remove("encoder"), "encoder", ["folder not found", "encoder/"]),
    ("no-reranker-config", {}, _remove("reranker/config.json"), "reranker/config.json", ["file not found"]),
    ("no-encoder-weights", {}, _remove("encoder/model.safetensors"), "encoder", ["model.safetensors"]),
    ("no-reranker-tokenizer", {}, _remove("reranker/tokenizer.json"), "reranker/tokenizer.json",
     ["file not found", "fast tokenizer"]),
    ("malformed-config", {}, _write(CONFIG_FILE, '{"pooling": "mean",\n  oops}'), CONFIG_FILE,
     ["malformed JSON", "line 2"]),
    ("malformed-encoder-config", {}, _write("encoder/config.json", "{"), "encoder/config.json",
     ["malformed JSON"]),
    ("config-not-object", {}, _write(CONFIG_FILE, "[1, 2]"), CONFIG_FILE, ["JSON object", "list"]),
    ("unknown-field", {}, _config(temperature=0.1), CONFIG_FILE, ["temperature", "pooling"]),
    ("unknown-pooling", {}, _config(pooling="max"), CONFIG_FILE, ["'pooling'", "'max'", "last, mean, cls"]),
    ("unknown-projector", {}, _config(projector="conv"), CONFIG_FILE,
     ["'projector'", "'conv'", "none, linear, mlp2x_gelu"]),
    ("dim-mismatch-without-projector", LINEAR, _config(projector="none"), CONFIG_FILE,
     ["'projector'", "(32)", "(48)"]),
    ("projector-weights-missing", LINEAR, _remove(PROJECTOR_FILE), PROJECTOR_FILE, ["file not found", "linear"]),
    ("projector-kind-mismatch", LINEAR, _config(projector="mlp2x_gelu"), PROJECTOR_FILE,
     ["mlp2x_gelu", "0.weight"]),
    ("projector-dims", LINEAR, _wrong_projector_dims, PROJECTOR_FILE, ["'weight'", "[48, 16]", "[48, 32]", "encoder dim 32"]),
    ("projector-inner-dims", MLP, _wrong_mlp_inner_dim, PROJECTOR_FILE, ["'0.weight'", "[64, 32]", "[48, 32]"]),
    ("placeholder-missing", {}, _config(placeholder_token="<|slot|>"), "reranker/tokenizer.json",
     ["'<|slot|>'", "placeholder_token"]),
    ("template-without-query", {}, _config(prompt_template="Passages: {passages} rank them"), CONFIG_FILE,
     ["'prompt_template'", "{query}"]),
    ("template-without-passages", {}, _config(prompt_template="Query: {query} rank"), CONFIG_FILE,
     ["'prompt_template'", "{passages}"]),
    ("template-two-passages", {}, _config(prompt_template="{query} {passages} {passages}"), CONFIG_FILE,
     ["'prompt_template'", "exactly once"]),
    ("template-with-placeholder", {}, _config(prompt_template="{query} <|passage|> {passages}"), CONFIG_FILE,
     ["'prompt_template'", "'<|passage|>'"]),
    ("empty-placeholder", {}, _config(placeholder_token=" "), CONFIG_FILE, ["'placeholder_token'", "empty"]),
    ("max-passage-tokens-zero", {}, _config(max_passage_tokens=0), CONFIG_FILE, ["'max_passage_tokens'", "> 0"]),
    ("max-query-tokens-negative", {}, _config(max_query_tokens=-3), CONFIG_FILE, ["'max_query_tokens'", "> 0"]),
    ("max-candidates-zero", {}, _config(max_candidates=0), CONFIG_FILE, ["'max_candidates'", "> 0"]),
    ("max-candidates-string", {}, _config(max_candidates="10"), CONFIG_FILE, ["'max_candidates'", "int"]),
    # A huge count must fail here: the planner and the stages size their arrays by it.
    ("max-candidates-huge", {}, _config(max_candidates=10**12), CONFIG_FILE, ["'max_candidates'", "<= 131,072"]),
    ("max-candidates-float", {}, _config(max_candidates=1e12), CONFIG_FILE, ["'max_candidates'", "int"]),
    # The tiny Qwen3 reranker has 4096 positions, the tiny BERT encoder 512.
    ("max-candidates-past-positions", {}, _config(max_candidates=4090), CONFIG_FILE,
     ["'max_candidates' (4090)", "'max_query_tokens' (16)", "4106", "4096", "reranker/config.json"]),
    ("max-passage-tokens-past-positions", {}, _config(max_passage_tokens=513), CONFIG_FILE,
     ["'max_passage_tokens' (513)", "512", "encoder/config.json"]),
    ("max-query-tokens-past-positions", {}, _config(max_query_tokens=600), CONFIG_FILE,
     ["'max_query_tokens' (600)", "512", "encoder"]),
    ("alpha-nan", {}, _config(residual_alpha=float("nan")), CONFIG_FILE, ["'residual_alpha'", "finite"]),
    ("alpha-infinite", {}, _config(residual_alpha=float("inf")), CONFIG_FILE, ["'residual_alpha'", "finite"]),
    ("normalize-string", {}, _config(normalize="yes"), CONFIG_FILE, ["'normalize'", "bool"]),
    ("alpha-bool", {}, _config(residual_alpha=True), CONFIG_FILE, ["'residual_alpha'", "number"]),
]


@pytest.fixture
def broken_copy(tiny_checkpoint, tmp_path):
    """Copy of a tiny checkpoint with one thing broken."""
    def make(variant: dict, mutate) -> Path:
        root = tmp_path / "checkpoint"
        shutil.copytree(tiny_checkpoint(**variant).root, root)
        mutate(root)
        return root
    return make


@pytest.mark.parametrize("variant, mutate, names_file, words", [case[1:] for case in BROKEN],
                         ids=[case[0] for case in BROKEN])
def test_broken_checkpoint_is_one_line_typed_error(broken_copy, variant, mutate, names_file, words):
    root = broken_copy(variant, mutate)
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(root)
    message = str(caught.value)
    assert "\n" not in message
    assert str(root / names_file) in message
    for word in words:
        assert word in message


def test_missing_checkpoint_folder(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint folder not found"):
        load_checkpoint(tmp_path / "nowhere")


@pytest.mark.parametrize("variant", [{}, LINEAR], ids=["none", "linear"])
def test_valid_checkpoint_is_described_from_its_files(tiny_checkpoint, variant):
    checkpoint = tiny_checkpoint(**variant)
    root = checkpoint.root
    stored = json.loads((root / CONFIG_FILE).read_text())
    assert checkpoint.config.to_json() == stored
    assert checkpoint.encoder_dim == json.loads((root / "encoder" / "config.json").read_text())["hidden_size"]
    assert checkpoint.reranker_hidden == json.loads((root / "reranker" / "config.json").read_text())["hidden_size"]
    tokenizer = Tokenizer.from_file(str(root / "reranker" / "tokenizer.json"))
    assert checkpoint.placeholder_id == tokenizer.token_to_id(stored["placeholder_token"])
    assert (checkpoint.projector_path is None) == (stored["projector"] == "none")


def test_config_round_trips_through_json(tmp_path):
    config = ResRankConfig(pooling="cls", normalize=False, projector="mlp2x_gelu", residual_alpha=0.5,
                           max_candidates=7)
    assert ResRankConfig.from_json(json.loads(json.dumps(config.to_json())), tmp_path / CONFIG_FILE) == config


def test_integer_alpha_is_accepted(broken_copy):
    checkpoint = load_checkpoint(broken_copy({}, _config(residual_alpha=2)))
    assert checkpoint.config.residual_alpha == 2


def _header_only_safetensors(path: Path, shapes: dict[str, list[int]]) -> None:
    """A safetensors header claiming these BF16 tensors (parameter_count reads no weights)."""
    import struct

    offset, header = 0, {}
    for name, shape in shapes.items():
        size = 2 * math.prod(shape)
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    data = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(data)) + data)


def test_default_sample_sizes_scale_down_with_the_encoder_parameters(tiny_checkpoint, tmp_path):
    from resrank_export.model.checkpoint import parameter_count, scaled_sample_size

    tiny = tiny_checkpoint()
    expected = sum(t.numel() for t in load_file(tiny.encoder_dir / "model.safetensors").values())
    assert parameter_count(tiny.encoder_dir) == expected
    assert scaled_sample_size(2000, tiny, 100) == 2000  # demo-sized models keep the tuned size
    (tmp_path / "encoder").mkdir()
    _header_only_safetensors(tmp_path / "encoder" / "model.safetensors",
                             {"embed_tokens.weight": [151669, 1024], "layers.weight": [28, 1024, 15409]})
    big = dataclasses.replace(tiny, root=tmp_path)
    assert parameter_count(big.encoder_dir) == 151669 * 1024 + 28 * 1024 * 15409
    assert scaled_sample_size(2000, big, 100) == math.ceil(2000 * 50e6 / parameter_count(big.encoder_dir))
    assert scaled_sample_size(6, big, 2) == 2 and scaled_sample_size(2000, big, 900) == 900


def _json_values():
    from hypothesis import strategies as st

    scalars = (st.none() | st.booleans() | st.text(max_size=20) | st.floats(allow_nan=True, allow_infinity=True)
               | st.integers(min_value=-2**70, max_value=2**70)
               | st.sampled_from([0, 1, 2, 511, 512, 513, 4096, 10**12, 1e12, "{query}", "{passages}", "<|passage|>"]))
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.text(max_size=6), inner, max_size=2), max_leaves=4)


def test_no_resrank_json_ends_in_anything_but_a_checkpoint_or_one_line(tiny_checkpoint, tmp_path):
    """Property: any resrank.json (fields of the valid one replaced or added with any JSON value,
    or not an object at all) gives a Checkpoint whose lengths fit the backbones and whose alpha is
    finite, or a one-line CheckpointError naming a file of the folder; nothing is written."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from resrank_export.fs import sha256_tree

    root = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoint().root, root)
    valid = json.loads((root / CONFIG_FILE).read_text())
    positions = {role: json.loads((root / role / "config.json").read_text())["max_position_embeddings"]
                 for role in ("encoder", "reranker")}
    fields = st.sampled_from(sorted(valid)) | st.text(max_size=8)
    configs = st.dictionaries(fields, _json_values(), max_size=4).map(lambda changes: {**valid, **changes}) \
        | _json_values()

    @settings(max_examples=300, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(config=configs)
    def check(config):
        (root / CONFIG_FILE).write_text(json.dumps(config))
        before = sha256_tree(root)
        try:
            loaded = load_checkpoint(root).config
        except CheckpointError as exc:
            assert "\n" not in str(exc) and str(root) in str(exc)
        else:
            assert math.isfinite(loaded.residual_alpha)
            assert max(loaded.max_passage_tokens, loaded.max_query_tokens) <= positions["encoder"]
            assert loaded.max_candidates + loaded.max_query_tokens <= positions["reranker"]
        assert sha256_tree(root) == before

    check()
