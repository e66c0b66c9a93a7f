"""The autoscaling decision: a pure function of a load snapshot, the policy parameters and the state
carried from the previous decision. No Ray, no clocks: time comes in with the snapshot.

Algorithm (one call per control-loop tick; `current` = the replica count decided last time):
1. load = requests queued in front of the replicas + per replica (waiting + running).
2. From zero: current == 0 and load > 0 -> ceil(load / target_queue_depth) replicas at once (at
   least 1, at most max_replicas), bypassing windows and cooldowns; the first request waits in
   Serve's queue meanwhile.
3. To zero: scale_to_zero_after_s is set and load has been 0 for that long -> 0.
4. desired = ceil(load / target_queue_depth); with a TTFT SLO that the worst replica's recent TTFT
   exceeds while requests are in flight, desired >= current + 1 and no scale-down. Clamp to
   [min_replicas, max_replicas].
5. Stabilization (as the Kubernetes HPA does): desired values are kept per tick. A scale-up goes to
   the *lowest* desired value seen during the last scale_up_window_s, a scale-down to the *highest*
   one seen during the last scale_down_window_s; a window counts only once the history covers it,
   so a spike shorter than the window moves nothing.
6. Cooldowns: no scale-up within scale_up_cooldown_s of the last scale-up; no scale-down within
   scale_down_cooldown_s of the last scaling action of either direction.
7. Max step: at most max_step_up replicas added, max_step_down removed per decision.
Every decision returns a one-line reason that names the numbers behind it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class ReplicaLoad:
    """One replica as the policy sees it."""

    waiting: float  # requests in the engine's waiting queue
    running: float  # requests being decoded
    kv_usage: float = 0.0  # fraction of KV blocks in use, 0..1
    # recent TTFT (a high percentile of the last samples); None: no samples
    ttft_s: float | None = None


@dataclass(frozen=True)
class Snapshot:
    now: float  # seconds, any monotonic origin
    current_replicas: int  # the replica count decided last (starting replicas included)
    replicas: list[ReplicaLoad] = field(default_factory=list)  # replicas that report load
    queued: float = 0.0  # requests waiting in front of the replicas (Serve handles / router)

    @property
    def load(self) -> float:
        return self.queued + sum(r.waiting + r.running for r in self.replicas)

    @property
    def worst_ttft_s(self) -> float | None:
        samples = [r.ttft_s for r in self.replicas if r.ttft_s is not None]
        return max(samples) if samples else None


@dataclass(frozen=True)
class Params:
    target_queue_depth: float = 4.0  # waiting + running requests per replica to aim for
    min_replicas: int = 1  # floor while the model has traffic (scale to zero is separate)
    max_replicas: int = 4
    scale_up_window_s: float = 0.0
    scale_down_window_s: float = 30.0
    scale_up_cooldown_s: float = 0.0
    scale_down_cooldown_s: float = 30.0
    max_step_up: int = 4
    max_step_down: int = 1
    ttft_slo_s: float | None = None  # worst replica's recent TTFT above this adds a replica
    scale_to_zero_after_s: float | None = None  # None: never below min_replicas

    def __post_init__(self) -> None:
        if not self.target_queue_depth > 0:
            raise ValueError(f"target_queue_depth must be > 0, got {self.target_queue_depth}")
        if self.min_replicas < 1:
            raise ValueError(f"min_replicas must be >= 1, got {self.min_replicas}")
        if self.max_replicas < self.min_replicas:
            raise ValueError(
                f"max_replicas ({self.max_replicas}) must be >= min_replicas ({self.min_replicas})"
            )
        for name in ("max_step_up", "max_step_down"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in (
            "scale_up_window_s",
            "scale_down_window_s",
            "scale_up_cooldown_s",
            "scale_down_cooldown_s",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.ttft_slo_s is not None and not self.ttft_slo_s > 0:
            raise ValueError(f"ttft_slo_s must be > 0 or null, got {self.ttft_slo_s}")
        if self.scale_to_zero_after_s is not None and self.scale_to_zero_after_s < 0:
            raise ValueError(
                f"scale_to_zero_after_s must be >= 0 or null, got {self.scale_to_zero_after_s}"
            )


History = tuple[tuple[float, int], ...]  # (time, clamped desired replicas), oldest first

# The history keeps change points only (a step function: a value holds until the next entry), so
# it stays short however long the windows are; this bound only bites if the desired value flaps
# on every tick, and then the windows simply hold.
MAX_HISTORY = 2000


@dataclass(frozen=True)
class State:
    history: History = ()
    last_scale_up: float | None = None
    last_scale_down: float | None = None
    last_busy: float | None = None  # last time load > 0 (or the first call)

    def to_dict(self) -> dict:
        return {
            "history": [list(h) for h in self.history],
            "last_scale_up": self.last_scale_up,
            "last_scale_down": self.last_scale_down,
            "last_busy": self.last_busy,
        }

    @classmethod
    def from_dict(cls, d: dict | None) -> State:
        if not d:
            return cls()
        return cls(
            history=tuple((float(t), int(n)) for t, n in d.get("history", ())),
            last_scale_up=d.get("last_scale_up"),
            last_scale_down=d.get("last_scale_down"),
            last_busy=d.get("last_busy"),
        )


def _fmt(x: float) -> str:
    return f"{x:.1f}"


def _window_values(history: History, now: float, window: float) -> list[int] | None:
    """Desired values in force during [now - window, now], read as a step function; None when the
    history does not reach back to the window's start yet."""
    start = now - window
    i = None
    for k, (t, _) in enumerate(history):
        if t <= start + 1e-9:
            i = k  # the last entry at or before the window's start is the value in force then
    if i is None:
        return None
    return [n for _, n in history[i:]]


