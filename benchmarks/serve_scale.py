"""Serving a real-size build (issue 24): the build's graphs of one precision in a Triton repository
(python flavour, ONNX Runtime or OpenVINO on the CPU) on the real tritonserver; a rerank of k
held-out passages sent as text (DL19 BM25 lists: the passages the encoder has never seen) and,
when the build has an index, a search at k, each at 1 and 4 clients; the peak RSS of the whole
server (tritonserver and every python-backend stub, sampled every 0.5 s).

    python benchmarks/serve_scale.py BUILD --precision int4_awq --out RESULTS_DIR \\
        [--runtime onnxruntime|openvino] [--data ../shared/data/dl19] [--k 100] [--requests 8]

Writes RESULTS_DIR/serve-<shape>-<precision>-<runtime>.{json,md}."""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class TreeRss:
    """Peak summed RSS of a process and its descendants, sampled in a thread."""

    def __init__(self, pid: int, interval: float = 0.5):
        self.pid, self.interval, self.peak, self._stop = pid, interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        root = psutil.Process(self.pid)
        while not self._stop.is_set():
            total = 0
            for proc in [root, *root.children(recursive=True)]:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

    def __enter__(self) -> "TreeRss":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("build", type=Path)
    parser.add_argument("--precision", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--runtime", default="onnxruntime", choices=["onnxruntime", "openvino"])
    parser.add_argument("--openvino-compute", default="f32", choices=["f32", "bf16"])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "dl19")
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--requests", type=int, default=8, help="timed requests per concurrency level")
    parser.add_argument("--shape", default="0.6b")
    args = parser.parse_args()

    from resrank_export.bench.served import drive_load
    from resrank_export.export.parity import ParityConfig, load_parity_data
    from resrank_export.triton.config import TritonConfig
    from resrank_export.triton.repository import write_repository
    from resrank_export.triton.server import ServerConfig, TritonServer

    data = load_parity_data(ParityConfig(data_dir=args.data, queries=args.requests), args.k)
    rerank = [(q, list(c[:args.k])) for q, c in zip(data.queries, data.candidates)]
    index = args.build / "index"
    has_index = (index / "index.json").is_file()
    result = {"build": str(args.build), "shape": args.shape, "precision": args.precision, "runtime": args.runtime,
              "openvino_compute": args.openvino_compute, "k": args.k, "data": data.source,
              "passages_chars_mean": sum(len(p) for _, c in rerank for p in c) / sum(len(c) for _, c in rerank),
              "levels": {}}
    with tempfile.TemporaryDirectory() as tmp:
        repository = Path(tmp) / "model_repository"
        write_repository(TritonConfig(build=args.build, out=repository, precision=args.precision,
                                      index=index if has_index else None, cpu_runtime=args.runtime,
                                      openvino_compute=args.openvino_compute))
        start = time.perf_counter()
        with TritonServer(ServerConfig(repository=repository)) as server, TreeRss(server.process.pid) as rss:
            result["startup_s"] = round(time.perf_counter() - start, 1)
            result["rss_after_load_bytes"] = rss.peak
            for ensemble, payloads in (("rerank", rerank), ("search", [(q, args.k) for q, _ in rerank])):
                if ensemble == "search" and not has_index:
                    continue
                for concurrency in (1, 4):
                    print(f"{ensemble} k={args.k} at {concurrency} client(s) ...", flush=True)
                    stats = drive_load(server.http_url, ensemble, payloads, concurrency, warmup=1)
                    result["levels"][f"{ensemble}@{concurrency}"] = stats
                    print(f"  {stats}", flush=True)
            result["server_peak_rss_bytes"] = rss.peak
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"serve-{args.shape}-{args.precision}-{args.runtime}"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# {args.shape} {args.precision} served on {args.runtime} (python flavour, CPU)", "",
             f"Server peak RSS {result['server_peak_rss_bytes'] / 2**30:.2f} GiB (after load "
             f"{result['rss_after_load_bytes'] / 2**30:.2f}), startup {result['startup_s']} s; {data.source}, "
             f"k = {args.k}, passages of {result['passages_chars_mean']:.0f} characters on average.", "",
             "| request | clients | p50 s | p99 s | requests/s |", "|---|---|---|---|---|"]
    for name, stats in result["levels"].items():
        ensemble, clients = name.split("@")
        if "error" in stats:
            lines.append(f"| {ensemble} | {clients} | error: {stats['error']} | | |")
        else:
            lines.append(f"| {ensemble} | {clients} | {stats['p50_s']:.2f} | {stats['p99_s']:.2f} | "
                         f"{stats['throughput_rps']:.2f} |")
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
