"""Train a reranker that ranks, on a CPU, in minutes: listwise distillation of the encoder's own
query-passage similarities into ResRank's scoring (slots filled with the encoder's vectors,
residual `alpha * e_i + h_i`, cosine to the last prompt token), on pseudo-queries cut from the
corpus passages (inverse cloze: a passage's sentences ask for it) over hard candidates.

No query or judgement of an evaluation set is read: the queries are sentences of the passages,
the teacher is the encoder, so the trained reranker can be measured on DL19 and SciFact."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from resrank_export.data.readers import Passage
from resrank_export.model.reference import RerankerOnnxWrapper
from resrank_export.model.text import PromptBuilder
from resrank_export.progress import track_steps

log = logging.getLogger(__name__)

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z`'\"(])")


@dataclass(frozen=True)
class DistillConfig:
    """The recipe: every field changes the trained weights, so all of them make the cache key."""

    seed: int = 0
    steps: int = 60
    lists_per_step: int = 2
    # Slots per training prompt: the served 100, so the prompt positions trained are those served.
    candidates: int = 100
    hard_candidates: int = 30  # of them the teacher's best (the rest drawn at random)
    learning_rate: float = 1e-4
    temperature: float = 0.05  # of the teacher's and the student's softmax over one list
    queries_per_passage: int = 2  # the first sentence, then a random other one
    min_query_words: int = 3
    max_query_words: int = 24
    frozen_layers: int = 3  # lowest transformer layers kept as pretrained (and the embeddings)
    held_out: int = 16  # pseudo-queries kept out of training, for `agreement`
    # The checkpoint's residual_alpha: MiniLM's hidden states have norms of 3 to 8, so at alpha 1 the
    # slot's state h_i would drown the encoder's unit vector e_i that the teacher scores with.
    residual_alpha: float = 10.0

    def recipe_hash(self, *parts: str) -> str:
        """A short hash of the recipe and of what else fixes the result (the corpus, the start weights)."""
        text = json.dumps({"config": dataclasses.asdict(self), "parts": list(parts)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class PseudoQuery:
    text: str
    source: int  # index of the passage it was cut from


def _body(passage: Passage) -> str:
    """A passage's text without a leading `name: ` title (the embedded corpus writes one)."""
    head, sep, rest = passage.text.partition(": ")
    return rest if sep and " " not in head else passage.text


def pseudo_queries(passages: list[Passage], config: DistillConfig) -> list[PseudoQuery]:
    """Inverse cloze: a passage's first sentence (a title-like summary) and random others, cut to
    `max_query_words` words; sentences shorter than `min_query_words` are skipped."""
    rng = np.random.default_rng(config.seed)
    queries = []
    for index, passage in enumerate(passages):
        sentences = [s for s in _SENTENCE_END.split(_body(passage))
                     if len(s.split()) >= config.min_query_words]
        if not sentences:
            continue
        picked = [0] + list(rng.permutation(np.arange(1, len(sentences)))[: config.queries_per_passage - 1])
        for i in picked:
            words = sentences[i].split()[: config.max_query_words]
            queries.append(PseudoQuery(" ".join(words).rstrip(".!?"), index))
    return queries


@dataclass(frozen=True)
class CandidateList:
    query: str
    candidates: np.ndarray  # passage indices, in the order the prompt holds them
    teacher: np.ndarray  # the encoder's cosine of the query with each candidate


def candidate_lists(queries: list[PseudoQuery], query_vectors: np.ndarray, passage_vectors: np.ndarray,
                    config: DistillConfig, seed: int) -> list[CandidateList]:
    """Per query: the teacher's `hard_candidates` best passages and random others, shuffled (the
    served order, BM25's or FAISS's, is not the teacher's)."""
    rng = np.random.default_rng(seed)
    similarities = query_vectors @ passage_vectors.T
    count = min(config.candidates, len(passage_vectors))
    lists = []
    for row, query in zip(similarities, queries):
        hard = np.argsort(-row, kind="stable")[: min(config.hard_candidates, count)]
        rest = np.setdiff1d(np.arange(len(row)), hard)
        chosen = np.concatenate([hard, rng.choice(rest, count - len(hard), replace=False)])
        chosen = rng.permutation(chosen)
        lists.append(CandidateList(query.text, chosen, row[chosen].astype(np.float32)))
    return lists


def _scores(reranker: RerankerOnnxWrapper, prompts: PromptBuilder, lists: list[CandidateList],
            passage_vectors: torch.Tensor) -> torch.Tensor:
    inputs = prompts.batch([item.query for item in lists], len(lists[0].candidates))
    embeddings = torch.stack([passage_vectors[torch.from_numpy(item.candidates)] for item in lists])
    return reranker(torch.from_numpy(inputs["input_ids"]), torch.from_numpy(inputs["attention_mask"]),
                    embeddings, torch.from_numpy(inputs["slot_positions"]))


