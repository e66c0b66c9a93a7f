"""`fleetlm policy show | apply FILE | history | simulate FILE --trace TRACE|w4`: the live
autoscaling policy. `apply` validates first and changes nothing on a bad file; a good one is
written to Ray's KV store, where every model's autoscaling policy picks it up within about a
second, without a replica restart (deployments/autoscaling_policy.py)."""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import yaml

from autoscaling.policy_file import PolicyError, load_policy
from cluster.cli import CLIError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("policy", help="autoscaling policy: show, apply, history, simulate")
    ps = p.add_subparsers(dest="policy_command", metavar="ACTION", required=True)

    show = ps.add_parser("show", help="print the live policy and each model's parameters")
    show.add_argument("--address", help="Ray address (default: the running fleetlm cluster)")
    show.set_defaults(func=cmd_show)

    apply = ps.add_parser("apply", help="validate FILE and make it the live policy")
    apply.add_argument("file")
    apply.add_argument("--address", help="Ray address (default: the running fleetlm cluster)")
    apply.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="S",
        help="wait up to S seconds until a deployment's policy has loaded the new version",
    )
    apply.set_defaults(func=cmd_apply)

    hist = ps.add_parser("history", help="recent scaling decisions with their reasons")
    hist.add_argument("--deployment", help="one deployment (default: all)")
    hist.add_argument("--last", type=int, default=20, help="entries per deployment (default 20)")
    hist.add_argument("--json", action="store_true", help="print JSON")
    hist.add_argument("--address", help="Ray address (default: the running fleetlm cluster)")
    hist.set_defaults(func=cmd_history)

    sim = ps.add_parser("simulate", help="replay a trace through the policy; no cluster needed")
    sim.add_argument("file", help="policy YAML")
    sim.add_argument("--trace", required=True, help="JSONL of {\"t\": s} lines, or 'w4'")
    sim.add_argument("--model", help="which model's parameters (default: 'default')")
    sim.add_argument("--png", help="write a plot here")
    sim.add_argument(
        "--tokens-per-s",
        type=float,
        default=200.0,
        help="one replica's output tokens/s (measure it; default 200)",
    )
    sim.add_argument(
        "--max-running", type=int, default=8, help="requests one replica runs at once (default 8)"
    )
    sim.add_argument(
        "--startup-s",
        type=float,
        default=10.0,
        help="seconds from a scale-up decision to the replica serving (default 10)",
    )
    sim.add_argument(
        "--output-tokens",
        type=int,
        default=64,
        help="output tokens per request when the trace has none (default 64)",
    )
    sim.add_argument("--rate", type=float, default=1.0, help="w4: low request rate/s (default 1)")
    sim.add_argument("--initial-replicas", type=int, default=1)
    sim.add_argument("--json", help="write the summary and decisions as JSON here")
    sim.set_defaults(func=cmd_simulate)


def _load(path: str):
    try:
        return load_policy(path)
    except PolicyError as e:
        raise CLIError(f"policy not applied, the running policy stays:\n{e}") from None


def _connect(address: str | None) -> None:
    """Join the running cluster as a driver: --address or $RAY_ADDRESS (auth mode from the
    environment), else the cluster `fleetlm up` recorded (its address and auth mode)."""
    import ray

    if ray.is_initialized():
        return
    from cluster import ray_runtime
    from cluster.state import load_state

    addr = address or os.environ.get("RAY_ADDRESS")
    if addr:
        auth = ray_runtime.auth_mode_for_join()
    else:
        st = load_state()
        if st is None:
            raise CLIError("no fleetlm cluster is running here: `fleetlm up`, or pass --address")
        addr, auth = st.ray_address, st.auth_mode
    try:
        ray_runtime.connect(addr, auth)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise CLIError(f"{e} (is `fleetlm up` running?)") from None


