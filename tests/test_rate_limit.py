"""Per-key token buckets (deployments/rate_limit.py) with an explicit clock: exact numbers."""

from __future__ import annotations

import pytest

from cluster.config import ClusterConfig
from deployments.protocol import APIError
from deployments.rate_limit import (
    KeyLimit,
    RateLimiter,
    TokenBucket,
    admit_or_raise,
    format_duration,
    limiter_for,
)


def test_bucket_refills_linearly_up_to_capacity():
    b = TokenBucket.full(60, now=0.0)  # 1 per second
    b.level = 0.0
    b.refill(2.5)
    assert b.level == 2.5
    b.refill(1000.0)
    assert b.level == 60.0
    b.level = 10.0
    assert b.wait_s(12.0) == 2.0 and b.reset_s() == 50.0


def test_requests_per_minute():
    rl = RateLimiter({"a": KeyLimit(requests_per_minute=3)})
    got = [rl.admit("a", now=0.0) for _ in range(4)]
    assert [d.allowed for d in got] == [True, True, True, False]
    assert [d.headers["x-ratelimit-remaining-requests"] for d in got[:3]] == ["2", "1", "0"]
    refused = got[3]
    assert refused.retry_after_s == 20  # one request refills in 60/3 s
    assert refused.headers["x-ratelimit-limit-requests"] == "3"
    assert refused.headers["x-ratelimit-reset-requests"] == "1m0s"
    assert not rl.admit("a", now=19.9).allowed
    assert rl.admit("a", now=20.0).allowed
    assert not rl.admit("a", now=20.0).allowed


def test_keys_do_not_share_buckets_and_unlimited_keys_pass():
    rl = RateLimiter({"a": KeyLimit(requests_per_minute=1), "b": KeyLimit(requests_per_minute=1)})
    assert rl.admit("a", 0.0).allowed and not rl.admit("a", 0.0).allowed
    assert rl.admit("b", 0.0).allowed
    assert all(rl.admit("free", 0.0).allowed for _ in range(100))
    assert rl.admit("free", 0.0).headers == {}


def test_tokens_per_minute_charge_real_usage_then_wait_for_the_refill():
    rl = RateLimiter({"a": KeyLimit(tokens_per_minute=600)})  # 10 tokens per second
    assert rl.admit("a", 0.0).allowed
    rl.charge("a", 900, now=0.0)  # more than the budget: the bucket goes to -300
    d = rl.admit("a", 0.0)
    assert not d.allowed
    assert d.retry_after_s == 31  # (300 + epsilon) / 10 per second, rounded up
    assert d.headers["x-ratelimit-remaining-tokens"] == "0"
    assert d.headers["x-ratelimit-reset-tokens"] == "1m30s"
    assert not rl.admit("a", 30.0).allowed  # exactly 0 left: still refused
    assert rl.admit("a", 30.1).allowed


def test_both_limits_the_longer_wait_wins():
    rl = RateLimiter({"a": KeyLimit(requests_per_minute=60, tokens_per_minute=60)})
    assert rl.admit("a", 0.0).allowed
    rl.charge("a", 120, 0.0)  # tokens at -60: a minute to get back above zero
    d = rl.admit("a", 0.0)
    assert not d.allowed and d.retry_after_s == 61
    assert set(d.headers) == {
        f"x-ratelimit-{w}-{k}"
        for w in ("limit", "remaining", "reset")
        for k in ("requests", "tokens")
    }


def test_shards_split_the_limit():
    rl = RateLimiter({"a": KeyLimit(requests_per_minute=10)}, num_shards=2)
    assert sum(rl.admit("a", 0.0).allowed for _ in range(10)) == 5
    with pytest.raises(ValueError):
        RateLimiter({}, num_shards=0)


def test_format_duration():
    assert format_duration(0.5) == "0.5s"
    assert format_duration(12.0) == "12s"
    assert format_duration(360.0) == "6m0s"
    assert format_duration(61.4) == "1m1s"


def test_admit_or_raise_is_a_429_openai_error_and_limits_come_from_api_keys():
    cfg = ClusterConfig.model_validate(
        {
            "models": [{"name": "m"}],
            "api_keys": [
                {"sha256": "a" * 64, "requests_per_minute": 1},
                {"sha256": "b" * 64},
            ],
        }
    )
    rl = limiter_for(cfg.api_keys, cfg.api_key_digests())
    admit_or_raise(rl, "a" * 32, 0.0)
    with pytest.raises(APIError) as e:
        admit_or_raise(rl, "a" * 32, 0.0)
    err = e.value
    assert err.status == 429 and err.type == "rate_limit_error"
    assert err.code == "rate_limit_exceeded"
    assert err.headers["retry-after"] == "60"
    assert err.headers["x-ratelimit-remaining-requests"] == "0"
    for _ in range(5):
        admit_or_raise(rl, "b" * 32, 0.0)  # no limit on the second key
