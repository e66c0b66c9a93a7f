"""ClusterConfig: defaults, examples, and errors naming the file, the exact line and the field."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from cluster.cli import CLIError
from cluster.config import (
    ClusterConfig,
    ConfigError,
    default_config,
    hash_api_key,
    load_cluster_config,
    parse_cluster_config,
)
from engine.config import EngineConfig

ROOT = Path(__file__).resolve().parents[1]


def errors_of(text: str) -> list[tuple[int | None, str, str]]:
    with pytest.raises(ConfigError) as ei:
        parse_cluster_config(text, "c.yaml")
    return ei.value.errors


def one_error(text: str) -> tuple[int | None, str, str]:
    errs = errors_of(text)
    assert len(errs) == 1, errs
    return errs[0]


# ---- defaults and valid files ------------------------------------------------------------------


def test_default_config_serves_demo_with_one_replica():
    cfg = default_config()
    (m,) = cfg.models
    assert (m.name, m.model, m.num_replicas, m.autoscaling) == ("demo", "demo", 1, None)
    assert m.initial_replicas() == 1
    assert (cfg.http.host, cfg.http.port) == ("127.0.0.1", 8000)
    assert cfg.router.policy == "prefix_aware"
    assert cfg.api_keys == [] and cfg.ray.address is None
    assert m.engine_config() == EngineConfig(model="demo")


def test_default_config_names_a_folder_model_after_its_directory():
    assert default_config("/models/Qwen2.5-0.5B/").models[0].name == "Qwen2.5-0.5B"
    assert default_config("demo-small").models[0].name == "demo-small"


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("cluster*.yaml")), ids=str)
def test_every_example_cluster_file_is_valid(path):
    cfg = load_cluster_config(path)
    assert cfg.models


def test_reference_example_sets_engine_options_and_replicas():
    cfg = load_cluster_config(ROOT / "examples" / "cluster.yaml")
    m = cfg.models[0]
    ec = m.engine_config()
    assert (ec.max_num_seqs, ec.num_kv_blocks, ec.model) == (32, 2048, "demo")
    assert m.num_replicas == 2


def test_autoscaling_bounds_and_initial_replicas():
    cfg = parse_cluster_config(
        "models:\n"
        "  - name: a\n"
        "    autoscaling: {min_replicas: 0, max_replicas: 3}\n"
        "  - name: b\n"
        "    autoscaling: {min_replicas: 1, max_replicas: 4, initial_replicas: 2}\n"
    )
    a, b = cfg.models
    assert a.num_replicas is None and a.initial_replicas() == 1  # scale-to-zero still starts one
    assert b.initial_replicas() == 2


def test_engine_config_takes_model_and_tp_from_the_model_entry():
    cfg = parse_cluster_config(
        "models:\n- name: m\n  model: demo-small\n  tensor_parallel_size: 2\n"
        "  engine: {max_num_seqs: 4}\n"
    )
    ec = cfg.models[0].engine_config()
    assert (ec.model, ec.tensor_parallel_size, ec.max_num_seqs) == ("demo-small", 2, 4)


def test_api_keys_digest_from_sha256_and_env(monkeypatch):
    digest = hashlib.sha256(b"secret-1").hexdigest()
    cfg = parse_cluster_config(
        f"models: [{{name: m}}]\napi_keys:\n  - sha256: {digest}\n  - env: FLEETLM_TEST_KEY\n"
    )
    monkeypatch.setenv("FLEETLM_TEST_KEY", "secret-2")
    assert cfg.api_key_digests() == [digest, hash_api_key("secret-2")]
    monkeypatch.delenv("FLEETLM_TEST_KEY")
    with pytest.raises(ValueError, match="FLEETLM_TEST_KEY is not set"):
        cfg.api_key_digests()


def test_round_trip_through_json_dump_is_identical():
    cfg = load_cluster_config(ROOT / "examples" / "cluster.yaml")
    assert ClusterConfig.model_validate(cfg.model_dump(mode="json")) == cfg


# ---- errors: file, line, field, what is allowed ------------------------------------------------


def test_unknown_top_level_field_lists_the_allowed_ones():
    line, field, msg = one_error("models: [{name: m}]\nroutr:\n  policy: pow2\n")
    assert (line, field) == (2, "routr")
    head, _, allowed = msg.partition("allowed: ")
    assert head == "unknown field; "
    assert allowed.split(", ") == list(ClusterConfig.model_fields)
    assert {"models", "router", "http", "api_keys", "ray", "limits"} <= set(allowed.split(", "))


def test_unknown_nested_field_points_at_its_own_line():
    text = (
        "models:\n"  # 1
        "  - name: m\n"  # 2
        "    resources_per_replica:\n"  # 3
        "      num_cpus: 2\n"  # 4
        "      num_cpu: 2\n"  # 5
    )
    assert one_error(text) == (
        5,
        "models[0].resources_per_replica.num_cpu",
        "unknown field; allowed: num_cpus, num_gpus",
    )


def test_bad_enum_value_says_what_is_allowed():
    text = "models:\n  - name: m\n\n    placement_strategy: LOOSE\n"
    line, field, msg = one_error(text)
    assert (line, field) == (4, "models[0].placement_strategy")
    assert "'PACK', 'STRICT_PACK' or 'SPREAD'" in msg


def test_router_policy_error():
    line, field, msg = one_error("models: [{name: m}]\nrouter:\n  policy: fastest\n")
    assert (line, field) == (3, "router.policy")
    assert "'prefix_aware', 'pow2', 'round_robin', 'session' or 'ray_prefix_affinity'" in msg


def test_unknown_engine_option_points_at_the_option():
    text = "models:\n  - name: m\n    engine:\n      max_num_seqs: 4\n      max_seqs: 8\n"
    line, field, msg = one_error(text)
    assert (line, field) == (5, "models[0].engine.max_seqs")
    assert msg.startswith("unknown field; allowed: dtype, device, max_model_len")
    assert "model," not in msg.split("allowed:")[1].replace("max_model_len", "")


def test_bad_engine_value_is_reported_at_its_line():
    text = "models:\n  - name: m\n    engine:\n      block_size: 16\n      max_num_seqs: 0\n"
    assert one_error(text) == (
        5,
        "models[0].engine.max_num_seqs",
        "Input should be greater than or equal to 1",
    )


@pytest.mark.parametrize(
    "spec,line,field,needle",
    [
        ("{method: ngram, num_tokns: 3}", 4, "models[0].engine.speculative.num_tokns", "unknown"),
        ("{method: medusa}", 4, "models[0].engine.speculative.method", "'ngram'"),
        ("{method: ngram, num_tokens: 40}", 4, "models[0].engine.speculative.num_tokens", "16"),
        ("{method: draft_model}", 4, "models[0].engine.speculative", "speculative.model"),
        ("{method: ngram, ngram_min: 5}", 4, "models[0].engine.speculative", "ngram_min"),
    ],
)
def test_speculative_is_checked_in_the_cluster_file(spec, line, field, needle):
    text = f"models:\n  - name: m\n    engine:\n      speculative: {spec}\n"
    got = one_error(text)
    assert got[:2] == (line, field) and needle in got[2], got


def test_speculative_reaches_the_engine_config():
    cfg = parse_cluster_config(
        "models:\n  - name: m\n    engine: {speculative: {method: ngram, num_tokens: 3}}\n"
    )
    spec = cfg.models[0].engine_config().speculative
    assert spec["method"] == "ngram" and spec["num_tokens"] == 3


def test_engine_schema_covers_every_engine_config_field():
    from dataclasses import fields

    from cluster.engine_options import MODEL_LEVEL, EngineOptions

    dataclass_fields = {f.name for f in fields(EngineConfig)} - set(MODEL_LEVEL)
    assert set(EngineOptions.model_fields) == dataclass_fields
    for name, f in EngineOptions.model_fields.items():
        assert f.description, name


def test_model_inside_engine_is_refused():
    line, field, msg = one_error("models:\n  - name: m\n    engine: {model: demo}\n")
    assert (line, field) == (3, "models[0].engine.model")
    assert "set it on the model entry" in msg


def test_num_replicas_and_autoscaling_together():
    text = "models:\n  - name: m\n    num_replicas: 2\n    autoscaling: {max_replicas: 3}\n"
    assert one_error(text) == (2, "models[0]", "give either num_replicas or autoscaling, not both")


def test_autoscaling_min_above_max():
    text = "models:\n- name: m\n  autoscaling:\n    min_replicas: 5\n    max_replicas: 2\n"
    assert one_error(text) == (
        3,
        "models[0].autoscaling",
        "min_replicas (5) must be <= max_replicas (2)",
    )


def test_number_out_of_range_names_the_bound():
    line, field, msg = one_error("models: [{name: m}]\nhttp:\n  port: 70000\n")
    assert (line, field) == (3, "http.port")
    assert "less than or equal to 65535" in msg


def test_missing_name_points_at_the_list_item():
    text = "models:\n  - name: a\n  - model: demo-small\n    num_replicas: 1\n"
    assert one_error(text) == (3, "models[1].name", "required field is missing")


def test_missing_models_and_empty_file():
    assert one_error("router: {policy: pow2}\n")[1:] == ("models", "required field is missing")
    assert one_error("")[1:] == ("models", "required field is missing")
    line, field, msg = one_error("models: []\n")
    assert (line, field) == (1, "models") and "at least 1" in msg


def test_duplicate_model_names():
    _, field, msg = one_error("models:\n  - name: a\n  - name: a\n")
    assert field == "(top level)" and "'a' appears twice" in msg


def test_bad_model_name_characters():
    line, field, msg = one_error("models:\n  - name: 'my model'\n")
    assert (line, field) == (2, "models[0].name") and "letters, digits" in msg


def test_api_key_errors():
    text = (
        "models: [{name: m}]\n"  # 1
        "api_keys:\n"  # 2
        "  - sha256: abc\n"  # 3
        "  - env: 'NOT A VAR'\n"  # 4
        "  - {}\n"  # 5
        "  - key: hunter2\n"  # 6
    )
    errs = errors_of(text)
    assert (3, "api_keys[0]", "sha256 must be 64 lower-case hex digits") in errs
    assert (4, "api_keys[1]", "env must be an environment variable name, got 'NOT A VAR'") in errs
    assert (5, "api_keys[2]", "give exactly one of sha256 or env") in errs
    allowed = "sha256, env, requests_per_minute, tokens_per_minute"
    assert (6, "api_keys[3].key", f"unknown field; allowed: {allowed}") in errs


def test_response_cache_section_is_validated_in_place():
    text = "models:\n  - name: m\n    caches:\n      semantic:\n        threshold: 1.5\n"
    line, field, msg = one_error(text)
    assert (line, field) == (4, "models[0].caches.semantic")
    assert "(0, 1]" in msg


def test_several_errors_are_all_reported_with_their_lines():
    text = "models:\n  - name: m\n    num_replicas: 0\nhttp:\n  port: -1\n"
    errs = errors_of(text)
    assert [(e[0], e[1]) for e in errs] == [(3, "models[0].num_replicas"), (5, "http.port")]


def test_yaml_syntax_error_names_the_line():
    assert one_error("models:\n  - name: m\n    engine: {max_num_seqs: 4\n")[:2] == (4, "(yaml)")


def test_top_level_must_be_a_mapping():
    expected = (1, "(top level)", "must be a mapping with at least 'models'")
    assert one_error("- name: m\n") == expected


def test_message_format_and_cli_error_type(tmp_path):
    p = tmp_path / "cluster.yaml"
    p.write_text("models:\n  - name: m\n    num_replicas: two\n")
    with pytest.raises(ConfigError) as ei:
        load_cluster_config(p)
    err = ei.value
    assert isinstance(err, CLIError) and isinstance(err, ValueError)
    assert str(err).startswith(f"{p}:3: models[0].num_replicas: Input should be a valid integer")


def test_unreadable_file(tmp_path):
    with pytest.raises(ConfigError, match=r"missing\.yaml: \(file\): can't read"):
        load_cluster_config(tmp_path / "missing.yaml")


def test_removed_output_channels_key():
    ok = parse_cluster_config("models: [{name: m}]\nrouter:\n  output_channels: true\n")
    assert not hasattr(ok.router, "output_channels")
    line, field, msg = one_error("models: [{name: m}]\nrouter:\n  output_channels: false\n")
    assert (line, field) == (3, "router.output_channels") and msg.startswith("removed;")


def test_ingress_replicas():
    from deployments.app import build_app

    assert parse_cluster_config("models: [{name: m}]\n").http.ingress_replicas == 1
    cfg = parse_cluster_config("models: [{name: m}]\nhttp: {ingress_replicas: 2}\n")
    assert build_app(cfg)._bound_deployment.num_replicas == 2  # the OpenAIIngress deployment
    assert one_error("models: [{name: m}]\nhttp: {ingress_replicas: 0}\n")[1] == (
        "http.ingress_replicas"
    )


def test_drain_timeout():
    assert parse_cluster_config("models: [{name: m}]\n").http.drain_timeout_s == 30.0
    cfg = parse_cluster_config("models: [{name: m}]\nhttp: {drain_timeout_s: 2.5}\n")
    assert cfg.http.drain_timeout_s == 2.5
    off = parse_cluster_config("models: [{name: m}]\nhttp: {drain_timeout_s: 0}\n")
    assert off.http.drain_timeout_s == 0  # 0: no drain
    line, field, _ = one_error("models: [{name: m}]\nhttp:\n  drain_timeout_s: -1\n")
    assert (line, field) == (3, "http.drain_timeout_s")
