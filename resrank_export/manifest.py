"""The build manifest: one JSON per build folder recording inputs, hashes, library versions and
outputs of every stage, so a rerun skips a stage whose inputs and outputs are unchanged."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import threading
import time
from pathlib import Path
from typing import Any, Callable

from resrank_export.fs import OWNER_FILE, format_bytes, sha256_file
from resrank_export.isolated import finished_child_peaks, peak_with_children

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


RUNNING = "running"
SAMPLE_SECONDS = 2.0  # how often a running stage's peak RSS is written to the manifest


class PeakRss:
    """Peak resident memory of this process since `reset`: Linux resets the kernel's high-water
    mark (VmHWM) per stage, so each stage gets its own peak; elsewhere getrusage's lifetime peak.
    A child process the stage ran through isolated.run_isolated counts once it has ended: the peak
    the child measured itself plus what this process held meanwhile."""

    def __init__(self):
        self._resettable = Path("/proc/self/clear_refs").exists()
        self._children_at_reset = 0

    def reset(self) -> None:
        self._children_at_reset = len(finished_child_peaks)
        if self._resettable:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError as exc:
                log.warning("cannot reset the peak RSS per stage (%s): stages report the process's lifetime peak", exc)
                self._resettable = False

    def bytes(self) -> int:
        return peak_with_children(self._children_at_reset)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class StageRunner:
    """Runs named stages inside a build folder, skipping those whose recorded inputs and
    output hashes still match. A stage function returns its outputs (paths relative to the
    folder) and optionally a report. The manifest is rewritten when a stage starts and, while
    it runs, with its peak RSS, so a process killed mid-stage (OOM) leaves a record of it."""

    def __init__(self, folder: Path, previous: dict | None, force: bool = False, inputs: dict | None = None,
                 config: dict | None = None):
        self.folder = Path(folder)
        self.previous = (previous or {}).get("stages", {})
        self.force = force
        self.inputs = inputs or {}  # what the stages were made from (hashes)
        self.config = config  # the resolved settings the build ran with (recorded, not compared)
        self.stages: dict[str, dict] = {}
        self.running: str | None = None
        self._rss = PeakRss()
        self._write_lock = threading.Lock()

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
        started = _now()
        self._rss.reset()
        result = self._run_recorded(name, started, fn)
        outputs = {str(Path(p).relative_to(self.folder)) if Path(p).is_absolute() else str(p): None
                   for p in result.get("outputs", [])}
        self.stages[name] = {
            "status": "ran",
            "key": key,
            "inputs": inputs,
            "outputs": {rel: sha256_file(self.folder / rel) for rel in outputs},
            "seconds": round(time.perf_counter() - start, 3),
            "started": started,
            "peak_rss_bytes": self._rss.bytes(),
            **({"report": result["report"]} if "report" in result else {}),
        }
        log.info("stage %s: done in %.1fs, peak RSS %s", name, self.stages[name]["seconds"],
                 format_bytes(self.stages[name]["peak_rss_bytes"]))
        return self.stages[name]

    def _run_recorded(self, name: str, started: str, fn: Callable[[], dict]) -> dict:
        """Run `fn` with a `running` entry in the manifest whose peak RSS a thread refreshes."""
        self.running = name  # stays set when fn raises: keep_finished must not keep this stage
        done = threading.Event()
        recorded = [-1]

        def record() -> None:
            peak = self._rss.bytes()
            if peak != recorded[0]:
                recorded[0] = peak
                self._write({**self.stages, name: {"status": RUNNING, "started": started, "peak_rss_bytes": peak}})

        def sample() -> None:
            while not done.wait(SAMPLE_SECONDS):
                record()

        record()
        sampler = threading.Thread(target=sample, name=f"rss-{name}", daemon=True)
        sampler.start()
        try:
            result = fn()
        finally:
            done.set()
            sampler.join()
        self.running = None
        return result

    def keep_finished(self) -> list[str]:
        """After an interruption: leave only finished stages in the folder (this run's, and the
        previous build's not reached yet) and a manifest listing them, so a rerun seeded from it
        skips them; the interrupted stage's partial files go (all files, when no stage finished).
        Returns the stages kept."""
        kept = {name: entry for name, entry in self.previous.items()
                if name not in self.stages and name != self.running
                and all((self.folder / rel).is_file() for rel in entry.get("outputs", {}))}
        kept.update(self.stages)
        keep = {self.folder / MANIFEST_FILE} | {self.folder / rel for entry in kept.values()
                                                for rel in entry.get("outputs", {})}
        for path in sorted(self.folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if path.is_file() and path not in keep and path.name != OWNER_FILE:
                path.unlink()
            elif path.is_dir() and not any(path.iterdir()):
                path.rmdir()
        if kept:
            self._write(kept)
        else:
            (self.folder / MANIFEST_FILE).unlink(missing_ok=True)
        return list(kept)

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

    def manifest(self, stages: dict[str, dict] | None = None) -> dict:
        return {"format_version": FORMAT_VERSION, "created": _now(), "inputs": self.inputs,
                **({"config": self.config} if self.config is not None else {}),
                "versions": library_versions(), "stages": self.stages if stages is None else stages}

    def write(self) -> dict:
        return self._write(self.stages)

    def _write(self, stages: dict[str, dict]) -> dict:
        """Write to a side file and rename: never through a hard link to the old build's
        manifest, and never half-written when the process is killed."""
        manifest = self.manifest(stages)
        side = self.folder / f".{MANIFEST_FILE}.{threading.get_ident()}"
        with self._write_lock:
            side.write_text(json.dumps(manifest, indent=2, default=str) + "\n")
            os.replace(side, self.folder / MANIFEST_FILE)
        return manifest


def unfinished_stage(folder: Path) -> tuple[str, dict] | None:
    """The stage a killed build was running (name, its last `running` entry), if any."""
    stages = (read_manifest(folder) or {}).get("stages", {})
    return next(((name, entry) for name, entry in stages.items() if entry.get("status") == RUNNING), None)


def describe_unfinished(name: str, entry: dict) -> str:
    return (f"stage {name} (started {entry.get('started', '?')}) did not finish; its last recorded peak RSS was "
            f"{format_bytes(entry.get('peak_rss_bytes', 0))}: if the process was killed for memory, give it more")
