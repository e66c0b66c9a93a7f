"""Replay an arrival trace through decide() with a simple queueing model of replica capacity, so an
operator sees what a policy edit would do before applying it.

Model (fixed time step `tick_s`, a decision every tick as Serve's controller does every 0.1 s):
- A replica serves at most `max_running` requests at once and produces `tokens_per_s` output tokens
  per second shared equally among them (continuous batching at a measured throughput).
- Requests that find every serving replica full wait in one FIFO queue in front of the replicas
  (Serve's handle queue); a free slot takes the oldest, on the least loaded replica.
- TTFT = wait in the queue + one token's time at the replica's per-request rate on admission.
- A replica decided into existence serves after `startup_s` (model load). A replica decided away
  stops taking requests, finishes its running ones (graceful drain) and is gone; one still starting
  is dropped at once. Replica-seconds count from the decision to add until it is gone.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

from autoscaling.decide import Params, ReplicaLoad, Snapshot, State, decide

TTFT_WINDOW_S = 10.0  # a replica reports the p90 of its TTFTs over this window, as the server does


@dataclass
class Arrival:
    t: float  # seconds from the trace start
    output_tokens: int


@dataclass
class SimConfig:
    tokens_per_s: float = 200.0  # one replica's output tokens/s, all its running requests together
    max_running: int = 8
    startup_s: float = 10.0
    tick_s: float = 0.1
    initial_replicas: int = 1
    slo_s: float = 1.0  # TTFT above this counts as an SLO violation (the policy's own SLO if set)
    step_at_s: float | None = None  # when the load step begins (W4: 30 s), for scale_up_s

    def __post_init__(self) -> None:
        for name in ("tokens_per_s", "tick_s", "slo_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_running < 1:
            raise ValueError(f"max_running must be >= 1, got {self.max_running}")
        if self.startup_s < 0:
            raise ValueError(f"startup_s must be >= 0, got {self.startup_s}")
        if self.initial_replicas < 0:
            raise ValueError(f"initial_replicas must be >= 0, got {self.initial_replicas}")


@dataclass
class _Req:
    arrival: float
    remaining: float  # output tokens still to produce


@dataclass
class _Replica:
    created: float
    ready_at: float
    draining: bool = False
    running: list[_Req] = field(default_factory=list)
    ttfts: list[tuple[float, float]] = field(default_factory=list)  # (time, ttft)


@dataclass
class Row:
    """One second of the replay."""

    t: float
    target: int  # replicas decided
    serving: int  # replicas ready and not draining
    queued: int  # waiting in front of the replicas
    running: int
    arrivals: int  # requests that arrived during this second
    p99_ttft_s: float | None  # over requests admitted during this second
    slo_violations: int  # cumulative


@dataclass
class SimResult:
    rows: list[Row]
    decisions: list[tuple[float, int, str]]  # (time, replicas, reason) at each change of count
    ttfts: list[tuple[float, float]]  # (arrival time, ttft) per request, in admission order
    replica_seconds: float
    slo_violations: int
    unfinished: int  # requests still queued or running when the replay ended
    scale_up_s: float | None  # step start -> first added replica serving (None: none added)
    slo_s: float

    def p99_ttft_s(self, start: float = 0.0, end: float = math.inf) -> float | None:
        xs = [x for a, x in self.ttfts if start <= a < end]
        return percentile(xs, 99)

    def summary(self) -> dict:
        return {
            "replica_seconds": round(self.replica_seconds, 1),
            "slo_violations": self.slo_violations,
            "requests": len(self.ttfts) + self.unfinished,
            "unfinished": self.unfinished,
            "p99_ttft_s": _r(self.p99_ttft_s()),
            "scale_up_s": _r(self.scale_up_s),
            "max_replicas": max((r.target for r in self.rows), default=0),
        }


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    k = max(0, math.ceil(q / 100 * len(s)) - 1)
    return s[k]


def w4_trace(
    base_rate: float = 1.0,
    factor: float = 8.0,
    low_s: float = 30.0,
    step_s: float = 120.0,
    tail_s: float = 120.0,
    output_tokens: int = 64,
    seed: int = 0,
) -> list[Arrival]:
    """WORKLOADS.md W4: Poisson arrivals; low_s at base_rate, step_s at factor x, tail_s low."""
    rng = random.Random(seed)
    out: list[Arrival] = []
    for start, dur, rate in (
        (0.0, low_s, base_rate),
        (low_s, step_s, base_rate * factor),
        (low_s + step_s, tail_s, base_rate),
    ):
        t = start
        while rate > 0:
            t += rng.expovariate(rate)
            if t >= start + dur:
                break
            out.append(Arrival(t, output_tokens))
    return out


def load_trace(path: str | Path, output_tokens: int = 64) -> list[Arrival]:
    """JSONL, one request a line: {"t": seconds} and optionally "output_tokens"."""
    out: list[Arrival] = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            t = float(d["t"])
            n = int(d.get("output_tokens", output_tokens))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f'{path}:{i}: each line must be a JSON object with "t" (seconds) and optional '
                f'"output_tokens" (integer >= 1): {e}'
            ) from None
        if t < 0 or n < 1:
            raise ValueError(f"{path}:{i}: t must be >= 0 and output_tokens >= 1")
        out.append(Arrival(t, n))
    out.sort(key=lambda a: a.t)
    return out


def simulate(arrivals: list[Arrival], params: Params, cfg: SimConfig) -> SimResult:
    slo = params.ttft_slo_s or cfg.slo_s
    dt = cfg.tick_s
    end = (arrivals[-1].t if arrivals else 0.0) + 60.0  # let the tail drain and scale down
    replicas = [_Replica(created=0.0, ready_at=0.0) for _ in range(cfg.initial_replicas)]
    gone_seconds = 0.0
    queue: list[_Req] = []
    target, state = cfg.initial_replicas, State()
    rows: list[Row] = []
    decisions: list[tuple[float, int, str]] = []
    ttfts: list[tuple[float, float]] = []
    violations, ai, scale_up_s = 0, 0, None
    sec_arrivals, sec_ttfts = 0, []
    steps = int(round(end / dt))
    per_second = max(1, int(round(1.0 / dt)))
    for k in range(1, steps + 1):
        now = k * dt
        while ai < len(arrivals) and arrivals[ai].t <= now:
            queue.append(_Req(arrivals[ai].t, float(arrivals[ai].output_tokens)))
            ai += 1
            sec_arrivals += 1
        serving = [r for r in replicas if r.ready_at <= now and not r.draining]
        if (
            scale_up_s is None
            and len(serving) > cfg.initial_replicas
            and now >= (cfg.step_at_s or 0.0)
        ):
            scale_up_s = now - (cfg.step_at_s or 0.0)
        # Admit FIFO onto the least loaded serving replica with a free slot.
        while queue and serving:
            rep = min(serving, key=lambda r: len(r.running))
            if len(rep.running) >= cfg.max_running:
                break
            req = queue.pop(0)
            rep.running.append(req)
            ttft = now - req.arrival + len(rep.running) / cfg.tokens_per_s
            rep.ttfts.append((now, ttft))
            ttfts.append((req.arrival, ttft))
            sec_ttfts.append(ttft)
            violations += ttft > slo
        # Serve: each replica's tokens this tick shared equally among its running requests.
        for rep in replicas:
            if rep.running and rep.ready_at <= now:
                share = cfg.tokens_per_s * dt / len(rep.running)
                for req in rep.running:
                    req.remaining -= share
                rep.running = [q for q in rep.running if q.remaining > 1e-9]
        # Drained replicas go.
        for rep in [r for r in replicas if r.draining and not r.running]:
            gone_seconds += now - rep.created
            replicas.remove(rep)
        # Decide.
        loads = []
        for rep in serving:
            rep.ttfts = [(t, x) for t, x in rep.ttfts if t > now - TTFT_WINDOW_S]
            p90 = percentile([x for _, x in rep.ttfts], 90)
            loads.append(ReplicaLoad(waiting=0, running=len(rep.running), ttft_s=p90))
        snap = Snapshot(now=now, current_replicas=target, replicas=loads, queued=len(queue))
        new, reason, state = decide(snap, params, state)
        if new != target:
            decisions.append((round(now, 3), new, reason))
            gone_seconds += _resize(replicas, new, now, cfg.startup_s)
            target = new
        if k % per_second == 0:
            rows.append(
                Row(
                    t=round(now, 3),
                    target=target,
                    serving=sum(1 for r in replicas if r.ready_at <= now and not r.draining),
                    queued=len(queue),
                    running=sum(len(r.running) for r in replicas),
                    arrivals=sec_arrivals,
                    p99_ttft_s=percentile(sec_ttfts, 99),
                    slo_violations=violations,
                )
            )
            sec_arrivals, sec_ttfts = 0, []
    replica_seconds = gone_seconds + sum(end - r.created for r in replicas)
    unfinished = len(queue) + sum(len(r.running) for r in replicas) + (len(arrivals) - ai)
    return SimResult(
        rows, decisions, ttfts, replica_seconds, violations, unfinished, scale_up_s, slo
    )


def _resize(replicas: list[_Replica], n: int, now: float, startup_s: float) -> float:
    """Make `n` replicas active (not draining); returns replica-seconds of replicas dropped now."""
    active = [r for r in replicas if not r.draining]
    gone = 0.0
    for _ in range(n - len(active)):
        replicas.append(_Replica(created=now, ready_at=now + startup_s))
    if n < len(active):
        # Starting replicas go first (nothing to drain), then the least loaded serving ones.
        victims = sorted(active, key=lambda r: (r.ready_at <= now, len(r.running)))
        for rep in victims[: len(active) - n]:
            if rep.ready_at > now:
                gone += now - rep.created
                replicas.remove(rep)
            else:
                rep.draining = True
    return gone
