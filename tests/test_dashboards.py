"""Dashboard JSON structure, export, and `fleetlm dashboards push` against a fake Grafana API."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest

from cluster import metrics
from cluster.cli import main
from cluster.dashboards import SCHEMA_VERSION, build_all, build_dashboard, panel_exprs, substitute

EXPECTED = {"fleetlm-overview", "fleetlm-engine", "fleetlm-router", "fleetlm-autoscaling"}
KNOWN_SERIES = {
    metrics.prom_name(s.name, suffix)
    for s in metrics.SPECS.values()
    for suffix in (("_bucket", "_sum", "_count") if s.kind == "histogram" else ("",))
}


def _overlap(a: dict, b: dict) -> bool:
    return not (
        a["x"] + a["w"] <= b["x"]
        or b["x"] + b["w"] <= a["x"]
        or a["y"] + a["h"] <= b["y"]
        or b["y"] + b["h"] <= a["y"]
    )


@pytest.mark.parametrize("uid", sorted(EXPECTED))
def test_dashboard_structure(uid):
    d = build_dashboard(uid)
    json.dumps(d)  # plain JSON, no dataclasses or tuples-as-objects
    assert d["uid"] == uid and d["schemaVersion"] == SCHEMA_VERSION and d["id"] is None
    assert len(uid) <= 40 and re.fullmatch(r"[a-zA-Z0-9_-]+", uid)
    var_names = [v["name"] for v in d["templating"]["list"]]
    assert var_names == ["datasource", "model"]
    panels = d["panels"]
    assert panels, uid
    ids = [p["id"] for p in panels]
    assert len(set(ids)) == len(ids)
    for i, p in enumerate(panels):
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0
        for q in panels[:i]:
            assert not _overlap(g, q["gridPos"]), (p["title"], q["title"])
        assert p["type"] in {"timeseries", "stat", "bargauge"}
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert p["fieldConfig"]["defaults"]["unit"]
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(set(refs)) == len(refs)
        for t in p["targets"]:
            expr = t["expr"]
            assert 'model=~"$model"' in expr
            assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}")
            names = set(re.findall(r"\bray_fleetlm_\w+", expr))
            assert names and names <= KNOWN_SERIES, names - KNOWN_SERIES


def test_dashboards_cover_the_issue():
    d = build_all()
    assert set(d) == EXPECTED
    exprs = {uid: " ".join(e for _, e in panel_exprs(dash)) for uid, dash in d.items()}
    for uid, names in {
        "fleetlm-overview": ["request_success_total", "time_to_first_token_seconds",
                             "request_time_per_output_token_seconds", "generation_tokens_total",
                             "request_errors_total"],
        "fleetlm-engine": ["num_requests_waiting", "num_requests_running", "kv_cache_usage_perc",
                           "prefix_cache_hits_total", "num_preemptions_total"],
        "fleetlm-router": ["router_decisions_total", "num_requests_waiting"],
        "fleetlm-autoscaling": ["replicas_current", "replicas_target",
                                "autoscaling_decisions_total"],
    }.items():  # fmt: skip
        for n in names:
            assert metrics.prom_name(n) in exprs[uid] or f"ray_fleetlm_{n}_bucket" in exprs[uid]


def test_substitute():
    expr = 'rate(x{model=~"$model"}[$__rate_interval])'
    assert substitute(expr) == 'rate(x{model=~".*"}[1m])'
    with pytest.raises(AssertionError):
        substitute("x[$other]")


@pytest.mark.skipif(shutil.which("promtool") is None, reason="no promtool (Debian's prometheus)")
def test_promql_parses_with_promtool(tmp_path):
    rules = []
    for uid, dash in build_all().items():
        for i, (_, expr) in enumerate(panel_exprs(dash)):
            record = f"fleetlm:{uid.replace('-', '_')}:{i}"
            rules.append({"record": record, "expr": substitute(expr)})
    path = tmp_path / "rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "fleetlm", "rules": rules}]}))
    out = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_export_writes_every_dashboard(tmp_path, capsys):
    assert main(["dashboards", "export", str(tmp_path / "out")]) == 0
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == sorted(f"{u}.json" for u in EXPECTED)
    loaded = json.loads((tmp_path / "out" / "fleetlm-engine.json").read_text())
    assert loaded == json.loads(json.dumps(build_dashboard("fleetlm-engine")))
    assert "fleetlm-engine.json" in capsys.readouterr().out


class FakeGrafana(BaseHTTPRequestHandler):
    """The Grafana HTTP API endpoints `dashboards push` calls; records every request."""

    requests: list[dict] = []
    folders: list[dict] = []
    dashboards: dict[str, dict] = {}

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _reply(self, code: int, body) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _record(self, body=None) -> tuple[str, dict]:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        self.requests.append(
            {
                "method": self.command,
                "path": url.path,
                "query": query,
                "auth": self.headers.get("Authorization"),
                "body": body,
            }
        )
        return url.path, query

    def do_GET(self):
        path, query = self._record()
        if self.headers.get("Authorization") != "Bearer sekret":
            return self._reply(401, {"message": "Unauthorized"})
        if path == "/api/folders":
            return self._reply(200, self.folders)
        if path == "/api/search":
            uids = query.get("dashboardUIDs", [])
            hits = [
                {"uid": u, "title": d["title"], "type": "dash-db"}
                for u, d in self.dashboards.items()
                if u in uids
            ]
            return self._reply(200, hits)
        self._reply(404, {"message": "not found"})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        path, _ = self._record(body)
        if self.headers.get("Authorization") != "Bearer sekret":
            return self._reply(401, {"message": "Unauthorized"})
        if path == "/api/folders":
            folder = {"id": len(self.folders) + 1, "uid": body["uid"], "title": body["title"]}
            self.folders.append(folder)
            return self._reply(200, folder)
        if path == "/api/dashboards/db":
            dash = body["dashboard"]
            if dash["uid"] in self.dashboards and not body.get("overwrite"):
                return self._reply(412, {"message": "version-mismatch"})
            self.dashboards[dash["uid"]] = dash
            uid = dash["uid"]
            return self._reply(200, {"status": "success", "uid": uid, "url": f"/d/{uid}/x"})
        self._reply(404, {"message": "not found"})


@pytest.fixture
def grafana():
    FakeGrafana.requests, FakeGrafana.folders, FakeGrafana.dashboards = [], [], {}
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeGrafana)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_push_makes_exactly_the_expected_requests(grafana, capsys):
    argv = ["dashboards", "push", "--grafana-url", grafana, "--api-key", "sekret"]
    assert main([*argv, "--folder", "LLM Serving"]) == 0
    reqs = FakeGrafana.requests
    assert all(r["auth"] == "Bearer sekret" for r in reqs)
    uids = list(build_all())
    expected = [("GET", "/api/folders"), ("POST", "/api/folders")]
    for _ in uids:
        expected += [("GET", "/api/search"), ("POST", "/api/dashboards/db")]
    assert [(r["method"], r["path"]) for r in reqs] == expected
    assert reqs[1]["body"] == {"title": "LLM Serving", "uid": "llm-serving"}
    searches = [r for r in reqs if r["path"] == "/api/search"]
    assert [s["query"] for s in searches] == [
        {"type": ["dash-db"], "dashboardUIDs": [u]} for u in uids
    ]
    posts = [r["body"] for r in reqs if r["path"] == "/api/dashboards/db"]
    for uid, body in zip(uids, posts, strict=True):
        assert body["overwrite"] is True and body["folderUid"] == "llm-serving"
        assert body["dashboard"] == json.loads(json.dumps(build_dashboard(uid)))
    assert capsys.readouterr().out.count("created") == len(uids)

    # Second push: the folder exists (no POST /api/folders), every dashboard is updated.
    FakeGrafana.requests.clear()
    assert main([*argv, "--folder", "LLM Serving"]) == 0
    assert [(r["method"], r["path"]) for r in FakeGrafana.requests] == [expected[0], *expected[2:]]
    assert capsys.readouterr().out.count("updated") == len(uids)


def test_push_without_folder_and_bad_key(grafana, capsys):
    assert main(["dashboards", "push", "--grafana-url", grafana, "--api-key", "sekret"]) == 0
    assert not any(r["path"] == "/api/folders" for r in FakeGrafana.requests)
    assert all("folderUid" not in r["body"] for r in FakeGrafana.requests if r["body"])
    FakeGrafana.requests.clear()
    assert main(["dashboards", "push", "--grafana-url", grafana, "--api-key", "wrong"]) == 2
    assert "failed" in capsys.readouterr().err
    assert len(FakeGrafana.requests) == 1  # stops at the first refusal
