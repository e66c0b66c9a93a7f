"""`fleetlm bench` against the real fleetlm cluster on local Ray Serve (one demo-small replica)."""

from __future__ import annotations

import asyncio

import pytest
from served_app import served_app

from cluster.bench import make_workload, run_workload

pytestmark = pytest.mark.ray

APP = "fleetlm-bench-test"
PREFIX = "/benchtest"
MODEL = "tiny-bench"


@pytest.fixture(scope="module")
def served(ray_session):
    cluster = {
        "models": [
            {
                "name": MODEL,
                "model": "demo-small",
                "num_replicas": 1,
                "engine": {
                    "num_kv_blocks": 64,
                    "block_size": 16,
                    "max_num_seqs": 4,
                    "max_model_len": 256,
                    "num_threads": 1,
                },
                "resources_per_replica": {"num_cpus": 1},
                "caches": {"exact": {"enabled": False}},
            }
        ],
    }
    with served_app(ray_session, cluster, APP, PREFIX) as base:
        yield base


def test_w2_against_fleetlm(served):
    # 2 groups x 3 prompts of 32 shared + 8 unique tokens, one at a time: every prompt after the
    # first of its group finds its 2 full prefix blocks (16 tokens each) in the replica's cache.
    wl = make_workload(
        "W2", groups=2, prompts_per_group=3, prefix_len=32, question_len=8, output_len=8, seed=5
    )
    r = asyncio.run(run_workload(served, MODEL, wl, concurrency=1, progress=False))
    assert (r.completed, r.failed) == (6, 0), r.errors
    assert r.total_input_tokens == 6 * 40 and r.total_output_tokens == 6 * 8
    assert all(q["output_tokens"] == 8 for q in r.requests)
    assert r.prefix_cache_hit_rate == pytest.approx(4 * 32 / 240)
    assert 0 < r.ttft_ms.p50 <= r.e2e_ms.p50 and r.tpot_ms.count == 6
    assert r.output_throughput == pytest.approx(48 / r.duration_s)
