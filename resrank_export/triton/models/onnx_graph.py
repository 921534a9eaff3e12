"""The encoder or reranker graph on ONNX Runtime inside the python backend (runs on any Triton,
CPU included). Requests whose inputs have the same shapes are concatenated into one run and
split back by their row counts; other requests run on their own, as Triton's own backends do."""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from resrank_export.runtime import ort_session, run_session
from resrank_export.triton.models.common import input_array, tensors, version_dir


class Model:
    def __init__(self, args: dict, config: dict, params: dict[str, str]):
        self.session = ort_session(version_dir(args) / params["GRAPH"], threads=int(params.get("THREADS", "0")))
        self.input_names = [i["name"] for i in config["input"]]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def execute(self, requests):
        responses: list = [None] * len(requests)
        groups: dict[tuple, list[tuple[int, dict]]] = {}
        for position, request in enumerate(requests):
            arrays = {name: input_array(request, name) for name in self.input_names}
            key = tuple(arrays[name].shape[1:] for name in self.input_names)
            groups.setdefault(key, []).append((position, arrays))
        for members in groups.values():
            try:
                batch = {name: np.concatenate([arrays[name] for _, arrays in members]) for name in self.input_names}
                outputs = run_session(self.session, batch)
            except Exception as exc:  # ORT refusing one group must not fail the other groups
                error = pb_utils.TritonError(f"{type(exc).__name__}: {exc}")
                for position, _ in members:
                    responses[position] = pb_utils.InferenceResponse(error=error)
                continue
            start = 0
            for position, arrays in members:
                rows = arrays[self.input_names[0]].shape[0]
                responses[position] = pb_utils.InferenceResponse(output_tensors=tensors(
                    {name: out[start:start + rows] for name, out in zip(self.output_names, outputs)}))
                start += rows
        return responses
