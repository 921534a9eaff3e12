"""The passage encoder's LRU cache of vectors by content hash, without a server."""

from __future__ import annotations

import numpy as np

from resrank_export.triton.models.vector_cache import VectorCache


def _encoder(calls: list):
    def encode(texts):
        calls.append(list(texts))
        return np.stack([np.full(3, len(t), dtype=np.float32) for t in texts])
    return encode


def test_repeated_texts_are_not_encoded_again_and_the_least_recent_leave():
    calls: list = []
    cache = VectorCache(size=3)
    first = cache.vectors(["a", "bb", "a"], _encoder(calls))
    assert calls == [["a", "bb"]] and first[:, 0].tolist() == [1, 2, 1]
    assert (cache.hits, cache.misses) == (0, 3)
    again = cache.vectors(["bb", "a"], _encoder(calls))
    assert len(calls) == 1 and again[:, 0].tolist() == [2, 1] and (cache.hits, cache.misses) == (2, 3)
    cache.vectors(["ccc", "dddd"], _encoder(calls))  # 4 entries > 3: "bb", the least recent, leaves
    assert list(cache.entries) == [VectorCache.key(t) for t in ("a", "ccc", "dddd")]
    cache.vectors(["bb"], _encoder(calls))
    assert calls[-1] == ["bb"]


def test_size_zero_caches_nothing():
    calls: list = []
    cache = VectorCache(size=0)
    cache.vectors(["a"], _encoder(calls))
    cache.vectors(["a"], _encoder(calls))
    assert len(calls) == 2 and not cache.entries
