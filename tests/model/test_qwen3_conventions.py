"""Qwen3-Embedding's conventions (instruction before queries, documents bare, `<|endoftext|>` at the
end of every text, pad token from the tokenizer's config, last-token pooling on either padding
side) against a reference written the way its model card uses the model: Hugging Face AutoModel,
left padding, the last token's state. Tiny Qwen3 shapes, the real Qwen3 tokenizer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from resrank_export.errors import CheckpointError
from resrank_export.model.checkpoint import CONFIG_FILE, load_checkpoint
from resrank_export.model.demo import QWEN3_EMBEDDING_QUERY_TEMPLATE, build_qwen3_checkpoint

TASK = "Given a web search query, retrieve relevant passages that answer the query"
QUERIES = ["what is the capital of China?", "Explain gravity"]
DOCUMENTS = ["The capital of China is Beijing.",
             "Gravity is a force that attracts two bodies towards each other. It gives weight to physical "
             "objects and is responsible for the movement of planets around the sun.",
             "短い文書です。",  # non-Latin text: byte-level BPE
             " ".join(["a long document that runs past the passage limit"] * 80)]


@pytest.fixture(scope="module")
def qwen3_checkpoint(qwen3_tokenizer_dir, tmp_path_factory):
    """Tiny Qwen3-shaped encoder and reranker in FP32 (a strict comparison), real tokenizer."""
    return load_checkpoint(build_qwen3_checkpoint(tmp_path_factory.mktemp("qwen3") / "ck", qwen3_tokenizer_dir,
                                                  shape="tiny", dtype="fp32", max_candidates=20))


def _model_card_embeddings(encoder_dir, texts: list[str], max_length: int) -> np.ndarray:
    """Qwen3-Embedding's model-card usage: AutoTokenizer with left padding, EOS appended after
    truncation, AutoModel, the last token's hidden state, L2-normalised."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(encoder_dir, padding_side="left")
    model = AutoModel.from_pretrained(encoder_dir, dtype=torch.float32).eval()
    eod_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    batch = tokenizer(texts, padding=False, truncation=True, max_length=max_length - 1)
    batch["input_ids"] = [ids + [eod_id] for ids in batch["input_ids"]]
    batch["attention_mask"] = [mask + [1] for mask in batch["attention_mask"]]
    batch = tokenizer.pad(batch, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    assert bool((batch["attention_mask"][:, -1] == 1).all())  # left padding: the last column is real
    return torch.nn.functional.normalize(hidden[:, -1], p=2, dim=1).numpy(), batch


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_token_ids_match_the_model_card(qwen3_checkpoint):
    from resrank_export.model.reference import passage_tokenizer

    tokenizer = passage_tokenizer(qwen3_checkpoint)
    limit = qwen3_checkpoint.config.max_passage_tokens
    instructed = [f"Instruct: {TASK}\nQuery:{q}" for q in QUERIES]
    _, reference = _model_card_embeddings(qwen3_checkpoint.encoder_dir, instructed + DOCUMENTS, limit)
    ours = [tokenizer.queries(QUERIES), tokenizer(DOCUMENTS)]
    rows = [ids[mask == 1].tolist() for batch in ours for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
    expected = [ids[mask == 1].tolist() for ids, mask in zip(reference["input_ids"], reference["attention_mask"])]
    assert rows == expected
    assert all(row[-1] == 151643 for row in rows)  # <|endoftext|> ends every text
    assert max(len(row) for row in rows) == limit  # the long document: truncated, EOS counted
    assert tokenizer.pad_id == 151643  # tokenizer_config.json's pad_token


def test_embeddings_match_the_model_card_reference(qwen3_checkpoint, tmp_path):
    """Queries with the instruction and documents with EOS: the PyTorch reference and the exported
    ONNX encoder (right padding) against the model card's left-padded last-token embeddings."""
    from resrank_export.export.onnx import export_onnx
    from resrank_export.index.encode import OnnxEncoder
    from resrank_export.model.reference import ResRankReference

    limit = qwen3_checkpoint.config.max_passage_tokens
    instructed = [f"Instruct: {TASK}\nQuery:{q}" for q in QUERIES]
    expected, _ = _model_card_embeddings(qwen3_checkpoint.encoder_dir, instructed + DOCUMENTS, limit)
    reference = ResRankReference(qwen3_checkpoint)
    ours = np.concatenate([reference.encode_queries(QUERIES), reference.encode(DOCUMENTS)])
    assert _cosines(ours, expected).min() >= 0.9999

    export_onnx(qwen3_checkpoint, tmp_path / "build")
    encoder = OnnxEncoder(tmp_path / "build")
    graph = np.concatenate([encoder.encode_queries(QUERIES), encoder.encode(DOCUMENTS)])
    assert _cosines(graph, expected).min() >= 0.9999
    # the template matters: bare queries are other vectors
    assert _cosines(encoder.encode(QUERIES), expected[:len(QUERIES)]).max() < 0.9999


def test_last_pooling_reads_the_last_real_token_on_either_side(qwen3_checkpoint):
    from resrank_export.model.reference import load_encoder, passage_tokenizer

    encoder = load_encoder(qwen3_checkpoint)
    batch = passage_tokenizer(qwen3_checkpoint)(DOCUMENTS[:3])
    ids, mask = (torch.from_numpy(batch[n]) for n in ("input_ids", "attention_mask"))
    lengths = mask.sum(1)
    left_ids, left_mask = torch.full_like(ids, 151643), torch.zeros_like(mask)
    for row, n in enumerate(lengths.tolist()):  # the same rows, padded on the left
        left_ids[row, -n:], left_mask[row, -n:] = ids[row, :n], 1
    with torch.no_grad():
        right = encoder(ids, mask).numpy()
        single = np.concatenate([encoder(ids[r:r + 1, :n], mask[r:r + 1, :n]).numpy()
                                 for r, n in enumerate(lengths.tolist())])
        left = encoder(left_ids, left_mask).numpy()
    assert _cosines(right, single).min() >= 0.9999
    assert _cosines(left, single).min() >= 0.9999


def _with_config(checkpoint, tmp_path, **changes):
    import shutil

    root = tmp_path / "ck"
    shutil.copytree(checkpoint.root, root)
    config = json.loads((root / CONFIG_FILE).read_text())
    (root / CONFIG_FILE).write_text(json.dumps({**config, **changes}))
    return root


@pytest.mark.parametrize("changes, message", [
    ({"query_template": "Instruct: search\nQuery:"}, "field 'query_template'"),
    ({"passage_template": "{passage} {passage}"}, "field 'passage_template'"),
    ({"append_eos": True, "eos_token": "<|no-such-token|>"}, "eos token '<|no-such-token|>'"),
    ({"append_eos": "yes"}, "field 'append_eos' must be of type bool"),
    ({"append_eos": True, "max_passage_tokens": 1}, "expected at least 2"),
])
def test_bad_convention_fields_are_one_line_errors(qwen3_checkpoint, tmp_path, changes, message):
    with pytest.raises(CheckpointError, match="^.*" + message.replace("(", r"\(").replace("|", r"\|")):
        load_checkpoint(_with_config(qwen3_checkpoint, tmp_path, **changes))


def test_defaults_keep_existing_checkpoints_unchanged(tiny_checkpoint):
    """A resrank.json without the new fields: bare templates, no EOS (today's behaviour)."""
    from resrank_export.model.reference import passage_tokenizer

    checkpoint = tiny_checkpoint()
    config = checkpoint.config
    assert (config.query_template, config.passage_template, config.append_eos) == ("{query}", "{passage}", False)
    tokenizer = passage_tokenizer(checkpoint)
    texts = ["how do I parse JSON", "a passage"]
    assert np.array_equal(tokenizer.queries(texts)["input_ids"], tokenizer(texts)["input_ids"])
    assert QWEN3_EMBEDDING_QUERY_TEMPLATE.endswith("Query:{query}")
