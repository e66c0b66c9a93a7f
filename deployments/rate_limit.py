"""Per-API-key limits on requests and tokens per minute: token buckets (Ray-free, clock passed in).

Each key with a limit owns two buckets. The request bucket holds ``requests_per_minute`` and
refills continuously at that rate per 60 s; admitting a request takes 1. The token bucket holds
``tokens_per_minute``; a request is admitted while the bucket is above zero, and when it ends its
real usage (prompt + completion tokens, known only then) is taken, so the bucket may go below zero
and the key then waits until the refill brings it back above. This charges what was used, not a
guess made before tokenizing.

Across ingress replicas: each of ``num_shards`` ingress replicas enforces ``1/num_shards`` of
every limit (a deterministic split: no shared state and no call on the request path; Serve's proxy
spreads requests over the ingress replicas, so a key's total stays within its limit). fleetlm runs
one ingress replica, where the split is exact.

A refused request gets a 429 with OpenAI's headers: ``x-ratelimit-limit-requests``,
``x-ratelimit-remaining-requests``, ``x-ratelimit-reset-requests`` (time until the bucket is full
again, e.g. ``"1.5s"``, ``"6m0s"``) and the same three for tokens, plus ``Retry-After`` (whole
seconds until the request would be admitted).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class TokenBucket:
    capacity: float
    per_s: float  # refill rate
    level: float
    updated: float  # clock of the last refill

    @classmethod
    def full(cls, per_minute: float, now: float) -> TokenBucket:
        return cls(per_minute, per_minute / 60.0, per_minute, now)

    def refill(self, now: float) -> None:
        if now > self.updated:
            self.level = min(self.capacity, self.level + (now - self.updated) * self.per_s)
            self.updated = now

    def wait_s(self, need: float) -> float:
        """Seconds until ``level >= need`` (0 if already)."""
        return max(0.0, (need - self.level) / self.per_s)

    def reset_s(self) -> float:
        """Seconds until the bucket is full again."""
        return max(0.0, (self.capacity - self.level) / self.per_s)


@dataclass(frozen=True)
class KeyLimit:
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after_s: int  # whole seconds; 0 when allowed
    headers: dict[str, str]


def format_duration(s: float) -> str:
    """OpenAI's reset format: ``"0.5s"``, ``"12s"``, ``"6m0s"``."""
    if s < 60:
        return f"{round(s, 3):g}s"
    m, sec = divmod(s, 60)
    return f"{int(m)}m{round(sec):d}s"


class RateLimiter:
    """Buckets per key. ``admit(key, now)`` on arrival, ``charge(key, tokens, now)`` at the end."""

    def __init__(self, limits: dict[str, KeyLimit], num_shards: int = 1) -> None:
        if num_shards < 1:
            raise ValueError("num_shards must be >= 1")
        self.limits = {
            k: v for k, v in limits.items() if v.requests_per_minute or v.tokens_per_minute
        }
        self.num_shards = num_shards
        self._requests: dict[str, TokenBucket] = {}
        self._tokens: dict[str, TokenBucket] = {}

    def _buckets(self, key: str, now: float) -> tuple[TokenBucket | None, TokenBucket | None]:
        lim = self.limits[key]
        req = tok = None
        if lim.requests_per_minute:
            req = self._requests.get(key)
            if req is None:
                req = self._requests[key] = TokenBucket.full(
                    lim.requests_per_minute / self.num_shards, now
                )
            req.refill(now)
        if lim.tokens_per_minute:
            tok = self._tokens.get(key)
            if tok is None:
                tok = self._tokens[key] = TokenBucket.full(
                    lim.tokens_per_minute / self.num_shards, now
                )
            tok.refill(now)
        return req, tok

    def admit(self, key: str, now: float) -> Decision:
        if key not in self.limits:
            return Decision(True, 0, {})
        req, tok = self._buckets(key, now)
        wait = 0.0
        if req is not None and req.level < 1.0:
            wait = max(wait, req.wait_s(1.0))
        if tok is not None and tok.level <= 0.0:
            wait = max(wait, tok.wait_s(1e-9))
        allowed = wait == 0.0
        if allowed and req is not None:
            req.level -= 1.0
        return Decision(allowed, 0 if allowed else max(1, math.ceil(wait)), _headers(req, tok))

    def charge(self, key: str, tokens: int, now: float) -> None:
        """Take a finished request's real usage from the key's token bucket."""
        if key not in self.limits or tokens <= 0:
            return
        _, tok = self._buckets(key, now)
        if tok is not None:
            tok.level -= tokens


def _headers(req: TokenBucket | None, tok: TokenBucket | None) -> dict[str, str]:
    h: dict[str, str] = {}
    for name, b in (("requests", req), ("tokens", tok)):
        if b is None:
            continue
        h[f"x-ratelimit-limit-{name}"] = str(int(b.capacity))
        h[f"x-ratelimit-remaining-{name}"] = str(max(0, math.floor(b.level)))
        h[f"x-ratelimit-reset-{name}"] = format_duration(b.reset_s())
    return h


def admit_or_raise(limiter: RateLimiter, key: str, now: float) -> None:
    """The ingress's check: a 429 OpenAI error object with the rate-limit headers when refused."""
    from deployments.protocol import APIError

    d = limiter.admit(key, now)
    if d.allowed:
        return
    raise APIError(
        429,
        f"rate limit reached for this API key; retry in {d.retry_after_s}s",
        type="rate_limit_error",
        code="rate_limit_exceeded",
        headers={"retry-after": str(d.retry_after_s), **d.headers},
    )


def limiter_for(api_keys: list, digests: list[str], num_shards: int = 1) -> RateLimiter:
    """From cluster.config.ApiKey entries and their digests (the ingress's tenant key is the
    digest's first 32 hex digits)."""
    limits = {
        d[:32]: KeyLimit(k.requests_per_minute, k.tokens_per_minute)
        for k, d in zip(api_keys, digests, strict=True)
    }
    return RateLimiter(limits, num_shards)
