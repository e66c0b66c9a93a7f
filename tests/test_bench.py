"""`fleetlm bench` against a local OpenAI-compatible stand-in server: injected timings, faults."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from cluster.bench import SLO, make_workload, run_workload
from cluster.bench.metrics import compute_result
from cluster.bench.workloads import RequestSpec, WorkloadSpec


@dataclass
class StubBehaviour:
    ttft_s: float = 0.0  # delay before the first chunk
    token_s: float = 0.0  # delay before each later chunk
    tokens_per_chunk: int = 1
    cached_fraction: float | None = None  # report prompt_tokens_details.cached_tokens
    # prompt -> "ok" | "http500" | "stream_error"
    outcome: Callable[[list[int] | str], str] = lambda prompt: "ok"
    bodies: list[dict] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0


def make_stub_app(b: StubBehaviour) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "stub-model", "object": "model"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        b.bodies.append(body)
        prompt = body["prompt"]
        outcome = b.outcome(prompt)
        if outcome == "http500":
            return JSONResponse({"error": {"message": "injected failure"}}, status_code=500)
        n = body["max_tokens"]
        prompt_tokens = len(prompt) if isinstance(prompt, list) else len(prompt.split())
        continuous = body.get("stream_options", {}).get("continuous_usage_stats", False)

        def usage(done: int) -> dict:
            u = {"prompt_tokens": prompt_tokens, "completion_tokens": done}
            if b.cached_fraction is not None:
                cached = int(prompt_tokens * b.cached_fraction)
                u["prompt_tokens_details"] = {"cached_tokens": cached}
            return u

        async def gen():
            b.in_flight += 1
            b.max_in_flight = max(b.max_in_flight, b.in_flight)
            try:
                done = 0
                first = True
                while done < n:
                    await asyncio.sleep(b.ttft_s if first else b.token_s)
                    if outcome == "stream_error" and not first:
                        yield 'data: {"error": {"message": "injected stream error"}}\n\n'
                        return
                    if outcome == "truncate" and not first:
                        return  # connection closes without [DONE]
                    first = False
                    k = min(b.tokens_per_chunk, n - done)
                    done += k
                    chunk = {"choices": [{"index": 0, "text": "x" * k, "finish_reason": None}]}
                    if continuous:
                        chunk["usage"] = usage(done)
                    yield f"data: {json.dumps(chunk)}\n\n"
                yield f"data: {json.dumps({'choices': [], 'usage': usage(done)})}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                b.in_flight -= 1

        return StreamingResponse(gen(), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def stub():
    """Yields (base_url, behaviour); tests reset the behaviour they need."""
    b = StubBehaviour()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(make_stub_app(b), host="127.0.0.1", port=port, log_level="warning")
    )
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    deadline = time.time() + 20
    while not server.started:
        assert time.time() < deadline, "stub server did not start"
        time.sleep(0.02)
    url = f"http://127.0.0.1:{port}"
    run(url, make_workload("W1", num_requests=2, prompt_len=4, output_len=2))  # warm both sides up
    yield url, b
    server.should_exit = True
    t.join(timeout=10)


def reset(b: StubBehaviour, **kw) -> StubBehaviour:
    fresh = StubBehaviour(**kw)
    for k, v in vars(fresh).items():
        setattr(b, k, v)
    return b


def run(url: str, wl: WorkloadSpec, **kw):
    kw.setdefault("progress", False)
    return asyncio.run(run_workload(url, "stub-model", wl, **kw))


def test_timings_match_injected_delays(stub):
    url, b = stub
    reset(b, ttft_s=0.2, token_s=0.05, cached_fraction=0.25)
    wl = make_workload("W1", num_requests=8, prompt_len=32, output_len=10)
    r = run(url, wl)
    assert (r.completed, r.failed) == (8, 0)
    assert r.total_output_tokens == 80 and r.total_input_tokens == 8 * 32
    # Sleeps never return early, so TTFT and E2E lower bounds are exact; chunk gaps jitter a little
    # both ways. Upper bounds are loose (2 shared, noisy cores) but tell TTFT from E2E (>= 650).
    assert 200 <= r.ttft_ms.min and r.ttft_ms.p50 < 550
    assert 650 <= r.e2e_ms.min and r.e2e_ms.mean < 1500
    assert 45 <= r.tpot_ms.mean < 100
    assert 45 <= r.itl_ms.mean < 100 and r.itl_ms.count == 8 * 9
    # TPOT is exactly (E2E - TTFT) / (output tokens - 1) per request, then averaged.
    per_req = [(q["e2e_ms"] - q["ttft_ms"]) / (q["output_tokens"] - 1) for q in r.requests]
    assert r.tpot_ms.mean == pytest.approx(sum(per_req) / len(per_req))
    assert r.output_throughput == pytest.approx(80 / r.duration_s)
    assert r.prefix_cache_hit_rate == pytest.approx(8 / 32)
    # Goodput: every request met TTFT<=1s, TPOT<=100ms; none meets a 100 ms TTFT SLO.
    assert r.goodput == pytest.approx(8 / r.duration_s)
    r2 = run(url, wl, slo=SLO(ttft_ms=100))
    assert r2.goodput == 0.0
    # Sent over the wire: token-id prompts of exact length, greedy, ignore_eos, usage requested.
    body = b.bodies[0]
    assert len(body["prompt"]) == 32 and all(isinstance(t, int) for t in body["prompt"])
    assert body["ignore_eos"] is True and body["temperature"] == 0.0 and body["stream"] is True
    assert body["stream_options"]["include_usage"] is True


def test_failures_counted_with_messages(stub):
    url, b = stub
    wl = make_workload("W1", num_requests=12, prompt_len=8, output_len=4, seed=3)

    def outcome(prompt):
        return {0: "http500", 1: "stream_error", 2: "truncate"}.get(prompt[0] % 4, "ok")

    reset(b, outcome=outcome)
    expect = [outcome(s.prompt) for s in wl.requests]
    assert expect.count("ok") not in (0, 12)  # the seed gives a mix
    r = run(url, wl)
    assert r.completed == expect.count("ok")
    assert r.failed == 12 - expect.count("ok")
    assert r.total_output_tokens == 4 * expect.count("ok")
    first_bad = next(i for i, o in enumerate(expect) if o != "ok")
    want = {
        "http500": "HTTP 500: injected failure",
        "stream_error": "stream error: injected stream error",
        "truncate": "stream ended before [DONE] after 1 chunks",
    }
    assert r.errors[0] == f"request {first_bad}: {want[expect[first_bad]]}"
    assert set(expect) == {"ok", "http500", "stream_error", "truncate"}
    assert len(r.errors) == min(5, r.failed)


def test_unreachable_server_fails_every_request():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    wl = make_workload("W1", num_requests=3, prompt_len=4, output_len=2)
    r = run(f"http://127.0.0.1:{port}", wl, timeout_s=5)
    assert (r.completed, r.failed) == (0, 3)
    assert "ConnectError" in r.errors[0]
    assert r.output_throughput == 0.0 and r.ttft_ms.count == 0


def test_concurrency_cap_and_multi_token_chunks(stub):
    url, b = stub
    reset(b, ttft_s=0.05, token_s=0.01, tokens_per_chunk=3)
    wl = make_workload("W2", groups=2, prompts_per_group=5, prefix_len=16, question_len=4)
    assert wl.concurrency == 16
    r = run(url, wl, concurrency=3, continuous_usage=False)
    assert r.completed == 10 and b.max_in_flight == 3
    # 64 tokens in chunks of 3 -> 22 chunks; with no per-chunk usage the total comes from usage.
    assert r.total_output_tokens == 640
    assert all(q["num_chunks"] == 22 for q in r.requests)
    assert 3 <= r.tpot_ms.mean <= 3 + 10  # 21 gaps of ~10 ms over 63 tokens ≈ 3.3 ms
    assert sum(r.timeseries.output_tok_s) * r.timeseries.bin_s == pytest.approx(640)


def test_poisson_arrivals_follow_seeded_gaps(stub):
    url, b = stub
    reset(b)
    wl = make_workload("W3", num_requests=20, prompt_len=8, output_len=2, rate=40.0)
    r = run(url, wl, seed=7)
    rng = random.Random(7)
    gaps = [rng.expovariate(40.0) for _ in range(19)]
    sends = sorted(q["send_s"] for q in r.requests)
    # Arrivals follow an absolute schedule (a late one does not push the rest back): each request
    # is sent no earlier than the sum of its seeded gaps, and not much later.
    for i in range(1, 20):
        assert sum(gaps[:i]) <= sends[i] + 1e-3 <= sum(gaps[:i]) + 0.25
    assert r.config["rate"] == 40.0 and r.completed == 20


def test_metrics_exact_from_synthetic_records():
    from cluster.bench.client import RequestRecord

    def rec(i, send, chunks, tokens, ok=True):
        r = RequestRecord(i, "a", prompt_len=10, max_tokens=len(chunks))
        r.send_time, r.chunk_times, r.chunk_tokens = send, chunks, tokens
        r.output_tokens, r.success = int(sum(tokens)), ok
        return r

    records = [
        rec(0, 100.0, [100.5, 100.6, 100.7], [1, 1, 1]),  # ttft .5, tpot .1, e2e .7
        rec(1, 100.0, [101.0, 101.4], [1, 1]),  # ttft 1.0, tpot .4, e2e 1.4
        rec(2, 100.0, [], [], ok=False),
    ]
    records[2].error = "boom"
    r = compute_result(records, 2.0, 100.0, SLO(ttft_ms=600, tpot_ms=200), {})
    assert (r.completed, r.failed, r.errors) == (2, 1, ["request 2: boom"])
    assert r.ttft_ms.mean == pytest.approx(750) and r.ttft_ms.p50 == pytest.approx(750)
    assert r.ttft_ms.p99 == pytest.approx(500 + 0.99 * 500)
    assert r.tpot_ms.mean == pytest.approx(250)
    assert r.itl_ms.count == 3 and r.itl_ms.max == pytest.approx(400)
    assert r.e2e_ms.max == pytest.approx(1400)
    assert r.request_throughput == 1.0 and r.output_throughput == 2.5
    assert r.total_token_throughput == pytest.approx((20 + 5) / 2)
    assert r.goodput == 0.5  # only request 0 meets both SLOs
    assert r.prefix_cache_hit_rate is None
    # Time series: 20 bins of 0.1 s; request-seconds in flight and tokens add up exactly.
    ts = r.timeseries
    assert ts.bin_s == pytest.approx(0.1) and len(ts.t) == 20
    assert sum(ts.in_flight) * ts.bin_s == pytest.approx(0.7 + 1.4)
    assert ts.in_flight[0] == pytest.approx(2) and ts.in_flight[-1] == 0
    assert sum(ts.output_tok_s) * ts.bin_s == pytest.approx(5)
    # Per tag (failed requests excluded): decode speed = tokens after the first / time after it.
    assert r.by_tag["a"]["count"] == 2
    assert r.by_tag["a"]["decode_tok_s"] == pytest.approx((2 + 1) / (0.2 + 0.4))
    assert r.by_tag["a"]["mean_e2e_ms"] == pytest.approx(1050)


def test_workload_shapes():
    w2 = make_workload("W2", groups=3, prompts_per_group=4, prefix_len=20, question_len=5, seed=1)
    assert len(w2.requests) == 12 and all(len(q.prompt) == 25 for q in w2.requests)
    by_group: dict[str, set] = {}
    for q in w2.requests:
        by_group.setdefault(q.tag, set()).add(tuple(q.prompt[:20]))
    assert len(by_group) == 3 and all(len(v) == 1 for v in by_group.values())
    assert [q.tag for q in w2.requests] != sorted(q.tag for q in w2.requests)  # shuffled
    again = make_workload(
        "W2", groups=3, prompts_per_group=4, prefix_len=20, question_len=5, seed=1
    )
    assert [q.prompt for q in again.requests] == [q.prompt for q in w2.requests]  # deterministic
    other = make_workload(
        "W2", groups=3, prompts_per_group=4, prefix_len=20, question_len=5, seed=2
    )
    assert [q.prompt for q in other.requests] != [q.prompt for q in w2.requests]
    w1 = make_workload("W1", vocab_size=100, exclude_ids={50})
    assert len(w1.requests) == 32 and w1.concurrency == 32
    assert all(16 <= t < 100 and t != 50 for q in w1.requests for t in q.prompt)
    w3 = make_workload("W3")
    assert (len(w3.requests), len(w3.requests[0].prompt), w3.requests[0].max_tokens) == (
        64,
        256,
        128,
    )
    w5 = make_workload("W5", num_requests=2, prompt_len=8)
    rep = w5.requests[0].prompt
    assert rep[:8] * 4 + rep[:4] == rep and w5.concurrency == 1
    assert {q.tag for q in w5.requests} == {"repeat", "orig", "dup"}
    with pytest.raises(ValueError, match="groups"):
        make_workload("W1", groups=2)
    with pytest.raises(ValueError, match="workload"):
        make_workload("W9")
    with pytest.raises(ValueError, match="prompt_len"):
        make_workload("W1", prompt_len=0)


def test_cli_writes_json_and_png(stub, tmp_path, capsys):
    from cluster.cli import main

    url, b = stub
    reset(b, ttft_s=0.01, token_s=0.005)
    js, png = tmp_path / "r.json", tmp_path / "r.png"
    argv = ["bench", "--url", url, "--workload", "w5", "--num-requests", "2", "--output-len", "6"]
    rc = main(argv + ["--json", str(js), "--png", str(png), "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "Output token throughput" in out and "dup (n=8)" in out
    d = json.loads(js.read_text())
    assert d["completed"] == 2 + 12 and d["config"]["model"] == "stub-model"  # from /v1/models
    assert d["total_output_tokens"] == 14 * 6 and len(d["requests"]) == 14
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    from cluster.bench.workloads import PARAPHRASES

    texts = [body["prompt"] for body in b.bodies if isinstance(body["prompt"], str)]
    assert texts == [t for group in PARAPHRASES for t in group]  # concurrency 1: in order


def test_cli_bad_option_is_one_line_error(capsys):
    from cluster.cli import main

    rc = main(
        [
            "bench",
            "--url",
            "http://127.0.0.1:9",
            "--model",
            "m",
            "--workload",
            "W1",
            "--groups",
            "2",
        ]
    )
    assert rc == 2
    assert "do not apply to workload W1" in capsys.readouterr().err


def test_request_spec_text_prompt_body():
    from cluster.bench.client import _build_body

    wl = WorkloadSpec("X", [RequestSpec("hi", 3, 0)], ignore_eos=False)
    body = _build_body("m", wl.requests[0], wl, continuous_usage=False)
    assert body["prompt"] == "hi" and "ignore_eos" not in body
    assert body["stream_options"] == {"include_usage": True}


def test_cli_rate_sweep(stub, tmp_path, capsys):
    from cluster.cli import main

    url, b = stub
    reset(b, ttft_s=0.01, token_s=0.002)
    js, png = tmp_path / "s.json", tmp_path / "s.png"
    argv = ["bench", "--url", url, "--model", "stub-model", "--workload", "W3", "--rate", "50,100"]
    argv += ["--num-requests", "6", "--prompt-len", "8", "--output-len", "3", "--no-progress"]
    assert main(argv + ["--json", str(js), "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "out tok/s" in out and out.count("fleetlm bench W3") == 2
    d = json.loads(js.read_text())
    assert [run["config"]["rate"] for run in d["sweep"]] == [50.0, 100.0]
    assert all(run["completed"] == 6 for run in d["sweep"]) and len(b.bodies) == 12
    assert png.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit):
        main(["bench", "--url", url, "--workload", "W3", "--rate", "1,x"])
