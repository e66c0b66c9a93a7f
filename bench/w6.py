"""W6, many tenants (WORKLOADS.md): the workload, its KV sizing and its ideal hit rate.

Shared by bench/routing.py (served) and bench/routing_sim.py (simulated time).

Shape, after llm-d's precise-prefix benchmark (inference-perf's shared-prefix generator): T tenants,
each with a system prompt of S tokens; U users per tenant, each with a Q-token question, so there
are T x U distinct prompts (tenant prompt + user question). Arrivals are Poisson on a ramp of rates
(one step of ``step_s`` seconds per rate, on the same replicas, so caches carry over); each arrival
is a uniformly drawn user's prompt, O output tokens, greedy, ignoring EOS. Each replica's KV cache
holds ``kv_fraction`` (0.4) of the distinct tenant-prefix tokens T x S, plus room for
``room_requests`` running requests' own blocks: the prefixes need more than the whole cluster's
cache (2 replicas x 40% = 80%), so placement decides who hits.

Ideal hit rate: a single cache with no size limit. A tenant's first request misses whole; a user's
first request hits its tenant's prefix; a repeated prompt hits every block but the one holding its
last token (the engine always computes that token). Block-granular, as the engine counts hits.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from cluster.bench.workloads import RequestSpec, TokenSampler, WorkloadSpec

BLOCK_SIZE = 16  # EngineConfig's default; KV sizing and hits count in these blocks


@dataclass(frozen=True)
class W6:
    tenants: int = 24
    prefix_len: int = 1024
    users: int = 4
    question_len: int = 128
    output_len: int = 32
    rates: tuple[float, ...] = (1.0, 2.0, 3.0)
    step_s: float = 60.0
    seed: int = 0
    kv_fraction: float = 0.4
    room_requests: int = 8
    # Tenant popularity: 0 draws tenants uniformly (W6 as WORKLOADS.md defines it); s > 0 draws
    # tenant k (k = 1..T) with probability proportional to 1 / k**s (Zipf), then a user uniformly.
    tenant_skew: float = 0.0

    def __post_init__(self) -> None:
        for name in ("tenants", "prefix_len", "users", "question_len", "output_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not self.rates or any(not r > 0 for r in self.rates):
            raise ValueError(f"rates must be positive, got {self.rates!r}")
        if not self.step_s > 0:
            raise ValueError(f"step_s must be > 0, got {self.step_s}")
        if not self.kv_fraction > 0:
            raise ValueError(f"kv_fraction must be > 0, got {self.kv_fraction}")
        if self.room_requests < 0:
            raise ValueError(f"room_requests must be >= 0, got {self.room_requests}")
        if not self.tenant_skew >= 0:
            raise ValueError(f"tenant_skew must be >= 0, got {self.tenant_skew}")

    @property
    def prompt_len(self) -> int:
        return self.prefix_len + self.question_len

    def kv_blocks(self) -> tuple[int, int]:
        """(prefix share, running-request room) in blocks per replica; the cache is their sum."""
        prefix = math.ceil(self.kv_fraction * self.tenants * self.prefix_len / BLOCK_SIZE)
        own = math.ceil((self.question_len + self.output_len) / BLOCK_SIZE)
        room = self.room_requests * own
        # Whatever the fraction, one whole request must fit.
        prefix = max(prefix, math.ceil((self.prompt_len + self.output_len) / BLOCK_SIZE) + 1 - room)
        return prefix, room

    def prompts(self) -> list[list[int]]:
        """The T x U distinct prompts, tenant-major: prompt i is tenant i // U, user i % U."""
        sampler = TokenSampler(seed=self.seed)
        out = []
        for _ in range(self.tenants):
            prefix = sampler.draw(self.prefix_len)
            out.extend(prefix + sampler.draw(self.question_len) for _ in range(self.users))
        return out

    def tenant_weights(self) -> list[float]:
        """Each tenant's share of the arrivals (uniform, or Zipf with ``tenant_skew``)."""
        w = [1.0 / (k + 1) ** self.tenant_skew for k in range(self.tenants)]
        total = sum(w)
        return [x / total for x in w]

    def steps(self) -> list[WorkloadSpec]:
        """One Poisson workload per rate: round(rate x step_s) arrivals, each a user of a tenant
        drawn by ``tenant_weights()`` (uniformly drawn users when ``tenant_skew`` is 0)."""
        prompts = self.prompts()
        rng = random.Random(self.seed + 1)
        weights = self.tenant_weights()
        out = []
        for rate in self.rates:
            reqs = []
            for _ in range(max(1, round(rate * self.step_s))):
                if self.tenant_skew:
                    t = rng.choices(range(self.tenants), weights)[0]
                    i = t * self.users + rng.randrange(self.users)
                else:
                    i = rng.randrange(len(prompts))
                reqs.append(
                    RequestSpec(
                        prompts[i],
                        self.output_len,
                        self.prompt_len,
                        tag=f"t{i // self.users}u{i % self.users}",
                    )
                )
            out.append(
                WorkloadSpec("W6", reqs, rate=rate, params=dict(rate=rate, step_s=self.step_s))
            )
        return out


def tenant_of(tag: str) -> str:
    """The tenant part of a W6 request tag ("t3u1" -> "t3")."""
    return tag.split("u", 1)[0]


def ideal_hit_rates(steps: list[WorkloadSpec], prefix_len: int) -> list[float]:
    """Per step, the hit rate of one unbounded cache that saw every earlier request (docstring)."""
    tenants: set[str] = set()
    users: set[str] = set()
    out = []
    for wl in steps:
        hit = query = 0
        for spec in wl.requests:
            n = spec.prompt_len
            cap = (n - 1) // BLOCK_SIZE * BLOCK_SIZE
            if spec.tag in users:
                hit += cap
            elif tenant_of(spec.tag) in tenants:
                hit += min(prefix_len // BLOCK_SIZE * BLOCK_SIZE, cap)
            query += n
            users.add(spec.tag)
            tenants.add(tenant_of(spec.tag))
        out.append(hit / query)
    return out
