"""`fleetlm up` keeps its SIGTERM handler once it is a Ray driver: ray.init() installs its own
(sys.exit(15)), which skipped the CLI's teardown (stop Serve, then the head, exit 0)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# A driver as `fleetlm up` is one: its own SIGTERM handler, then ray_runtime.connect(), then a
# SIGTERM. Exit 0 only when our handler ran and the driver disconnected.
DRIVER = """
import os, signal, sys, time
from cluster import ray_runtime

def stop(signum, frame):
    raise KeyboardInterrupt

signal.signal(signal.SIGTERM, stop)
ray_runtime.connect(sys.argv[1], ray_runtime.auth_mode_for_join())
try:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)
except KeyboardInterrupt:
    ray_runtime.disconnect()
    print("stopped by our handler")
    sys.exit(0)
sys.exit(3)
"""


@pytest.mark.ray
def test_connect_keeps_the_callers_sigterm_handler(ray_session):
    import ray

    gcs = ray.get_runtime_context().gcs_address
    r = subprocess.run(
        [sys.executable, "-c", DRIVER, gcs], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]
    assert "stopped by our handler" in r.stdout
