"""PASSAGES (the user's own candidates) -> their slot vectors, by calling the `encoder` model
of the same repository (business logic scripting), so the passages go through exactly the
encoder the retrieval path uses, in whatever backend it runs. The passages of all requests of
one `execute` call go to the encoder together, in chunks of similar length."""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from resrank_export.model.text import PassageTokenizer
from resrank_export.triton.models.common import (
    RequestError,
    decode_texts,
    input_array,
    respond,
    resrank_config,
    string_array,
    tensors,
    version_dir,
)


class Model:
    def __init__(self, args: dict, config: dict, params: dict[str, str]):
        folder = version_dir(args)
        settings = resrank_config(folder)
        self.tokenizer = PassageTokenizer.for_config(folder / "tokenizer.json", settings)
        self.max_candidates = settings.max_candidates
        self.encoder_batch = int(params["ENCODER_MAX_BATCH"])

    def encode(self, texts: list[str]) -> np.ndarray:
        """[n, D] in input order; chunks hold texts of similar length (characters as a cheap
        proxy for tokens), so the encoder spends little on padding."""
        order = np.argsort([len(t) for t in texts], kind="stable")
        vectors = None
        for start in range(0, len(texts), self.encoder_batch):
            rows = order[start:start + self.encoder_batch]
            inputs = self.tokenizer([texts[i] for i in rows])
            response = pb_utils.InferenceRequest(model_name="encoder", requested_output_names=["embeddings"],
                                                 inputs=tensors(inputs)).exec()
            if response.has_error():
                raise RuntimeError(f"encoder: {response.error().message()}")
            chunk = pb_utils.get_output_tensor_by_name(response, "embeddings").as_numpy()
            if vectors is None:
                vectors = np.empty((len(texts), chunk.shape[1]), dtype=chunk.dtype)
            vectors[rows] = chunk
        return vectors

    def passages(self, request) -> np.ndarray:
        """The request's PASSAGES [rows, k], refused when empty, too many or not text."""
        values = input_array(request, "PASSAGES")
        k = values.shape[1]
        if k == 0:
            raise RequestError("PASSAGES is empty; send at least one candidate passage")
        if k > self.max_candidates:
            raise RequestError(f"PASSAGES has {k} candidates; at most {self.max_candidates} are accepted")
        texts = decode_texts(values, "PASSAGES")
        for i, text in enumerate(texts):
            if not text.strip():
                raise RequestError(f"PASSAGES[{i}] is empty or whitespace-only")
        return np.asarray(texts, dtype=object).reshape(values.shape)

    def execute(self, requests):
        """Validate every request, encode the passages of the valid ones together, answer each."""
        grids: dict[int, np.ndarray] = {}
        refused: dict[int, Exception] = {}
        for position, request in enumerate(requests):
            try:
                grids[position] = self.passages(request)
            except RequestError as exc:
                refused[position] = exc
        texts = [str(text) for grid in grids.values() for text in grid.reshape(-1)]
        try:
            vectors = self.encode(texts) if texts else None
        except Exception as exc:  # the encoder failed: every request that needed it says so
            refused.update({position: exc for position in grids})
        offsets = dict(zip(grids, np.cumsum([0] + [grid.size for grid in grids.values()])))

        def answer(position: int) -> dict:
            if position in refused:
                raise refused[position]
            rows, k = grids[position].shape
            start = offsets[position]
            return {"passage_embeddings": vectors[start:start + rows * k].reshape(rows, k, -1),
                    "candidate_ids": string_array([[str(i) for i in range(k)]] * rows)}

        return respond(range(len(requests)), answer)
