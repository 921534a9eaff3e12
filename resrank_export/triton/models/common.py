"""Request handling shared by the python-backend models: typed per-request errors (one bad
request never fails the others batched with it), input decoding and validation."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from resrank_export.index.pipeline import read_resrank_config
from resrank_export.model.checkpoint import CONFIG_FILE, ResRankConfig

log = logging.getLogger(__name__)
MAX_QUERY_BYTES = 65536  # longer queries are refused; shorter ones are truncated to max_query_tokens


class RequestError(ValueError):
    """A problem with one request; it becomes that request's error response."""


def version_dir(args: dict) -> Path:
    """The model's version folder, where write_repository put its files."""
    return Path(args["model_repository"]) / args["model_version"]


def resrank_config(folder: Path) -> ResRankConfig:
    return read_resrank_config(folder / CONFIG_FILE)


def input_array(request, name: str) -> np.ndarray:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        raise RequestError(f"input {name} is missing")
    return tensor.as_numpy()


def decode_texts(values: np.ndarray, name: str) -> list[str]:
    texts = []
    for i, value in enumerate(values.reshape(-1)):
        raw = value if isinstance(value, bytes) else str(value).encode()
        try:
            texts.append(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise RequestError(f"{name}[{i}] is not valid UTF-8 (byte {exc.start})") from None
    return texts


def queries(request) -> list[str]:
    """The QUERY rows of a request, refused when empty, whitespace-only or over MAX_QUERY_BYTES."""
    values = input_array(request, "QUERY")
    texts = decode_texts(values, "QUERY")
    for i, text in enumerate(texts):
        if not text.strip():
            raise RequestError(f"QUERY[{i}] is empty or whitespace-only; send the query text")
        if len(text.encode()) > MAX_QUERY_BYTES:
            raise RequestError(f"QUERY[{i}] has {len(text.encode())} bytes; at most {MAX_QUERY_BYTES} are accepted")
    return texts


def tensors(arrays: dict[str, np.ndarray]) -> list:
    return [pb_utils.Tensor(name, array) for name, array in arrays.items()]


def string_array(rows: list[list[str]]) -> np.ndarray:
    return np.array([[value.encode() for value in row] for row in rows], dtype=np.object_)


def refusal(exc: ValueError):
    """The error of a refused request: INVALID_ARG, so clients see 400 / INVALID_ARGUMENT
    (the python backend's default, INTERNAL, reads as a server fault)."""
    return pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)


def respond(requests, handle) -> list:
    """One response per item (a request, or a request's position): `handle(item) -> {output:
    array}`, errors kept per request."""
    responses = []
    for request in requests:
        try:
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors(handle(request))))
        except ValueError as exc:  # RequestError, or PromptBuilder refusing a candidate count
            responses.append(pb_utils.InferenceResponse(error=refusal(exc)))
        except Exception as exc:  # a bug must not take the other requests down with it
            log.exception("request failed")
            responses.append(pb_utils.InferenceResponse(
                error=pb_utils.TritonError(f"{type(exc).__name__}: {exc}")))
    return responses
