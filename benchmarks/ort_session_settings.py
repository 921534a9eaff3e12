"""ONNX Runtime session settings for the Triton python backend's graph models, measured: requests
of 8 passages from two concurrent clients (what two queued Triton requests are) through the
encoder graph, as one model instance using every core (requests take turns, as in one Triton
instance), or one instance per core, with intra-op spinning
on or off, the CPU arena on or off, sequential or parallel execution. The defaults in
resrank_export/triton/config.py (TritonConfig.ort_*) are the best row of this table.

    python benchmarks/ort_session_settings.py GRAPH OUT_DIR [--seconds 6]

GRAPH: an encoder graph of a build (e.g. build/onnx/fp32/encoder.ort.onnx). Writes
OUT_DIR/ort_session_settings.json and .md; about 1 min at the default length.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

import numpy as np

from resrank_export.runtime import SessionSettings, ort_session, run_session

# (label, sessions, settings): two clients take turns on one session, or each has its own.
CASES = (
    ("1 instance x 2 threads, spinning (ORT default)", 1, SessionSettings(threads=2)),
    ("1 instance x 2 threads, no spinning", 1, SessionSettings(threads=2, spinning=False)),
    ("2 instances x 1 thread (one per core), no spinning", 2, SessionSettings(threads=1, spinning=False)),
    ("2 instances x 1 thread, no spinning, no arena", 2, SessionSettings(threads=1, spinning=False, arena=False)),
    ("1 instance x 2 threads, no spinning, parallel mode", 1,
     SessionSettings(threads=2, spinning=False, execution_mode="parallel")),
)


def _inputs(rows: int = 8, length: int = 64) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"input_ids": rng.integers(1000, 20000, (rows, length)), "attention_mask": np.ones((rows, length), np.int64)}


def measure(graph: Path, sessions: int, settings: SessionSettings, seconds: float) -> float:
    """Requests per second of two clients running back to back for `seconds`."""
    pool = [ort_session(graph, settings=settings) for _ in range(sessions)]
    turns = [threading.Lock() for _ in pool]  # one Triton instance runs one execute at a time
    inputs = _inputs()
    for session in pool:
        run_session(session, inputs)
    done = [0, 0]
    stop = time.perf_counter() + seconds

    def client(number: int) -> None:
        session, turn = pool[number % sessions], turns[number % sessions]
        while time.perf_counter() < stop:
            with turn:
                run_session(session, inputs)
            done[number] += 1

    threads = [threading.Thread(target=client, args=(n,)) for n in range(2)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(done) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("graph", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seconds", type=float, default=6.0)
    args = parser.parse_args(argv)
    load = os.getloadavg()[0]
    rows = [{"case": label, "sessions": sessions, **vars(settings),
             "requests_per_s": measure(args.graph, sessions, settings, args.seconds)}
            for label, sessions, settings in CASES]
    result = {"graph": str(args.graph), "cores": os.cpu_count(), "load_average_1min": load,
              "request": "8 passages x 64 tokens, 2 concurrent clients", "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ort_session_settings.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# ONNX Runtime session settings ({result['request']})", "",
             f"Graph {args.graph}; {os.cpu_count()} cores, 1-min load average at start {load:.1f}.", "",
             "| settings | req/s |", "|---|---:|"]
    lines += [f"| {row['case']} | {row['requests_per_s']:.2f} |" for row in rows]
    (args.out / "ort_session_settings.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
