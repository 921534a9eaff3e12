"""Token-budget encoder batching: groups respect both bounds and keep every row once, and the
encoded vectors equal one-text-at-a-time runs of the real graph, in input order."""

from __future__ import annotations

import numpy as np
import pytest

from resrank_export.runtime import encode_texts, length_batches, ort_session, run_session


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
