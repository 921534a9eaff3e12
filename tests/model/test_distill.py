"""Distillation (model/distill.py) on a tiny seeded checkpoint: the loss falls and the trained
reranker agrees with its teacher on held-out pseudo-queries where the untrained one does not;
the same seed gives the same weights; the demo's cache key follows its recipe."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from resrank_export.data.default_corpus import stdlib_passages
from resrank_export.data.readers import Passage
from resrank_export.model.distill import DistillConfig, distill_reranker, pseudo_queries
from resrank_export.model.reference import ResRankReference, load_reranker

TINY = DistillConfig(steps=80, lists_per_step=4, candidates=12, hard_candidates=6, learning_rate=3e-3,
                     frozen_layers=0, held_out=32)


@pytest.fixture(autouse=True)
def one_thread():
    """Models 32 wide: more threads only add synchronisation (4x slower on a loaded 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _distill(checkpoint, config, passages):
    reference = ResRankReference(checkpoint)
    reranker = load_reranker(checkpoint)
    report = distill_reranker(reranker, reference.prompt_builder, passages, reference.encode,
                              reference.encode_queries, config)
    return reranker, report


@pytest.fixture(scope="module")
def passages():
    return stdlib_passages(limit=120)


def test_distillation_makes_a_tiny_reranker_rank_like_its_teacher(tiny_checkpoint, passages):
    _, report = _distill(tiny_checkpoint(reranker="bert"), TINY, passages)
    assert len(report.losses) == TINY.steps
    assert np.mean(report.losses[-5:]) < 0.7 * np.mean(report.losses[:5])
    # Kendall tau with the teacher on lists the training never saw.
    assert report.agreement_after > report.agreement_before + 0.1, report


def test_distillation_is_deterministic_for_a_seed(tiny_checkpoint, passages):
    config = dataclasses.replace(TINY, steps=3)
    checkpoint = tiny_checkpoint(reranker="bert")
    (first, a), (second, b) = (_distill(checkpoint, config, passages) for _ in range(2))
    assert a.losses == b.losses
    for (name, x), (_, y) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(x, y), name
    (_, c) = _distill(checkpoint, dataclasses.replace(config, seed=1), passages)
    assert c.losses != a.losses


def test_pseudo_queries_are_sentences_of_their_passage():
    passages = [Passage("a", "json.loads: Deserialize a str to a Python object. Raise an error on bad input."),
                Passage("b", "Too short."),
                Passage("c", "One sentence only, with enough words in it")]
    queries = pseudo_queries(passages, DistillConfig(queries_per_passage=2, max_query_words=5))
    assert [(q.text, q.source) for q in queries] == [
        ("Deserialize a str to a", 0), ("Raise an error on bad", 0), ("One sentence only, with enough", 2)]


def test_recipe_hash_changes_with_every_field_and_part():
    base = DistillConfig()
    hashes = {base.recipe_hash("x"), base.recipe_hash("y")}
    for field in dataclasses.fields(DistillConfig):
        hashes.add(dataclasses.replace(base, **{field.name: getattr(base, field.name) + 1}).recipe_hash("x"))
    assert len(hashes) == 2 + len(dataclasses.fields(DistillConfig))
