"""The build manifest: one JSON per build folder recording inputs, hashes, library versions and
outputs of every stage, so a rerun skips a stage whose inputs and outputs are unchanged."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable

from resrank_export.fs import sha256_file

log = logging.getLogger(__name__)
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1
_VERSIONED = ("resrank-export", "torch", "transformers", "tokenizers", "onnx", "onnxscript",
              "onnxruntime-gpu", "onnxruntime", "nvidia-modelopt", "faiss-cpu", "tritonclient")


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def key_of(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def read_manifest(folder: Path) -> dict | None:
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        log.warning("%s is not valid JSON; every stage will run again", path)
        return None
    return data if isinstance(data, dict) and data.get("format_version") == FORMAT_VERSION else None


class StageRunner:
    """Runs named stages inside a build folder, skipping those whose recorded inputs and
    output hashes still match. A stage function returns its outputs (paths relative to the
    folder) and optionally a report."""

    def __init__(self, folder: Path, previous: dict | None, force: bool = False):
        self.folder = Path(folder)
        self.previous = (previous or {}).get("stages", {})
        self.force = force
        self.stages: dict[str, dict] = {}

    def _still_valid(self, entry: dict, key: str) -> bool:
        if entry.get("key") != key:
            return False
        outputs = entry.get("outputs", {})
        return all((self.folder / rel).is_file() and sha256_file(self.folder / rel) == digest
                   for rel, digest in outputs.items())

    def run(self, name: str, inputs: dict[str, Any], fn: Callable[[], dict]) -> dict:
        key = key_of(inputs)
        entry = self.previous.get(name)
        if entry and not self.force and self._still_valid(entry, key):
            log.info("stage %s: unchanged, skipped", name)
            self.stages[name] = {**entry, "status": "skipped"}
            return self.stages[name]
        if entry:
            self._remove_outputs(entry)
        log.info("stage %s: running", name)
        start = time.perf_counter()
        result = fn()
        outputs = {str(Path(p).relative_to(self.folder)) if Path(p).is_absolute() else str(p): None
                   for p in result.get("outputs", [])}
        self.stages[name] = {
            "status": "ran",
            "key": key,
            "inputs": inputs,
            "outputs": {rel: sha256_file(self.folder / rel) for rel in outputs},
            "seconds": round(time.perf_counter() - start, 3),
            **({"report": result["report"]} if "report" in result else {}),
        }
        log.info("stage %s: done in %.1fs", name, self.stages[name]["seconds"])
        return self.stages[name]

    def _remove_outputs(self, entry: dict) -> None:
        """Unlink, never overwrite: the folder may hard-link files of the previous build. Folders
        left without files go too (an ensemble's empty version folder included), so a stage that
        writes a whole folder (the model repository) finds none rather than a stripped one it
        would refuse as foreign."""
        folders = set()
        for rel in entry.get("outputs", {}):
            path = self.folder / rel
            path.unlink(missing_ok=True)
            folders.add(path.parent)
        inside = [f for f in folders if self.folder in f.parents]  # never prune the build folder itself
        for folder in sorted(inside, key=lambda p: len(p.parts), reverse=True):
            for root, _, _ in os.walk(folder, topdown=False):  # nothing to walk once removed
                if not any(Path(root).iterdir()):
                    Path(root).rmdir()
            parent = folder.parent
            while self.folder in parent.parents and parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
                parent = parent.parent

    def output_hashes(self, name: str) -> dict[str, str]:
        return self.stages[name]["outputs"]

    def manifest(self, inputs: dict[str, Any], config: dict[str, Any] | None = None) -> dict:
        """`config`: the resolved settings the build ran with (recorded, not compared)."""
        return {"format_version": FORMAT_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "inputs": inputs, **({"config": config} if config is not None else {}),
                "versions": library_versions(), "stages": self.stages}

    def write(self, inputs: dict[str, Any], config: dict[str, Any] | None = None) -> dict:
        manifest = self.manifest(inputs, config)
        (self.folder / MANIFEST_FILE).unlink(missing_ok=True)  # may be a hard link to the old build
        (self.folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
        return manifest
