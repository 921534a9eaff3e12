"""The embedded default corpus: passages made at run time from the installed Python standard
library's docstrings. Real, license-free text a user can query ("how do I parse JSON")
without any download."""

from __future__ import annotations

import importlib
import inspect
import re
import warnings

from resrank_export.data.readers import Passage

MODULES = (
    "json", "csv", "re", "os", "os.path", "pathlib", "shutil", "subprocess", "datetime", "time",
    "collections", "itertools", "functools", "math", "statistics", "random", "string", "textwrap",
    "logging", "argparse", "sqlite3", "urllib.parse", "http.client", "socket", "threading",
    "multiprocessing", "asyncio", "hashlib", "base64", "zipfile", "tarfile", "gzip", "tempfile",
    "glob", "fnmatch", "pickle", "copy", "heapq", "bisect", "decimal", "fractions", "unittest",
    "typing", "dataclasses", "enum", "contextlib", "io", "struct", "uuid", "calendar", "difflib",
    "html", "xml.etree.ElementTree", "email", "smtplib", "configparser", "operator", "inspect",
)
SAMPLE_QUERIES = (
    "how do I parse JSON",
    "read a CSV file row by row",
    "compute the SHA-256 hash of bytes",
    "run a shell command and capture its output",
    "create a temporary directory",
    "sort items with a priority queue",
)


def _clean(doc: str) -> str:
    return re.sub(r"\s+", " ", doc).strip()


def stdlib_passages(limit: int | None = None, min_chars: int = 40) -> list[Passage]:
    """One passage per documented module, class, function or method, in a fixed order, so the
    corpus is the same on every run of the same Python version."""
    passages: list[Passage] = []
    seen: set[str] = set()
    for module_name in MODULES:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(module_name)
        except ImportError:  # a Python built without e.g. sqlite3
            continue
        objects = [(module_name, module)]
        for name, obj in sorted(vars(module).items()):
            if name.startswith("_") or getattr(obj, "__module__", module_name) != module.__name__:
                continue
            if inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj):
                objects.append((f"{module_name}.{name}", obj))
                if inspect.isclass(obj):
                    # Only the module's own methods: libraries patch some in (transformers adds
                    # logging.Logger.warning_advice), which would make the corpus depend on imports.
                    objects.extend((f"{module_name}.{name}.{m}", f) for m, f in sorted(vars(obj).items())
                                   if not m.startswith("_") and inspect.isfunction(f)
                                   and f.__module__ == module.__name__)
        for qualname, obj in objects:
            doc = _clean(inspect.getdoc(obj) or "")
            if len(doc) < min_chars or doc in seen:
                continue
            seen.add(doc)
            passages.append(Passage(qualname, f"{qualname}: {doc}"))
            if limit is not None and len(passages) >= limit:
                return passages
    return passages
