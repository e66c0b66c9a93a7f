"""`fleetlm policy simulate` and apply's validation, with no cluster (Ray is never contacted)."""

from __future__ import annotations

import json

from cluster.cli import main

POLICY = """\
default:
  target_queue_depth: 4
  max_replicas: 5
  scale_up_window_s: 2
  scale_down_window_s: 20
models:
  slow:
    target_queue_depth: 32
"""


def test_simulate_w4_prints_table_and_writes_png_and_json(tmp_path, capsys):
    pol = tmp_path / "p.yaml"
    pol.write_text(POLICY)
    png, js = tmp_path / "out.png", tmp_path / "out.json"
    argv = ["policy", "simulate", str(pol), "--trace", "w4", "--tokens-per-s", "400"]
    assert main([*argv, "--png", str(png), "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert "t(s) replicas serving queued" in out
    assert "scale up 1->" in out and "scale down" in out
    assert png.read_bytes()[:4] == b"\x89PNG"
    summary = json.loads(js.read_text())["summary"]
    assert summary["unfinished"] == 0 and summary["max_replicas"] > 1
    # the same trace under the 'slow' model's parameters adds fewer replicas
    assert main([*argv, "--model", "slow", "--json", str(js)]) == 0
    assert json.loads(js.read_text())["summary"]["max_replicas"] < summary["max_replicas"]


def test_simulate_trace_file(tmp_path, capsys):
    pol = tmp_path / "p.yaml"
    pol.write_text(POLICY)
    trace = tmp_path / "t.jsonl"
    trace.write_text("".join(f'{{"t": {i * 0.05:.2f}, "output_tokens": 32}}\n' for i in range(400)))
    assert main(["policy", "simulate", str(pol), "--trace", str(trace)]) == 0
    assert "# 400 requests" in capsys.readouterr().out
    trace.write_text('{"t": 1}\n{"x": 2}\n')
    assert main(["policy", "simulate", str(pol), "--trace", str(trace)]) == 2
    assert "t.jsonl:2:" in capsys.readouterr().err


def test_apply_refuses_a_bad_file_before_touching_the_cluster(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  demo:\n    scale_down_window_s: soon\n")
    # --address points nowhere: validation must fail first, so Ray is never contacted
    assert main(["policy", "apply", str(bad), "--address", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert "the running policy stays" in err
    assert f"{bad}:3: models.demo.scale_down_window_s:" in err
