"""QUERY -> encoder input ids, with the same PassageTokenizer (max_passage_tokens, query template,
EOS) as the in-process retriever."""

from __future__ import annotations

from resrank_export.model.text import PassageTokenizer
from resrank_export.triton.models.common import queries, respond, resrank_config, version_dir


class Model:
    def __init__(self, args: dict, config: dict, params: dict[str, str]):
        folder = version_dir(args)
        self.tokenizer = PassageTokenizer.for_config(folder / "tokenizer.json", resrank_config(folder))

    def execute(self, requests):
        return respond(requests, lambda request: self.tokenizer.queries(queries(request)))