def cmd_show(args: argparse.Namespace) -> int:
    from autoscaling.policy_file import Policy
    from deployments.autoscaling_policy import get_history, get_policy_record

    _connect(args.address)
    rec = get_policy_record()
    if rec is None:
        print("# no policy applied yet: every model runs the built-in defaults")
        policy = Policy({}, {})
    else:
        applied = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rec["applied_at"]))
        print(f"# policy v{rec['version']}, applied {applied} from {rec['source']}")
        policy = Policy.from_dict(rec["policy"])
        print(policy.to_yaml().rstrip())
    print("# in force (file over built-in defaults; Serve's hard bounds clamp min/max):")
    print(yaml.safe_dump(policy.effective(), sort_keys=False).rstrip())
    for dep, entries in get_history().items():
        if entries:
            print(f"# {dep}: {entries[-1]['to']} replicas - {entries[-1]['reason']}")
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    from deployments.autoscaling_policy import get_history, get_policy_record, put_policy

    policy = _load(args.file)  # validate before touching the cluster
    _connect(args.address)
    prev = get_policy_record()
    rec = put_policy(policy, os.path.abspath(args.file))
    from cluster.policy_memory import remember

    remember(rec)  # `fleetlm up` restores it after a restart
    was = f" (was v{prev['version']})" if prev else ""
    print(f"applied policy v{rec['version']}{was} from {args.file}; replicas are not restarted")
    if args.wait > 0:
        deadline = time.time() + args.wait
        while time.time() < deadline:
            seen = [
                d
                for d, h in get_history().items()
                if h and h[-1].get("policy_version", 0) >= rec["version"]
            ]
            if seen:
                print(f"in force on {', '.join(seen)}")
                return 0
            time.sleep(0.5)
        print(
            f"no deployment reported v{rec['version']} within {args.wait:g}s "
            "(none autoscaled, or no decision changed yet)"
        )
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    from deployments.autoscaling_policy import get_history

    _connect(args.address)
    hist = {d: h[-args.last :] for d, h in get_history(args.deployment).items()}
    if args.json:
        print(json.dumps(hist, indent=2))
        return 0
    if not hist:
        print("no autoscaling decisions recorded yet")
    for dep, entries in hist.items():
        print(f"{dep}:")
        for e in entries:
            ts = time.strftime("%H:%M:%S", time.localtime(e["t"]))
            print(
                f"  {ts}  {e['from']}->{e['to']} (running {e['running']}, load {e['load']:g}, "
                f"policy v{e['policy_version']})  {e['reason']}"
            )
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from autoscaling.sim_report import format_rows, plot
    from autoscaling.simulate import SimConfig, load_trace, simulate, w4_trace

    policy = _load(args.file)
    params = policy.params_for(args.model)
    try:
        if args.trace.lower() == "w4":
            arrivals = w4_trace(base_rate=args.rate, output_tokens=args.output_tokens)
            step_at: float | None = 30.0
        else:
            arrivals = load_trace(args.trace, output_tokens=args.output_tokens)
            step_at = None
        cfg = SimConfig(
            tokens_per_s=args.tokens_per_s,
            max_running=args.max_running,
            startup_s=args.startup_s,
            initial_replicas=args.initial_replicas,
            step_at_s=step_at,
        )
    except (OSError, ValueError) as e:
        raise CLIError(str(e)) from None
    res = simulate(arrivals, params, cfg)
    print(
        f"# {len(arrivals)} requests; replica: {cfg.tokens_per_s:g} tok/s, "
        f"{cfg.max_running} running, {cfg.startup_s:g}s startup; TTFT SLO {res.slo_s:g}s"
    )
    print(format_rows(res))
    print("# decisions:")
    for t, n, reason in res.decisions:
        print(f"  {t:7.1f}s  -> {n}  {reason}")
    summary = res.summary()
    print("# summary: " + ", ".join(f"{k}={v}" for k, v in summary.items()))
    if args.png:
        plot(res, args.png, title=f"{args.file} on {args.trace}")
        print(f"# plot: {args.png}")
    if args.json:
        out: dict[str, Any] = {"summary": summary, "decisions": res.decisions}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0
