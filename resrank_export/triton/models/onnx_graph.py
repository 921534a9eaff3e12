"""The encoder or reranker graph on ONNX Runtime (or OpenVINO, parameter CPU_RUNTIME) inside
the python backend (runs on any Triton, CPU included). All requests of one `execute` call,
whatever their sequence lengths and candidate counts, are padded into as few runs as the token
budget MAX_BATCH_TOKENS allows (see batching.py) and split back per request. A run that the
runtime refuses is retried request by request, so one bad request fails only itself."""

from __future__ import annotations

import triton_python_backend_utils as pb_utils

from resrank_export.runtime import OpenVINOSession, SessionSettings, ort_session, run_session
from resrank_export.triton.models.batching import DEFAULT_MAX_BATCH_TOKENS, merger, plan_runs
from resrank_export.triton.models.common import RequestError, input_array, refusal, tensors, version_dir


def _error(exc: Exception):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{type(exc).__name__}: {exc}"))


def model_session(path, params: dict[str, str]):
    """The session the model's parameters ask for (written by triton/config.py)."""
    settings = SessionSettings.from_parameters(params)
    if params.get("CPU_RUNTIME", "onnxruntime") == "openvino":
        return OpenVINOSession(path, threads=settings.threads, compute=params.get("OPENVINO_COMPUTE", "f32"))
    return ort_session(path, settings=settings)


class Model:
    def __init__(self, args: dict, config: dict, params: dict[str, str]):
        self.session = model_session(version_dir(args) / params["GRAPH"], params)
        self.input_names = [i["name"] for i in config["input"]]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.merge = merger(self.input_names)
        self.max_tokens = int(params.get("MAX_BATCH_TOKENS", DEFAULT_MAX_BATCH_TOKENS))

    def _run(self, members: list[dict]) -> list:
        """Responses of `members` from one padded run."""
        merged = self.merge(members)
        outputs = run_session(self.session, merged.inputs)
        return [pb_utils.InferenceResponse(output_tensors=tensors(dict(zip(self.output_names, own))))
                for own in merged.split(outputs)]

    def _answer(self, members: list[dict]) -> list:
        """One run; if ORT refuses it, each request alone, to find the one at fault."""
        try:
            return self._run(members)
        except Exception as exc:  # an error response, never a failed execute
            if len(members) == 1:
                return [_error(exc)]
            return [response for member in members for response in self._answer([member])]

    def execute(self, requests):
        responses: list = [None] * len(requests)
        members: dict[int, dict] = {}
        for position, request in enumerate(requests):
            try:
                members[position] = {name: input_array(request, name) for name in self.input_names}
            except RequestError as exc:
                responses[position] = pb_utils.InferenceResponse(error=refusal(exc))
        positions = list(members)
        widths = [members[p]["input_ids"].shape[1] for p in positions]
        rows = [members[p]["input_ids"].shape[0] for p in positions]
        for run in plan_runs(widths, rows, self.max_tokens):
            run_positions = [positions[i] for i in run]
            results = self._answer([members[p] for p in run_positions])
            for p, response in zip(run_positions, results):
                responses[p] = response
        return responses
