"""Ranking more candidates than one reranker pass holds. ResRank's reranker reads at most
`max_candidates` slots (its prompt), so a longer list is ranked in several passes by one of:

- `blocks`: the candidates dealt round-robin into ceil(n / window) disjoint blocks, all scored
  in one batched round; the best window // blocks of every block are ranked again together
  (recursively, until one pass holds them), and take the top of the answer; the rest follow,
  by their rank inside their block, then by score. Two sequential rounds for n <= window**2.
- `sliding`: RankGPT's sliding window from the back of the input order (the first-stage
  ranking): a window of `window` candidates is ranked, then moved `step` towards the front,
  so good candidates bubble up; ceil((n - window) / step) + 1 sequential passes.

With n <= window both are exactly one pass over all candidates, today's single-pass scores.
A candidate's score is from the last pass it took part in, capped at the score of the one
ranked above it: scores of different passes are not on one scale, so the order is the
strategy's, and the cap keeps scores non-increasing down the list as clients expect.

Strategies are generators: they yield the groups of candidate positions to score in one round
and receive the scores, so a driver (the in-process pipeline, the Triton `rank_passes` model)
can score the rounds of many queries together in batched reranker runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Generator

import numpy as np

from resrank_export.errors import ResRankExportError
from resrank_export.index.config import DEFAULT_RANK_STRATEGY, RANK_STRATEGIES

Ranking = Generator[list[np.ndarray], list[np.ndarray], tuple[np.ndarray, np.ndarray]]
Ask = tuple[int, np.ndarray]  # (which ranking, candidate positions scored in one pass)


@dataclass(frozen=True)
class PassSettings:
    """How candidates past one pass are ranked. `window`: candidates per pass (the reranker's
    max_candidates); `step`: sliding windows' move (None: window // 2, RankGPT's 20/10)."""

    window: int
    strategy: str = DEFAULT_RANK_STRATEGY
    step: int | None = None

    def validate(self) -> None:
        if self.strategy not in RANK_STRATEGIES:
            raise ResRankExportError(f"rank strategy {self.strategy!r}: expected one of {', '.join(RANK_STRATEGIES)}")
        if self.window < 1:
            raise ResRankExportError(f"window {self.window}: expected at least 1 candidate per pass")
        if self.step is not None and not 1 <= self.step <= self.window:
            raise ResRankExportError(f"rank step {self.step}: expected 1..{self.window} (the window)")

    @property
    def slide(self) -> int:
        return self.step or max(1, self.window // 2)

    def ranking(self, n: int) -> Ranking:
        """The generator ranking n candidates (positions 0..n-1 in input order)."""
        positions = np.arange(n)
        if self.strategy == "sliding":
            return _sliding(positions, self.window, self.slide)
        return _blocks(positions, self.window)

    def cost(self, n: int) -> tuple[int, int]:
        """(reranker passes, sequential rounds) ranking n candidates takes."""
        shape = []

        def count(asks: list[Ask]) -> list[np.ndarray]:
            shape.append(len(asks))
            return [np.zeros(len(group), dtype=np.float32) for _, group in asks]

        run_rankings([self.ranking(n)], count)
        return sum(shape), len(shape)


def _single(positions: np.ndarray) -> Ranking:
    scores = (yield [positions])[0]
    order = np.argsort(-scores, kind="stable")
    return positions[order], scores[order]


def _sliding(positions: np.ndarray, window: int, step: int) -> Ranking:
    order, last = positions.copy(), {}
    start = max(0, len(order) - window)
    while True:
        members = order[start:start + window].copy()
        scores = (yield [members])[0]
        local = np.argsort(-scores, kind="stable")
        order[start:start + window] = members[local]
        last.update(zip(members.tolist(), scores.tolist()))
        if start == 0:
            break
        start = max(0, start - step)
    return order, np.asarray([last[p] for p in order.tolist()], dtype=np.float32)


def _blocks(positions: np.ndarray, window: int) -> Ranking:
    if len(positions) <= window:
        return (yield from _single(positions))
    count = -(-len(positions) // window)
    # round-robin: every block gets a fair share of the first stage's best
    blocks = [positions[b::count] for b in range(count)]
    block_scores = yield blocks
    keep = max(1, window // count)
    winners, tail = [], []  # tail: (rank in block, -score, position, score)
    for members, scores in zip(blocks, block_scores):
        local = np.argsort(-scores, kind="stable")
        winners.extend(members[local[:keep]].tolist())
        tail.extend((rank, -float(scores[i]), int(members[i]), float(scores[i]))
                    for rank, i in enumerate(local[keep:].tolist(), start=keep))
    top, top_scores = yield from _blocks(np.asarray(winners), window)
    tail.sort(key=lambda row: row[:2])
    order = np.concatenate([top, np.asarray([row[2] for row in tail], dtype=top.dtype)])
    scores = np.concatenate([top_scores, np.asarray([row[3] for row in tail], dtype=np.float32)])
    return order, scores.astype(np.float32)


def run_rankings(rankings: list[Ranking], score: Callable[[list[Ask]], list[np.ndarray]]):
    """Drive the rankings in lockstep: every round, all their groups go to `score` together
    (so they share batched reranker runs). Returns (order, scores) per ranking."""
    results: list = [None] * len(rankings)
    pending: dict[int, list[np.ndarray]] = {}
    for i, ranking in enumerate(rankings):
        pending[i] = next(ranking)
    while pending:
        asks = [(i, group) for i, groups in pending.items() for group in groups]
        answers = iter(score(asks))
        advanced = {}
        for i, groups in pending.items():
            try:
                advanced[i] = rankings[i].send([next(answers) for _ in groups])
            except StopIteration as stop:
                order, scores = stop.value
                results[i] = order, np.minimum.accumulate(scores)
        pending = advanced
    return results


def batches(asks: list[Ask], max_rows: int) -> list[list[int]]:
    """Ask indices grouped into reranker runs: same candidate count (one prompt shape), at
    most `max_rows` rows each."""
    by_count: dict[int, list[int]] = {}
    for index, (_, group) in enumerate(asks):
        by_count.setdefault(len(group), []).append(index)
    return [members[start:start + max_rows] for members in by_count.values()
            for start in range(0, len(members), max_rows)]


def score_asks(asks: list[Ask], queries: list[str], vectors: list[np.ndarray], prompts, max_rows: int,
               run: Callable[[dict[str, np.ndarray]], np.ndarray]) -> list[np.ndarray]:
    """Scores of every ask (ranking i: query queries[i], slot vectors vectors[i] [n, D]): the
    asks batched into reranker runs of `max_rows` rows, `run(graph inputs) -> scores [rows, k]`
    being one reranker call (an ONNX Runtime session, or the served model over BLS)."""
    scores: list = [None] * len(asks)
    for members in batches(asks, max_rows):
        rankings = [asks[a][0] for a in members]
        inputs = prompts.batch([queries[i] for i in rankings], len(asks[members[0]][1]))
        inputs["passage_embeddings"] = np.ascontiguousarray(
            np.stack([vectors[i][asks[a][1]] for i, a in zip(rankings, members)]), dtype=np.float32)
        for a, row in zip(members, run(inputs)):
            scores[a] = row
    return scores
