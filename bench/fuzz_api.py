"""Fuzz a served fleetlm API with schemathesis from its own ``/openapi.json``.

Every operation, positive and negative data (schemathesis's generation modes), each case sent over
real HTTP with a 10 s limit. Per response: schemathesis's ``not_a_server_error``,
``status_code_conformance`` and ``content_type_conformance`` checks, then ours: every 4xx body is
an OpenAI error object (``{"error": {"message", "type", "param", "code"}}``), and no body holds a
stack trace, an internal path or a Ray type name. Used by tests/test_reliability_serve.py (a short
pass) and bench/reliability.py (>= 2,000 cases).

    python -m bench.fuzz_api --url http://127.0.0.1:8000 --api-key KEY --cases 200
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass, field
from typing import Any

TIMEOUT_S = 10.0
# What must never reach a client: Python tracebacks, file paths of the code, Ray's type names.
LEAK_RE = re.compile(
    r"Traceback \(most recent call last\)|File \"[^\"]+\.py\"|/site-packages/|/work/|\.py\b|"
    r"\bRay[A-Z]\w*Error\b|\bActorDiedError\b|\bray\.\w+|ObjectRef|DeploymentHandle"
)


@dataclass
class FuzzResult:
    cases: int = 0
    server_errors: int = 0
    non_openai_errors: int = 0
    hangs: int = 0
    check_failures: int = 0  # status-code / content-type conformance
    leaks: int = 0
    harness_errors: int = 0  # the fuzzer itself failed (must be 0 for a valid run)
    by_status: dict[int, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)  # the first few problems, for a person

    def problem(self, what: str) -> None:
        if len(self.examples) < 10:
            self.examples.append(what)

    def to_dict(self) -> dict[str, Any]:
        return {
            "cases": self.cases,
            "server_errors": self.server_errors,
            "non_openai_errors": self.non_openai_errors,
            "hangs": self.hangs,
            "check_failures": self.check_failures,
            "leaks": self.leaks,
            "harness_errors": self.harness_errors,
            "by_status": {str(k): v for k, v in sorted(self.by_status.items())},
            "examples": self.examples,
        }


def is_openai_error(body: Any) -> bool:
    if not isinstance(body, dict) or set(body) != {"error"}:
        return False
    err = body["error"]
    return (
        isinstance(err, dict)
        and {"message", "type", "param", "code"} <= set(err)
        and isinstance(err["message"], str)
        and isinstance(err["type"], str)
    )


def fuzz(
    base_url: str,
    api_key: str | None,
    cases_per_run: int,
    model: str | None = None,
    seed: int = 0,
) -> FuzzResult:
    """``cases_per_run`` cases for each (operation, generation mode). ``model``: a served model
    name put into generated bodies whose ``model`` is a string, so that cases get past the model
    lookup (a random name is a 404) into the sampling fields; negative cases keep their wrongly
    typed ``model`` values."""
    import httpx
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.generation import GenerationMode
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        status_code_conformance,
    )

    schema = schemathesis.openapi.from_url(base_url + "/openapi.json", timeout=30)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    # httpx, not schemathesis's requests transport: with urllib3-future installed beside urllib3
    # (niquests pulls it in) requests' pools break schemathesis's connection counting.
    client = httpx.Client(timeout=TIMEOUT_S)
    result = FuzzResult()
    checks = [not_a_server_error, status_code_conformance, content_type_conformance]

    def one(case: Any) -> None:
        result.cases += 1
        where = f"{case.method} {case.path}"
        try:
            kw = case.as_transport_kwargs(base_url=base_url, headers=headers)
            resp = _send(client, kw, headers)
        except httpx.TimeoutException:
            result.hangs += 1
            result.problem(f"{where}: no answer in {TIMEOUT_S:.0f}s")
            return
        except httpx.TransportError as e:
            result.server_errors += 1
            result.problem(f"{where}: connection error {type(e).__name__}")
            return
        status = resp.status_code
        result.by_status[status] = result.by_status.get(status, 0) + 1
        text = (
            resp.text if not resp.headers.get("content-type", "").startswith("text/event") else ""
        )
        if status >= 500:
            result.server_errors += 1
            result.problem(f"{where}: {status} {text[:200]}")
        if 400 <= status < 500:
            try:
                body = json.loads(text)
            except ValueError:
                body = None
            if not is_openai_error(body):
                result.non_openai_errors += 1
                result.problem(f"{where}: {status} not an OpenAI error object: {text[:200]}")
        if case.path != "/metrics" and LEAK_RE.search(text):  # metrics name Ray's own series
            result.leaks += 1
            result.problem(f"{where}: {status} body leaks internals: {text[:200]}")
        try:
            case.validate_response(resp, checks=checks, headers=headers)
        except AssertionError as e:  # schemathesis raises Failure / FailureGroup (AssertionErrors)
            if status < 500:  # a 5xx is counted above already
                result.check_failures += 1
                result.problem(f"{where}: {status} {str(e).splitlines()[0][:200]}")

    for op_result in schema.get_all_operations():
        op = op_result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            strategy = op.as_strategy(generation_mode=mode)
            if model is not None:
                strategy = strategy.map(lambda c: _with_model(c, model))
            run = settings(
                max_examples=cases_per_run,
                deadline=None,
                database=None,
                derandomize=seed == 0,
                suppress_health_check=list(HealthCheck),
            )(given(case=strategy)(one))
            try:
                run()
            except Exception as e:  # noqa: BLE001 - e.g. hypothesis can't satisfy a negative mode
                if "Unsatisfiable" not in type(e).__name__:
                    result.harness_errors += 1
                    result.problem(f"{op.method.upper()} {op.path} {mode}: {e!r}"[:300])
    client.close()
    return result


def _with_model(case: Any, model: str) -> Any:
    body = case.body
    if isinstance(body, dict) and isinstance(body.get("model"), str):
        case.body = {**body, "model": model}
    return case


def _send(client: Any, kw: dict[str, Any], headers: dict[str, str]) -> Any:
    """requests-style keyword arguments (schemathesis's serialization) sent with httpx."""
    body = kw.get("data")
    if body is None and "json" in kw:
        body = json.dumps(kw["json"]).encode()
    if isinstance(body, str):
        body = body.encode()
    return client.request(
        kw["method"],
        kw["url"],
        headers={**(kw.get("headers") or {}), **headers},
        params=kw.get("params"),
        cookies=kw.get("cookies"),
        content=body,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", required=True, help="base URL, e.g. http://127.0.0.1:8000")
    ap.add_argument("--api-key")
    ap.add_argument("--model", help="a served model name to put into generated bodies")
    ap.add_argument("--cases", type=int, default=100, help="cases per (operation, mode)")
    args = ap.parse_args()
    print(json.dumps(fuzz(args.url, args.api_key, args.cases, args.model).to_dict(), indent=2))


if __name__ == "__main__":
    main()
