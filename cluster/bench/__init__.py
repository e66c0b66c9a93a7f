"""`fleetlm bench`: workloads, an async streaming OpenAI client, vLLM-style metrics, JSON and PNG.

Library use (from bench/*.py scripts)::

    from cluster.bench import make_workload, run_workload
    result = await run_workload(url, "demo", make_workload("W1"))
    print(result.output_throughput)
"""

from cluster.bench.client import first_model, run_workload
from cluster.bench.metrics import SLO, BenchResult, Stats
from cluster.bench.report import summary_text, write_json
from cluster.bench.workloads import WORKLOADS, RequestSpec, WorkloadSpec, make_workload

__all__ = [
    "SLO",
    "WORKLOADS",
    "BenchResult",
    "RequestSpec",
    "Stats",
    "WorkloadSpec",
    "first_model",
    "make_workload",
    "run_workload",
    "summary_text",
    "write_json",
]
