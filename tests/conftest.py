"""Shared fixtures. One Ray instance per test session (started lazily by the first test that needs
it)."""

from __future__ import annotations

import os
import socket

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray head shared by every integration test of the session, Serve on a free port.

    Yields the Serve HTTP base URL, e.g. ``http://127.0.0.1:PORT``.
    """
    import ray
    from ray import serve

    from cluster.ray_runtime import serving_env

    for key, value in serving_env().items():  # what `fleetlm up` starts its head with
        os.environ.setdefault(key, value)
    port = free_port()
    # address="local": always a fresh head of our own, never another Ray on this machine.
    ray.init(address="local", num_cpus=16, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()
