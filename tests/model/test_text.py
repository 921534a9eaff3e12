"""PromptBuilder and PassageTokenizer: the ids every consumer (reference, parity, Triton) feeds
the graphs, checked against the raw tokenizer."""

from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer

from resrank_export.model.reference import passage_tokenizer, prompt_builder

LONG_QUERY = " ".join(f"word{i} river bank" for i in range(40))


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return tiny_checkpoint()


@pytest.fixture(scope="module")
def builder(checkpoint):
    return prompt_builder(checkpoint)


@pytest.fixture(scope="module")
def raw_reranker_tokenizer(checkpoint):
    return Tokenizer.from_file(str(checkpoint.reranker_dir / "tokenizer.json"))


@pytest.mark.parametrize("k", [1, 5, "max"])
def test_slot_positions_point_at_the_placeholders(builder, checkpoint, k):
    k = checkpoint.config.max_candidates if k == "max" else k
    prompt = builder.build("how long do fleas live", k)
    ids = np.asarray(prompt.ids)
    assert len(prompt.slot_positions) == k
    assert (ids[prompt.slot_positions] == checkpoint.placeholder_id).all()
    assert np.count_nonzero(ids == checkpoint.placeholder_id) == k
    assert prompt.slot_positions == sorted(prompt.slot_positions)


def test_prompt_follows_the_template(builder, raw_reranker_tokenizer):
    prompt = builder.build("how long do fleas live", 2)
    text = raw_reranker_tokenizer.decode(prompt.ids, skip_special_tokens=False)
    # The MiniLM tokenizer lower-cases and splits punctuation.
    assert text == ("[CLS] query : how long do fleas live passages : [ 1 ] <|passage|> [ 2 ] <|passage|> "
                    "rank the passages for the query : how long do fleas live [SEP]")


def test_long_query_is_truncated_to_max_query_tokens(builder, checkpoint, raw_reranker_tokenizer):
    limit = checkpoint.config.max_query_tokens
    full = raw_reranker_tokenizer.encode(LONG_QUERY, add_special_tokens=False).ids
    assert len(full) > limit
    cleaned = builder.clean_query(LONG_QUERY)
    assert raw_reranker_tokenizer.encode(cleaned, add_special_tokens=False).ids == full[:limit]
    short = "how long do fleas live"
    assert builder.clean_query(short) == short


@pytest.mark.parametrize("query", [
    "fleas <|passage|> live <|passage|>",
    "fleas {passages} live",
    "fleas {query} live",
], ids=["placeholder-token", "passages-marker", "query-marker"])
def test_query_text_never_adds_slots(builder, checkpoint, query):
    prompt = builder.build(query, 3)
    assert np.count_nonzero(np.asarray(prompt.ids) == checkpoint.placeholder_id) == 3
    assert len(prompt.slot_positions) == 3


@pytest.mark.parametrize("k", [0, -1, "max+1"])
def test_k_outside_range_raises(builder, checkpoint, k):
    k = checkpoint.config.max_candidates + 1 if k == "max+1" else k
    with pytest.raises(ValueError, match="number of candidates"):
        builder.build("fleas", k)


def test_batch_pads_right_and_keeps_each_prompt(builder, checkpoint):
    queries = ["fleas", LONG_QUERY, "how long do fleas live"]
    batch = builder.batch(queries, 4)
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    assert batch["slot_positions"].shape == (3, 4)
    for row, query in enumerate(queries):
        prompt = builder.build(query, 4)
        n = len(prompt.ids)
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
        assert batch["input_ids"][row, :n].tolist() == prompt.ids
        assert (batch["input_ids"][row, n:] == builder.pad_id).all()
        assert batch["slot_positions"][row].tolist() == prompt.slot_positions
    assert batch["input_ids"].shape[1] == max(len(builder.build(q, 4).ids) for q in queries)


def test_passage_tokenizer_truncates_with_special_tokens(checkpoint):
    tokenizer = passage_tokenizer(checkpoint)
    raw = Tokenizer.from_file(str(checkpoint.encoder_dir / "tokenizer.json"))
    raw.no_truncation()
    raw.no_padding()
    limit = checkpoint.config.max_passage_tokens
    long_text = " ".join(["fleas live up to a year"] * 40)
    short_text = "a short one."
    batch = tokenizer([long_text, short_text])
    full_long = raw.encode(long_text).ids
    assert len(full_long) > limit
    assert batch["input_ids"].shape == (2, limit)
    assert batch["input_ids"][0].tolist() == full_long[: limit - 1] + [raw.token_to_id("[SEP]")]
    short_ids = raw.encode(short_text).ids
    assert batch["input_ids"][1, : len(short_ids)].tolist() == short_ids
    assert batch["attention_mask"].sum(axis=1).tolist() == [limit, len(short_ids)]
    assert tokenizer.lengths([long_text, short_text]) == [limit, len(short_ids)]


def test_passage_tokenizer_ignores_padding_stored_in_tokenizer_json():
    """MiniLM's own tokenizer.json pads and truncates to 128; the graphs must get true lengths."""
    from resrank_export.model.demo import minilm_dir
    from resrank_export.model.text import PassageTokenizer

    path = minilm_dir() / "tokenizer.json"
    stored = Tokenizer.from_file(str(path))
    assert stored.padding is not None  # precondition: the file carries its own padding
    texts = ["one", "two words", " ".join(["word"] * 300)]
    batch = PassageTokenizer(path, 256)(texts)
    stored.no_padding()
    stored.no_truncation()
    true_lengths = [min(len(stored.encode(t).ids), 256) for t in texts]
    assert batch["attention_mask"].sum(axis=1).tolist() == true_lengths
    assert batch["input_ids"].shape[1] == 256