def _prune(history: History, now: float, keep_s: float) -> tuple:
    h = list(history)
    # Keep the newest entry at or before now - keep_s: it is the value in force at the window start.
    while len(h) > 1 and h[1][0] <= now - keep_s:
        h.pop(0)
    return tuple(h[-MAX_HISTORY:])


def decide(snapshot: Snapshot, params: Params, state: State) -> tuple[int, str, State]:
    """Returns (replicas, reason, new state). See the module docstring for the rules."""
    now, cur, p = snapshot.now, snapshot.current_replicas, params
    load = snapshot.load
    busy = state.last_busy if state.last_busy is not None else now
    if load > 0:
        busy = now
    state = replace(state, last_busy=busy)

    if cur == 0:
        if load <= 0:
            return 0, "hold at 0: idle, no requests", state
        n = min(p.max_replicas, max(1, math.ceil(load / p.target_queue_depth)))
        state = replace(state, last_scale_up=now, history=((now, n),))
        return n, f"scale from zero 0->{n}: {_fmt(load)} requests waiting", state

    idle_s = now - busy
    if p.scale_to_zero_after_s is not None and load <= 0 and idle_s >= p.scale_to_zero_after_s:
        state = replace(state, last_scale_down=now, history=())
        return (
            0,
            f"scale to zero {cur}->0: idle {_fmt(idle_s)}s >= "
            f"scale_to_zero_after_s {_fmt(p.scale_to_zero_after_s)}",
            state,
        )

    raw = math.ceil(load / p.target_queue_depth)
    why = f"load {_fmt(load)} / target {_fmt(p.target_queue_depth)} per replica wants {raw}"
    ttft = snapshot.worst_ttft_s
    # TTFT samples outlive the requests they timed; with nothing in flight more replicas can't help.
    slo_violated = (
        p.ttft_slo_s is not None and ttft is not None and ttft > p.ttft_slo_s and load > 0
    )
    if slo_violated:
        why += f"; TTFT {ttft:.2f}s > SLO {p.ttft_slo_s:.2f}s wants {cur + 1}"
        raw = max(raw, cur + 1)
    desired = min(p.max_replicas, max(p.min_replicas, raw))
    if desired != raw:
        why += f" (bounded to {desired} by [{p.min_replicas}, {p.max_replicas}])"

    keep_s = max(p.scale_up_window_s, p.scale_down_window_s)
    history = state.history
    if not history or history[-1][1] != desired:
        history = history + ((now, desired),)
    history = _prune(history, now, keep_s)
    state = replace(state, history=history)

    if desired > cur:
        vals = _window_values(history, now, p.scale_up_window_s)
        if vals is None or min(vals) <= cur:
            held = _held_for(history, now, cur, above=True)
            return (
                cur,
                (
                    f"scale-up held at {cur}: {why}; wanted for {_fmt(held)}s of "
                    f"{_fmt(p.scale_up_window_s)}s window"
                ),
                state,
            )
        target = min(vals)
        since_up = None if state.last_scale_up is None else now - state.last_scale_up
        if since_up is not None and since_up < p.scale_up_cooldown_s:
            return (
                cur,
                (
                    f"scale-up held at {cur}: {why}; cooldown {_fmt(since_up)}s of "
                    f"{_fmt(p.scale_up_cooldown_s)}s"
                ),
                state,
            )
        new = min(target, cur + p.max_step_up)
        step = f" (max_step_up {p.max_step_up})" if new < target else ""
        state = replace(state, last_scale_up=now)
        return new, f"scale up {cur}->{new}: {why}{step}", state

    if desired < cur:
        if slo_violated:
            return cur, f"scale-down held at {cur}: {why}", state
        vals = _window_values(history, now, p.scale_down_window_s)
        if vals is None or max(vals) >= cur:
            held = _held_for(history, now, cur, above=False)
            return (
                cur,
                (
                    f"scale-down held at {cur}: {why}; wanted for {_fmt(held)}s of "
                    f"{_fmt(p.scale_down_window_s)}s window"
                ),
                state,
            )
        target = max(vals)
        last = max(
            (t for t in (state.last_scale_up, state.last_scale_down) if t is not None), default=None
        )
        if last is not None and now - last < p.scale_down_cooldown_s:
            return (
                cur,
                (
                    f"scale-down held at {cur}: {why}; cooldown {_fmt(now - last)}s of "
                    f"{_fmt(p.scale_down_cooldown_s)}s"
                ),
                state,
            )
        new = max(target, cur - p.max_step_down)
        step = f" (max_step_down {p.max_step_down})" if new > target else ""
        state = replace(state, last_scale_down=now)
        return new, f"scale down {cur}->{new}: {why}{step}", state

    return cur, f"hold at {cur}: {why}", state


def _held_for(history: History, now: float, cur: int, above: bool) -> float:
    """How long the desired value has stayed strictly above (or below) `cur`, up to now."""
    since = now
    for t, n in reversed(history):
        if (n > cur) if above else (n < cur):
            since = t
        else:
            break
    return now - since