def listwise_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) of the softmax over each list, both scores divided by `temperature`."""
    target = torch.softmax(teacher / temperature, dim=-1)
    return torch.nn.functional.kl_div(torch.log_softmax(student / temperature, dim=-1), target,
                                      reduction="batchmean")


@dataclass(frozen=True)
class DistillReport:
    losses: list[float]  # one per step
    agreement_before: float  # mean Kendall tau with the teacher on held-out lists
    agreement_after: float

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def agreement(reranker: RerankerOnnxWrapper, prompts: PromptBuilder, lists: list[CandidateList],
              passage_vectors: torch.Tensor) -> float:
    """Mean Kendall tau between the reranker's and the teacher's scores of each list."""
    from scipy.stats import kendalltau

    with torch.inference_mode():
        taus = [kendalltau(_scores(reranker, prompts, [item], passage_vectors)[0].numpy(), item.teacher).statistic
                for item in lists]
    return float(np.mean(taus))


def _trainable(reranker: RerankerOnnxWrapper, frozen_layers: int) -> list[torch.nn.Parameter]:
    """All but the input embeddings and the lowest `frozen_layers` layers: the word table is half of a
    MiniLM's weights and the slots bypass it, and the low layers' text features are kept."""
    backbone = reranker.backbone
    backbone.get_input_embeddings().requires_grad_(False)
    layers = getattr(getattr(backbone, "encoder", None), "layer", None) or getattr(backbone, "layers", [])
    for layer in list(layers)[:frozen_layers]:
        layer.requires_grad_(False)
    return [p for p in reranker.parameters() if p.requires_grad]


def distill_reranker(reranker: RerankerOnnxWrapper, prompts: PromptBuilder, passages: list[Passage],
                     encode: Callable[[list[str]], np.ndarray], encode_queries: Callable[[list[str]], np.ndarray],
                     config: DistillConfig) -> DistillReport:
    """Train `reranker` in place; returns the per-step losses and the held-out agreement with the
    teacher before and after. Deterministic for a seed on one machine (CPU, fixed thread count)."""
    queries = pseudo_queries(passages, config)
    if len(queries) <= config.held_out:
        raise ValueError(f"{len(queries)} pseudo-queries from {len(passages)} passages; "
                         f"need more than the {config.held_out} held out")
    # The held-out queries, then those of each step (drawn from the others): only they are encoded.
    rng = np.random.default_rng(config.seed)
    order = rng.permutation(len(queries))
    needed = config.steps * config.lists_per_step
    rest = order[config.held_out:]
    train = rng.choice(rest, needed, replace=needed > len(rest))
    picked = [queries[i] for i in np.concatenate([order[: config.held_out], train])]
    passage_vectors = encode([p.text for p in passages])
    query_vectors = encode_queries([q.text for q in picked])
    table = torch.from_numpy(passage_vectors)
    held_lists = candidate_lists(picked[: config.held_out], query_vectors[: config.held_out], passage_vectors,
                                 config, config.seed + 1)
    before = agreement(reranker, prompts, held_lists, table)

    torch.manual_seed(config.seed)
    optimizer = torch.optim.AdamW(_trainable(reranker, config.frozen_layers), lr=config.learning_rate)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / 10) * max(0.0, 1 - step / config.steps))
    losses: list[float] = []
    reranker.eval()  # no dropout: a few hundred steps, and the result stays a function of the seed
    with track_steps("distilling the reranker", config.steps) as advance:
        for step in range(config.steps):
            rows = slice(config.held_out + step * config.lists_per_step,
                         config.held_out + (step + 1) * config.lists_per_step)
            lists = candidate_lists(picked[rows], query_vectors[rows], passage_vectors, config,
                                    config.seed + 3 + step)
            teacher = torch.from_numpy(np.stack([item.teacher for item in lists]))
            loss = listwise_loss(_scores(reranker, prompts, lists, table), teacher, config.temperature)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            advance(f"loss {np.mean(losses[-10:]):.4f}")
            if (step + 1) % 20 == 0 or step + 1 == config.steps:
                log.info("distillation step %d/%d: loss %.4f (mean of the last 10)", step + 1, config.steps,
                         np.mean(losses[-10:]))
    for parameter in reranker.parameters():
        parameter.requires_grad_(True)
    after = agreement(reranker, prompts, held_lists, table)
    log.info("held-out agreement with the teacher (Kendall tau): %.3f before, %.3f after", before, after)
    return DistillReport(losses, before, after)
