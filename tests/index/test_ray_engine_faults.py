"""`index --engine ray` survives losing a worker node mid-run: a real multi-node local cluster
(`ray.cluster_utils.Cluster`: a head without CPUs, two 1-CPU worker nodes, so each node holds one
of the 2 encoder actors). A worker node is killed once the first chunk is written; Ray resubmits
the chunks its actor held to the surviving actor, and the index equals the single-process build
(max |diff| <= 1e-6, ids, texts, flat top-10). The corpus is cut into 2-passage chunks, so the
node dies with dozens left to encode however slow the machine is: waiting for the first chunk is
the only event the test needs."""

from __future__ import annotations

import threading
import time

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")
pytest.importorskip("faiss")

from ray.cluster_utils import Cluster  # noqa: E402

from resrank_export.index.ray_engine import RayIndexConfig, build_index_ray  # noqa: E402

pytestmark = pytest.mark.slow
# The head notices a killed node after health_check_period_ms * failure_threshold (default 15 s).
FAST_NODE_DEATH = {"health_check_period_ms": 500, "health_check_failure_threshold": 2,
                   "health_check_initial_delay_ms": 0}
CHUNK = 2  # passages per chunk: 55 chunks, each a call of one actor


@pytest.fixture
def two_worker_cluster():
    assert not ray.is_initialized(), "another test left Ray initialized"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": FAST_NODE_DEATH})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    yield cluster, workers
    ray.shutdown()
    cluster.shutdown()


def alive_cpus() -> float:
    return sum(node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"])


def test_worker_node_removed_mid_run(two_worker_cluster, single_build, tmp_path):
    cluster, workers = two_worker_cluster
    out, work = tmp_path / "index", tmp_path / ".index.partial"
    chunks = -(-110 // CHUNK)
    outcome: dict = {}

    def build() -> None:
        try:
            outcome["info"] = build_index_ray(RayIndexConfig(single_build.config(out, chunk_size=CHUNK), actors=2))
        except BaseException as exc:  # re-raised below, in the test's thread
            outcome["error"] = exc

    runner = threading.Thread(target=build)
    runner.start()
    deadline = time.monotonic() + 120
    while not list(work.glob("[0-9]*[0-9].npy")) and runner.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    cluster.remove_node(workers[0], allow_graceful=False)
    finished_before = len(list(work.glob("[0-9]*[0-9].npy")))  # at most those written before the node died
    runner.join(120)
    assert not runner.is_alive(), "the Ray build did not finish within 120 s of losing a node"
    if "error" in outcome:
        raise outcome["error"]
    assert 1 <= finished_before < chunks  # the node was lost while chunks were still being encoded
    print(f"\nworker node removed with {finished_before} of {chunks} chunks written")
    # The build can end before the head's health check marks the killed node dead (~1 s with
    # FAST_NODE_DEATH); wait, bounded, for the head to agree that one worker node is left.
    deadline = time.monotonic() + 30
    while alive_cpus() != 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert alive_cpus() == 1
    assert outcome["info"]["count"] == 110
    single_build.assert_same(out)
