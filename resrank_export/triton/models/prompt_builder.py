"""QUERY + the candidates' slot vectors (only their count is read) -> reranker prompt ids and
slot positions. Queries longer than max_query_tokens are truncated by PromptBuilder."""

from __future__ import annotations

from resrank_export.index.pipeline import load_prompt_builder
from resrank_export.triton.models.common import input_array, queries, respond, resrank_config, version_dir


class Model:
    def __init__(self, args: dict, config: dict, params: dict[str, str]):
        folder = version_dir(args)
        self.builder = load_prompt_builder(folder / "tokenizer.json", resrank_config(folder))

    def handle(self, request):
        texts = queries(request)
        return self.builder.batch(texts, input_array(request, "passage_embeddings").shape[1])

    def execute(self, requests):
        return respond(requests, self.handle)
