"""Where a served engine's time goes, step by step, from the engine core's step trace.

The engine core process writes one JSON line per loop turn when ``FLEETLM_STEP_TRACE=PREFIX`` is
in its environment (file ``PREFIX.<pid>``; see engine/engine_core.py): the turn's start, wall and
CPU seconds of the step (or of the idle wait), seconds spent sending its outputs, decode rows and
prompt tokens computed, requests waiting and running after it.

    FLEETLM_STEP_TRACE=/tmp/steps fleetlm up --model demo ...  # or vllm_client.py --step-trace
    python bench/served_steps.py /tmp/steps.12345

Prints, over the span from the first to the last step: decode-only steps (count, mean wall and
CPU ms, mean rows), steps with prompt tokens (count, total seconds, ms per prompt token), time
between steps (the loop's own work: receiving adds, sending outputs) and time idle waiting for
requests while none ran.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def load(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def summarize(rows: list[dict]) -> dict:
    """Figures over the span from the first step's start to the last step's end."""
    steps = [r for r in rows if r["step"]]
    if not steps:
        return {"steps": 0}
    start, end = steps[0]["t"], steps[-1]["t"] + steps[-1]["wall"]
    span = [r for r in rows if start <= r["t"] <= end]
    decode = [r for r in steps if r["prefill_tokens"] == 0]
    mixed = [r for r in steps if r["prefill_tokens"] > 0]
    prompt_tokens = sum(r["prefill_tokens"] for r in mixed)
    in_steps = sum(r["wall"] for r in steps)
    idle = sum(r["wall"] for r in span if not r["step"])
    out = {
        "span_s": end - start,
        "steps": len(steps),
        "in_steps_s": in_steps,
        "idle_s": idle,
        "between_steps_s": (end - start) - in_steps - idle,
        "send_s": sum(r["send"] for r in span),
        "decode_steps": len(decode),
        "mixed_steps": len(mixed),
        "mixed_s": sum(r["wall"] for r in mixed),
        "mixed_prompt_tokens": prompt_tokens,
    }
    if decode:
        out["decode_wall_ms_mean"] = 1000 * statistics.fmean(r["wall"] for r in decode)
        out["decode_wall_ms_median"] = 1000 * statistics.median(r["wall"] for r in decode)
        out["decode_cpu_ms_mean"] = 1000 * statistics.fmean(r["cpu"] for r in decode)
        out["decode_rows_mean"] = statistics.fmean(r["decode_rows"] for r in decode)
    if mixed:
        out["mixed_ms_per_prompt_token"] = 1000 * out["mixed_s"] / max(1, prompt_tokens)
        out["mixed_decode_rows_mean"] = statistics.fmean(r["decode_rows"] for r in mixed)
    return out


def describe(s: dict) -> str:
    if not s.get("steps"):
        return "no steps"
    parts = [
        f"{s['steps']} steps in {s['span_s']:.2f} s (in steps {s['in_steps_s']:.2f}, "
        f"between {s['between_steps_s']:.3f}, idle {s['idle_s']:.3f}, sending {s['send_s']:.3f})"
    ]
    if s["decode_steps"]:
        parts.append(
            f"decode-only: {s['decode_steps']} steps, wall {s['decode_wall_ms_mean']:.1f} ms "
            f"(median {s['decode_wall_ms_median']:.1f}), CPU {s['decode_cpu_ms_mean']:.1f} ms, "
            f"{s['decode_rows_mean']:.1f} rows"
        )
    if s["mixed_steps"]:
        parts.append(
            f"with prompt tokens: {s['mixed_steps']} steps, {s['mixed_s']:.2f} s, "
            f"{s['mixed_prompt_tokens']} tokens ({s['mixed_ms_per_prompt_token']:.3f} ms/token), "
            f"{s['mixed_decode_rows_mean']:.1f} decode rows"
        )
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("traces", nargs="+", help="PREFIX.<pid> files written by the engine core")
    args = p.parse_args(argv)
    for path in args.traces:
        print(f"{path}: {describe(summarize(load(path)))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
