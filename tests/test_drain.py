"""Ray-free drain logic (deployments/drain.py): admission, counting, the wait loop."""

import json

import pytest

from deployments.drain import DrainState, shutting_down_error, sum_counts, wait_until_idle
from deployments.protocol import APIError


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.t += s


def test_admit_counts_until_draining_then_503():
    st = DrainState()
    st.admit()
    st.admit()
    assert st.in_flight == 2 and not st.draining
    st.deadline = 50.0
    with pytest.raises(APIError) as e:
        st.admit()
    assert e.value.status == 503
    body = e.value.body()["error"]
    assert "shutting down" in body["message"] and body["code"] == "server_shutting_down"
    assert e.value.headers["Retry-After"]
    assert st.in_flight == 2  # a refused request is not counted
    st.done()
    st.done()
    st.done()  # never below zero
    assert st.in_flight == 0


def test_wait_until_idle_returns_once_zero_settles():
    clock = FakeClock()
    counts = iter([5, 3, 0, 1, 0, 0, 7])
    idle, last = wait_until_idle(lambda: next(counts), 30.0, clock, clock.sleep, interval_s=0.5)
    assert (idle, last) == (True, 0)
    assert len(clock.sleeps) == 5  # six polls: the lone 0 before the 1 did not count
    assert clock.t == pytest.approx(102.5)


def test_wait_until_idle_times_out_with_the_last_count():
    clock = FakeClock()
    polls = []

    def poll() -> int:
        polls.append(clock.t)
        return 4

    idle, last = wait_until_idle(poll, 2.0, clock, clock.sleep, interval_s=0.75)
    assert (idle, last) == (False, 4)
    assert clock.t == pytest.approx(102.0)  # never sleeps past the deadline
    assert clock.sleeps == pytest.approx([0.75, 0.75, 0.5])


def test_wait_until_idle_unknown_is_not_idle():
    clock = FakeClock()
    idle, last = wait_until_idle(lambda: None, 1.0, clock, clock.sleep, interval_s=0.25)
    assert (idle, last) == (False, None)


def test_wait_until_idle_zero_timeout_still_polls():
    clock = FakeClock()
    idle, _ = wait_until_idle(lambda: 0, 0.0, clock, clock.sleep, settle_polls=1)
    assert idle and clock.sleeps == []


def test_sum_counts_waits_for_every_replica():
    vals = [json.dumps({"in_flight": 3}).encode(), json.dumps({"in_flight": 2}).encode()]
    assert sum_counts(vals, 2) == 5
    assert sum_counts(vals, 3) is None  # one replica hasn't published yet
    assert sum_counts([*vals, b"garbage"], 2) == 5


def test_shutting_down_error_is_an_openai_error_object():
    body = shutting_down_error().body()
    assert set(body["error"]) >= {"message", "type", "code"}
    assert body["error"]["type"] == "service_unavailable_error"
