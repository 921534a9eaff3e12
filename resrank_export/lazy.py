"""One place that imports heavy or optional dependencies, with an exact install hint."""

from __future__ import annotations

import importlib
from types import ModuleType

from resrank_export.errors import MissingDependencyError

_EXTRA_OF = {
    "faiss": "index",
    "modelopt": "precision",
    "tritonclient": "triton",
    "pytriton": "triton",
    "pytrec_eval": "eval",
    "sentence_transformers": "bench",
    "matplotlib": "bench",
    "ray": "ray",
    "yaml": "k8s",
    "kubernetes_validate": "k8s",
    "jsonschema": "k8s",
    "openvino": "openvino",
    "tensorrt": None,
}


def require(module: str, purpose: str) -> ModuleType:
    """Import `module` or raise MissingDependencyError saying what to install and why."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        extra = _EXTRA_OF.get(top)
        if top == "tensorrt":
            hint = "install TensorRT for your CUDA version (pip install tensorrt) on a GPU machine"
        elif extra:
            hint = f"pip install 'resrank-export[{extra}]'"
        else:
            hint = f"pip install {top}"
        raise MissingDependencyError(f"{purpose} needs the '{top}' package ({exc}); {hint}") from exc
