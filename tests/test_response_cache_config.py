"""CacheConfig validation: errors name the field; defaults are bounded, exact on, semantic off."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from deployments.response_cache.config import CacheConfig


def test_defaults():
    c = CacheConfig()
    assert c.exact.enabled and not c.semantic.enabled
    assert c.exact.max_entries and c.semantic.max_entries and 0 < c.semantic.threshold <= 1
    assert c.exact.temperature_zero_only and c.semantic.temperature_zero_only


def test_threshold_one_is_allowed():
    assert CacheConfig.model_validate({"semantic": {"threshold": 1}}).semantic.threshold == 1.0


@pytest.mark.parametrize(
    "body, field",
    [
        ({"semantic": {"threshold": 0}}, "semantic.threshold"),
        ({"semantic": {"threshold": -0.5}}, "semantic.threshold"),
        ({"semantic": {"threshold": 1.01}}, "semantic.threshold"),
        ({"semantic": {"threshold": float("nan")}}, "semantic.threshold"),
        ({"exact": {"max_entries": None}}, "exact.max_entries"),
        ({"exact": {"max_entries": 0}}, "exact.max_entries"),
        ({"semantic": {"max_entries": None}}, "semantic.max_entries"),
        ({"exact": {"ttl_s": 0}}, "exact.ttl_s"),
        ({"semantic": {"ttl_s": float("inf")}}, "semantic.ttl_s"),
        ({"exact": {"max_bytes": 0}}, "exact.max_bytes"),
        ({"semantic": {"max_batch_size": 0}}, "semantic.max_batch_size"),
        ({"semantic": {"embed_dtype": "fp8"}}, "semantic.embed_dtype"),
        ({"semantic": {"batch_wait_ms": -1}}, "semantic.batch_wait_ms"),
    ],
)
def test_bad_values_name_the_field(body, field):
    with pytest.raises(ValidationError) as e:
        CacheConfig.model_validate(body)
    assert field in str(e.value)


def test_byte_bound_alone_is_a_bound():
    c = CacheConfig.model_validate({"exact": {"max_entries": None, "max_bytes": 1 << 20}})
    assert c.exact.max_bytes == 1 << 20


def test_unknown_option_is_an_error():
    with pytest.raises(ValidationError) as e:
        CacheConfig.model_validate({"semantic": {"treshold": 0.9}})
    assert "treshold" in str(e.value)
