"""PASSAGES (the user's own candidates) -> their slot vectors, by calling the `encoder` model
of the same repository (business logic scripting), so the passages go through exactly the
encoder the retrieval path uses, in whatever backend it runs."""

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
        chunks = []
        for start in range(0, len(texts), self.encoder_batch):
            inputs = self.tokenizer(texts[start:start + self.encoder_batch])
            response = pb_utils.InferenceRequest(model_name="encoder", requested_output_names=["embeddings"],
                                                 inputs=tensors(inputs)).exec()
            if response.has_error():
                raise RuntimeError(f"encoder: {response.error().message()}")
            chunks.append(pb_utils.get_output_tensor_by_name(response, "embeddings").as_numpy())
        return np.concatenate(chunks)

    def handle(self, request):
        values = input_array(request, "PASSAGES")
        rows, k = values.shape
        if k == 0:
            raise RequestError("PASSAGES is empty; send at least one candidate passage")
        if k > self.max_candidates:
            raise RequestError(f"PASSAGES has {k} candidates; at most {self.max_candidates} are accepted")
        texts = decode_texts(values, "PASSAGES")
        for i, text in enumerate(texts):
            if not text.strip():
                raise RequestError(f"PASSAGES[{i}] is empty or whitespace-only")
        embeddings = self.encode(texts)
        return {"passage_embeddings": embeddings.reshape(rows, k, -1),
                "candidate_ids": string_array([[str(i) for i in range(k)]] * rows)}

    def execute(self, requests):
        return respond(requests, self.handle)
