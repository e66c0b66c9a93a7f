"""Policy YAML: merging per model, and errors that name the file, the line and the field."""

from __future__ import annotations

import pytest

from autoscaling.decide import Params
from autoscaling.policy_file import Policy, PolicyError, load_policy, parse_policy

GOOD = """\
default:
  target_queue_depth: 6
  scale_down_window_s: 45
models:
  demo-small:
    max_replicas: 3
    ttft_slo_s: 1.5
  qwen2.5-0.5b:
    target_queue_depth: 2
    scale_to_zero_after_s: 300
"""


def test_merge_model_over_default_over_builtins():
    pol = parse_policy(GOOD, "p.yaml")
    builtin = Params()
    p = pol.params_for("demo-small")
    assert p == Params(target_queue_depth=6, scale_down_window_s=45, max_replicas=3, ttft_slo_s=1.5)
    assert p.max_step_down == builtin.max_step_down
    q = pol.params_for("qwen2.5-0.5b")
    assert (q.target_queue_depth, q.scale_down_window_s, q.scale_to_zero_after_s) == (2, 45, 300)
    # an unknown model runs with `default`
    assert pol.params_for("other") == Params(target_queue_depth=6, scale_down_window_s=45)


def test_round_trip_through_the_stored_dict():
    pol = parse_policy(GOOD)
    again = Policy.from_dict(pol.to_dict())
    assert again == pol
    assert again.params_for("demo-small") == pol.params_for("demo-small")
    assert parse_policy(pol.to_yaml()) == pol


def test_empty_file_is_the_builtin_policy():
    assert parse_policy("").params_for("x") == Params()


def errors_of(text: str) -> list[tuple[int | None, str, str]]:
    with pytest.raises(PolicyError) as ei:
        parse_policy(text, "pol.yaml")
    return ei.value.errors


def test_type_and_range_errors_name_line_and_field_and_what_is_allowed():
    errs = errors_of(
        "default:\n"
        "  target_queue_depth: 4\n"
        "models:\n"
        "  demo:\n"
        "    max_step_up: 0\n"
        "    target_queue_depth: lots\n"
    )
    assert [(line, fld) for line, fld, _ in errs] == [
        (5, "models.demo.max_step_up"),
        (6, "models.demo.target_queue_depth"),
    ]
    assert "greater than or equal to 1" in errs[0][2]
    assert "Most replicas added per decision" in errs[0][2]
    assert "valid number" in errs[1][2]


def test_unknown_field_lists_the_allowed_ones():
    [(line, fld, msg)] = errors_of("models:\n  demo:\n    max_replica: 3\n")
    assert (line, fld) == (3, "models.demo.max_replica")
    assert msg.startswith("unknown field; allowed: target_queue_depth, min_replicas, max_replicas")
    [(line, fld, msg)] = errors_of("defaults:\n  max_replicas: 3\n")
    assert (line, fld, msg) == (1, "defaults", "unknown field; allowed: default, models")


def test_cross_field_rule_points_at_the_model_entry():
    text = "default:\n  min_replicas: 3\nmodels:\n  demo:\n    max_replicas: 2\n"
    [(line, fld, msg)] = errors_of(text)
    assert (line, fld) == (5, "models.demo.max_replicas")
    assert msg == "max_replicas (2) must be >= min_replicas (3)"
    # min_replicas 5 in `default` breaks the built-in max_replicas 4 there and in every model;
    # a model that writes neither field is pointed at by its own key
    errs = errors_of("default:\n  min_replicas: 5\nmodels:\n  demo: {}\n")
    assert [(line, fld) for line, fld, _ in errs] == [
        (2, "default.min_replicas"),
        (4, "models.demo.max_replicas"),
    ]


def test_yaml_syntax_error_has_a_line():
    [(line, fld, msg)] = errors_of("models:\n  demo:\n    max_replicas: [1\n")
    assert fld == "(yaml)" and line == 4 and msg.startswith("invalid YAML")


def test_top_level_must_be_a_mapping():
    [(line, fld, _)] = errors_of("- 1\n- 2\n")
    assert (line, fld) == (1, "(top level)")


def test_load_policy_names_the_file(tmp_path):
    f = tmp_path / "policy.yaml"
    f.write_text("models:\n  demo:\n    ttft_slo_s: -1\n")
    with pytest.raises(PolicyError, match=r"policy\.yaml:3: models\.demo\.ttft_slo_s: "):
        load_policy(f)
    with pytest.raises(PolicyError, match="can't read"):
        load_policy(tmp_path / "missing.yaml")


def test_examples_parse_and_the_bad_one_is_refused():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "examples"
    assert load_policy(root / "policy.yaml").params_for("demo").max_replicas == 3
    with pytest.raises(PolicyError) as ei:
        load_policy(root / "policy-bad.yaml")
    assert [(line, fld) for line, fld, _ in ei.value.errors] == [
        (5, "models.demo.target_queue_depth"),
        (6, "models.demo.max_replica"),
    ]
