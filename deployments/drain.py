"""Draining before shutdown: stop admitting, let the requests in flight finish, then stop.

`fleetlm down` (and SIGTERM / Ctrl-C of a foreground `fleetlm up`) announces a drain with a
deadline in Ray's internal KV. Every ingress replica watches that key: once it is set, new requests
get a 503 ("server is shutting down"), the replica publishes its in-flight count beside the key, and
a stream still running at the deadline ends with an SSE error event instead of a cut connection.
The CLI waits (``wait_until_idle``) until the published counts sum to 0 or the grace period
(``http.drain_timeout_s``) ends, then shuts Serve down.

The algorithms here are Ray-free; ``announce`` / ``read_*`` / ``publish`` are the KV glue.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from deployments.protocol import APIError

KV_NAMESPACE = "fleetlm_drain"
SHUTTING_DOWN = "server is shutting down; retry against another server or later"


def drain_key(app: str) -> bytes:
    return f"drain:{app}".encode()


def count_prefix(app: str) -> bytes:
    return f"inflight:{app}:".encode()


def shutting_down_error() -> APIError:
    return APIError(
        503,
        SHUTTING_DOWN,
        type="service_unavailable_error",
        code="server_shutting_down",
        headers={"Retry-After": "5"},
    )


@dataclass
class DrainState:
    """One ingress replica's view: its in-flight requests and the drain deadline (wall clock, so
    it means the same in every process), None while serving."""

    deadline: float | None = None
    in_flight: int = 0

    @property
    def draining(self) -> bool:
        return self.deadline is not None

    def admit(self) -> None:
        """Count a new request in, or raise the 503 while draining."""
        if self.deadline is not None:
            raise shutting_down_error()
        self.in_flight += 1

    def done(self) -> None:
        self.in_flight = max(0, self.in_flight - 1)


def wait_until_idle(
    poll: Callable[[], int | None],
    timeout_s: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    interval_s: float = 0.25,
    settle_polls: int = 2,
) -> tuple[bool, int | None]:
    """Poll the in-flight count until it reads 0 on ``settle_polls`` polls in a row (a request
    admitted just before the drain began may be counted a moment late) or ``timeout_s`` passes.
    ``poll`` returns None when it can't tell (nothing published yet); that is not idle.
    Returns (idle, last count)."""
    end = clock() + timeout_s
    zeros = 0
    last: int | None = None
    while True:
        last = poll()
        zeros = zeros + 1 if last == 0 else 0
        if zeros >= settle_polls:
            return True, last
        left = end - clock()
        if left <= 0:
            return False, last
        sleep(min(interval_s, left))


def sum_counts(values: list[bytes], expected: int) -> int | None:
    """Sum of the published per-replica counts; None until ``expected`` replicas published."""
    counts = []
    for v in values:
        try:
            counts.append(int(json.loads(v)["in_flight"]))
        except (ValueError, KeyError, TypeError):
            continue
    if len(counts) < expected:
        return None
    return sum(counts)


# ---- Ray glue (internal KV) -------------------------------------------------------------------


def _kv():
    from ray.experimental import internal_kv

    return internal_kv


def announce(app: str, timeout_s: float) -> float:
    """Start the drain: every ingress replica sees the deadline within a poll. Returns it."""
    deadline = time.time() + timeout_s
    _kv()._internal_kv_put(
        drain_key(app), json.dumps({"deadline": deadline}).encode(), True, namespace=KV_NAMESPACE
    )
    return deadline


def read_total(app: str, expected: int) -> int | None:
    kv = _kv()
    keys = kv._internal_kv_list(count_prefix(app), namespace=KV_NAMESPACE)
    values = [kv._internal_kv_get(k, namespace=KV_NAMESPACE) for k in keys]
    return sum_counts([v for v in values if v is not None], expected)


def clear(app: str) -> None:
    kv = _kv()
    kv._internal_kv_del(drain_key(app), namespace=KV_NAMESPACE)
    kv._internal_kv_del(count_prefix(app), del_by_prefix=True, namespace=KV_NAMESPACE)


class DrainWatcher:
    """In an ingress replica: a daemon thread that reads the drain key every ``period_s`` and,
    once draining, publishes this replica's in-flight count under its own key. ``on_drain``
    (deadline) is called once, from this thread, when the drain is first seen."""

    def __init__(
        self,
        app: str,
        replica: str,
        state: DrainState,
        on_drain: Callable[[float], None] | None = None,
        period_s: float = 0.25,
    ):
        self.app, self.replica, self.state, self.period_s = app, replica, state, period_s
        self.on_drain = on_drain
        threading.Thread(target=self._run, name="fleetlm-drain", daemon=True).start()

    def _run(self) -> None:
        kv = _kv()
        key = count_prefix(self.app) + self.replica.encode()
        while True:
            time.sleep(self.period_s)
            try:
                raw = kv._internal_kv_get(drain_key(self.app), namespace=KV_NAMESPACE)
                if raw is None:
                    continue
                if self.state.deadline is None:
                    self.state.deadline = float(json.loads(raw)["deadline"])
                    if self.on_drain is not None:
                        self.on_drain(self.state.deadline)
                body = json.dumps({"in_flight": self.state.in_flight}).encode()
                kv._internal_kv_put(key, body, True, namespace=KV_NAMESPACE)
            except Exception:  # noqa: BLE001 - the GCS going away ends the process soon anyway
                continue
