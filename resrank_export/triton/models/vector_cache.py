"""A bounded LRU cache of passage vectors by content hash, for the passage encoder: a text sent
again (the same candidates reranked for another query, a retried request) is not encoded again.
Only numpy and the standard library, so it is tested without a server."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Callable

import numpy as np


class VectorCache:
    """`size` vectors at most (0: no cache); `hits` and `misses` count texts."""

    def __init__(self, size: int):
        self.size = size
        self.entries: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self.hits = self.misses = 0

    @staticmethod
    def key(text: str) -> bytes:
        return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()

    def vectors(self, texts: list[str], encode: Callable[[list[str]], np.ndarray]) -> np.ndarray:
        """[n, D] in input order: cached vectors, and `encode` of the texts not cached (each
        distinct text once), which then enter the cache (the least recently used leave)."""
        keys = [self.key(t) for t in texts]
        missing: dict[bytes, str] = {}
        for key, text in zip(keys, texts):
            if key in self.entries:
                self.entries.move_to_end(key)
            else:
                missing.setdefault(key, text)
        misses = sum(1 for key in keys if key in missing)
        self.misses, self.hits = self.misses + misses, self.hits + len(keys) - misses
        found = dict(zip(missing, encode(list(missing.values())))) if missing else {}
        result = np.stack([found[key] if key in found else self.entries[key] for key in keys])
        if self.size:
            for key, vector in found.items():
                self.entries[key] = vector
                self.entries.move_to_end(key)
            while len(self.entries) > self.size:
                self.entries.popitem(last=False)
        return result
