"""http.direct_ingress: the head's environment and finding the ingress replica's own port."""

from __future__ import annotations

import http.server
import socket
import threading

from cluster.cmd_serve import find_direct_ingress
from cluster.config import ClusterConfig
from cluster.ray_runtime import direct_ingress_env


def test_off_by_default_and_the_env_turns_on_serves_throughput_mode():
    cfg = ClusterConfig.model_validate({"models": [{"name": "m", "model": "demo-small"}]})
    assert cfg.http.direct_ingress is False and cfg.http.direct_ingress_port == 30000
    env = direct_ingress_env(31234)
    assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    assert env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"
    assert env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"] == "31234"
    assert int(env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"]) > 31234


def _free_run(n: int) -> int:
    """A port p such that p .. p+n-1 are all free now."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p + n > 65535:
            continue
        try:
            socks = []
            for q in range(p, p + n):
                t = socket.socket()
                socks.append(t)
                t.bind(("127.0.0.1", q))
            return p
        except OSError:
            continue
        finally:
            for t in socks:
                t.close()
    raise RuntimeError("no run of free ports")


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_find_direct_ingress_probes_upwards_from_the_first_port():
    first = _free_run(4)
    assert find_direct_ingress("127.0.0.1", first, tries=4) is None
    srv = http.server.HTTPServer(("127.0.0.1", first + 2), _Health)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        url = find_direct_ingress("127.0.0.1", first, tries=4)
        assert url == f"http://127.0.0.1:{first + 2}"
        assert find_direct_ingress("127.0.0.1", first, tries=2) is None  # not within 2 tries
    finally:
        srv.shutdown()
        srv.server_close()
