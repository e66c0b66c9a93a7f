"""The `fleetlm` CLI without a running cluster: help, render serve-config, error lines, config
overrides, status parsing, runtime helpers and offline `generate`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cluster import ray_runtime
from cluster.cli import CLIError, build_parser, main
from cluster.cmd_generate import parse_engine_options
from cluster.cmd_serve import build_config, prepare_for_deploy
from cluster.config import ClusterConfig, hash_api_key, load_cluster_config, parse_cluster_config
from cluster.serve_config import IMPORT_PATH, render_serve_config
from cluster.state import ClusterState, load_state, save_state
from cluster.status import format_status, parse_metrics

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "cluster.yaml"


@pytest.fixture(autouse=True)
def _isolated_state(tmp_path, monkeypatch):
    # Never read or write the user's real ~/.cache/fleetlm/cluster.json.
    monkeypatch.setenv("FLEETLM_STATE_DIR", str(tmp_path / "state"))


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        # Through the console script's entry point (`python -m cluster.cli` would run a second copy
        # of cluster.cli as __main__, with its own CLIError class).
        [sys.executable, "-c", "import sys; from cluster.cli import main; sys.exit(main())", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def parse_args(*argv: str):
    return build_parser().parse_args(list(argv))


# ---- help ---------------------------------------------------------------------------------------


def test_help_lists_every_command_of_this_module():
    r = run_cli("--help")
    assert r.returncode == 0, r.stderr
    for cmd in ("up", "status", "down", "render", "generate"):
        assert f"    {cmd} " in r.stdout
    up = run_cli("up", "--help")
    assert up.returncode == 0
    for flag in ("--config", "--model", "--host", "--port", "--replicas", "--detach"):
        assert flag in up.stdout


# ---- render serve-config -----------------------------------------------------------------------


def test_render_serve_config_validates_as_serve_deploy_schema(capsys):
    from ray.serve.schema import ServeDeploySchema

    assert main(["render", "serve-config", "-c", str(EXAMPLE)]) == 0
    data = yaml.safe_load(capsys.readouterr().out)
    schema = ServeDeploySchema.model_validate(data)
    (app,) = schema.applications
    assert (app.name, app.import_path, app.route_prefix) == ("fleetlm", IMPORT_PATH, "/")
    assert (schema.http_options.host, schema.http_options.port) == ("127.0.0.1", 8000)
    # The builder gets back exactly the cluster the file describes.
    assert ClusterConfig.model_validate(app.args["cluster"]) == load_cluster_config(EXAMPLE)
    assert [(d.name, d.num_replicas) for d in app.deployments] == [("LLMServer-demo", 2)]


def test_render_overrides_host_port_and_writes_a_file(tmp_path):
    out = tmp_path / "serve.yaml"
    args = [
        "render",
        "serve-config",
        "--model",
        "demo-small",
        "--host",
        "0.0.0.0",
        "--port",
        "9000",
    ]
    assert main([*args, "-o", str(out)]) == 0
    data = yaml.safe_load(out.read_text())
    assert data["http_options"] == {"host": "0.0.0.0", "port": 9000}
    assert data["applications"][0]["args"]["cluster"]["models"][0]["model"] == "demo-small"


def test_autoscaled_models_get_no_replica_override():
    cfg = parse_cluster_config(
        "models:\n- name: a\n  autoscaling: {max_replicas: 3}\n- name: org/b\n  num_replicas: 2\n"
    )
    rendered = render_serve_config(cfg)
    assert rendered["applications"][0]["deployments"] == [
        {"name": "LLMServer-org_b", "num_replicas": 2}
    ]


def test_bad_file_is_one_line_with_file_line_field_and_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  - name: m\n    placement_strategy: LOOSE\n")
    r = run_cli("render", "serve-config", "-c", str(bad))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith(f"fleetlm: error: {bad}:3: models[0].placement_strategy: Input should")


# ---- up: argument and config handling before any Ray is started -------------------------------


def test_up_refuses_a_bad_file_before_starting_ray(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  - name: m\n    engine: {max_num_seqs: -1}\n")
    assert main(["up", "-c", str(bad)]) == 2
    err = capsys.readouterr().err
    field = "models[0].engine.max_num_seqs"
    assert f"{bad}:3: {field}: Input should be greater than or equal to 1" in err
    assert load_state() is None


def test_up_refuses_a_folder_that_is_not_a_model(tmp_path, capsys):
    assert main(["up", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "models[0].model:" in err and str(tmp_path) in err and "config.json" in err
    assert load_state() is None


def test_up_config_and_model_are_exclusive(capsys):
    assert main(["up", "-c", str(EXAMPLE), "--model", "demo"]) == 2
    assert "not both" in capsys.readouterr().err


def test_build_config_applies_overrides_and_resolves_relative_folders(tmp_path):
    (tmp_path / "cfg").mkdir()
    f = tmp_path / "cfg" / "c.yaml"
    f.write_text(
        "models:\n- name: a\n  model: ../weights/a\n  autoscaling: {max_replicas: 4}\n"
        "- name: b\n  model: demo-small\n"
    )
    args = parse_args("up", "-c", str(f), "--replicas", "3", "--port", "9100", "--host", "0.0.0.0")
    cfg = build_config(args)
    a, b = cfg.models
    assert a.model == str(tmp_path / "weights" / "a")
    assert (a.num_replicas, a.autoscaling, b.num_replicas) == (3, None, 3)
    assert b.model == "demo-small"
    assert (cfg.http.host, cfg.http.port) == ("0.0.0.0", 9100)
    with pytest.raises(CLIError, match=r"override: http\.port: Input should be greater than"):
        build_config(parse_args("up", "--port", "0"))
    with pytest.raises(CLIError, match=r"override: models\.0\.num_replicas: Input should be"):
        build_config(parse_args("up", "--replicas", "0"))


def test_prepare_for_deploy_turns_env_keys_into_digests(monkeypatch):
    cfg = parse_cluster_config(
        "models: [{name: m, model: demo-small}]\napi_keys:\n  - env: FLEETLM_CLI_TEST_KEY\n"
    )
    monkeypatch.setenv("FLEETLM_CLI_TEST_KEY", "k-123")
    out = prepare_for_deploy(cfg, build_models=False)
    assert [k.model_dump(exclude_none=True) for k in out.api_keys] == [
        {"sha256": hash_api_key("k-123")}
    ]
    assert "k-123" not in json.dumps(out.model_dump(mode="json"))
    monkeypatch.delenv("FLEETLM_CLI_TEST_KEY")
    with pytest.raises(CLIError, match=r"api_keys\[0\]\.env: environment variable"):
        prepare_for_deploy(cfg, build_models=False)


# ---- status / down without a cluster, state file, status parsing --------------------------------


def test_status_and_down_without_a_cluster_say_so(capsys):
    assert main(["status"]) == 2
    assert "no running fleetlm cluster" in capsys.readouterr().err
    assert main(["down"]) == 2


def test_down_forgets_a_cluster_whose_head_is_gone(tmp_path, capsys):
    dead = subprocess.Popen(["true"])
    dead.wait()
    address_file = tmp_path / "ray" / "ray_current_cluster"
    address_file.parent.mkdir()
    address_file.write_text("127.0.0.1:1")
    save_state(
        ClusterState(
            "127.0.0.1:1", "http://127.0.0.1:1", "fleetlm", dead.pid, "token", str(address_file)
        )
    )
    assert load_state().head_pid == dead.pid
    assert main(["down"]) == 0
    assert "already gone" in capsys.readouterr().out
    assert load_state() is None
    assert not address_file.exists()  # a plain ray.init() must not try to join the dead head


METRICS = """\
# HELP ray_fleetlm_num_requests_waiting Requests waiting.
# TYPE ray_fleetlm_num_requests_waiting gauge
ray_fleetlm_num_requests_waiting{model="demo",replica="r1",SessionName="s"} 3.0
ray_fleetlm_num_requests_waiting{model="demo",replica="r2",SessionName="s"} 0.0
# TYPE ray_fleetlm_num_requests_running gauge
ray_fleetlm_num_requests_running{model="demo",replica="r1"} 8.0
ray_fleetlm_num_requests_running{model="demo",replica="r2"} 2.0
# TYPE ray_fleetlm_kv_cache_usage_perc gauge
ray_fleetlm_kv_cache_usage_perc{model="demo",replica="r1"} 0.5
# TYPE ray_fleetlm_prefix_cache_hits_total counter
ray_fleetlm_prefix_cache_hits_total{model="demo",replica="r1"} 30.0
ray_fleetlm_prefix_cache_hits_total{model="demo",replica="r2"} 10.0
# TYPE ray_fleetlm_prefix_cache_queries_total counter
ray_fleetlm_prefix_cache_queries_total{model="demo",replica="r1"} 100.0
ray_fleetlm_prefix_cache_queries_total{model="demo",replica="r2"} 60.0
# TYPE ray_serve_num_http_requests_total counter
ray_serve_num_http_requests_total{route="/"} 5.0
"""


def test_parse_metrics_per_replica_gauges_and_hit_rate():
    replicas, models = parse_metrics(METRICS)
    assert replicas == [
        {"model": "demo", "replica": "r1", "waiting": 3.0, "running": 8.0, "kv_cache_usage": 0.5},
        {"model": "demo", "replica": "r2", "waiting": 0.0, "running": 2.0},
    ]
    assert models == {
        "demo": {
            "prefix_cache_hits": 40.0,
            "prefix_cache_queries": 160.0,
            "prefix_cache_hit_rate": 0.25,
        }
    }


def test_format_status_shows_replicas_and_hit_rate():
    replicas, models = parse_metrics(METRICS)
    report = {
        "url": "http://127.0.0.1:8000",
        "ray_address": "10.0.0.1:6379",
        "app": {"status": "RUNNING", "message": ""},
        "deployments": {"LLMServer-demo": {"status": "HEALTHY", "replicas": {"RUNNING": 2}}},
        "replicas": replicas,
        "models": models,
        "metrics_error": None,
    }
    text = format_status(report)
    assert "LLMServer-demo: healthy (2 running)" in text
    assert "r1" in text and "50.0%" in text
    assert "prefix cache hit rate 25.0% (40 of 160 prompt tokens)" in text


# ---- Ray runtime helpers ------------------------------------------------------------------------


def test_token_discovery_and_auth_modes(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(var, raising=False)
    assert not ray_runtime.token_available()
    assert ray_runtime.auth_mode_for_join() == "disabled"
    assert ray_runtime.auth_mode_for_new_head() == "token"  # Ray's default for a local head
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("abc\n")
    assert ray_runtime.token_available() and ray_runtime.auth_mode_for_join() == "token"
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "none"))
    assert not ray_runtime.token_available()
    monkeypatch.setenv("RAY_AUTH_TOKEN", "xyz")
    assert ray_runtime.token_available()
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert ray_runtime.auth_mode_for_new_head() == "disabled"
    assert ray_runtime.auth_mode_for_join() == "disabled"


def test_pid_is_head_rejects_other_processes():
    assert not ray_runtime.pid_is_head(os.getpid())
    p = subprocess.Popen(["sleep", "30"])
    try:
        assert not ray_runtime.pid_is_head(p.pid)
        # stop_head never signals a process that isn't a `ray start --head --block`.
        ray_runtime.stop_head(p.pid, timeout_s=0.5)
        assert p.poll() is None
    finally:
        p.kill()
        p.wait()


# ---- generate (engine only) ---------------------------------------------------------------------


def test_parse_engine_options_types_values():
    assert parse_engine_options(["max_num_seqs=8", "dtype=float32", "num_kv_blocks=null"]) == {
        "max_num_seqs": 8,
        "dtype": "float32",
        "num_kv_blocks": None,
    }
    with pytest.raises(CLIError, match="KEY=VALUE"):
        parse_engine_options(["max_num_seqs"])


def test_generate_batches_prompts_through_the_engine(capsys):
    rc = main(
        [
            "generate",
            "--model",
            "demo-small",
            "--max-tokens",
            "5",
            "--ignore-eos",
            "--json",
            "--engine",
            "num_kv_blocks=64",
            "Hello there",
            "def main():",
        ]
    )
    out, err = capsys.readouterr()
    assert rc == 0, err
    rows = [json.loads(line) for line in out.strip().splitlines()]
    assert [r["prompt"] for r in rows] == ["Hello there", "def main():"]
    assert all(r["completion_tokens"] == 5 and r["finish_reason"] == "length" for r in rows)
    assert all(isinstance(r["text"], str) for r in rows)
    assert "10 tokens" in err


def test_generate_bad_engine_option_is_a_one_line_error(capsys):
    rc = main(["generate", "--model", "demo-small", "--engine", "max_seqs=2", "hi"])
    assert rc == 2
    assert "unknown engine option" in capsys.readouterr().err


def test_forget_address_file_only_removes_our_own_cluster(tmp_path):
    f = tmp_path / "ray_current_cluster"
    f.write_text("10.0.0.9:6379")  # another cluster started after ours
    ray_runtime.forget_address_file(str(f), "10.0.0.1:6379")
    assert f.exists()
    ray_runtime.forget_address_file(str(f), "10.0.0.9:6379")
    assert not f.exists()
