"""`fleetlm up | status | down`: run a cluster described by a YAML file (or the demo) on Ray Serve.

`up` deploys through the same Serve config that `fleetlm render serve-config` prints (the
controller imports ``deployments.app:app_builder``), so the local path and KubeRay's serveConfigV2
are one path.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from cluster.cli import CLIError
from cluster.config import DEMO_MODELS, ClusterConfig, default_config, load_cluster_config
from cluster.serve_config import APP_NAME, render_serve_config
from cluster.state import ClusterState, clear_state, load_state, save_state, state_dir


def register(sub: argparse._SubParsersAction) -> None:
    up = sub.add_parser("up", help="start a cluster (local Ray or $RAY_ADDRESS) and serve models")
    up.add_argument("-c", "--config", help="cluster YAML (default: the demo model, one replica)")
    up.add_argument("--model", help="serve this local HF model folder (or demo, demo-small)")
    up.add_argument("--host", help="HTTP bind address (overrides http.host)")
    up.add_argument("--port", type=int, help="HTTP port (overrides http.port)")
    up.add_argument("--replicas", type=int, help="fixed replica count for every model")
    up.add_argument("--detach", action="store_true", help="leave the cluster running and return")
    up.add_argument("--ray-port", type=int, help="GCS port of a new local head (default 6379)")
    up.add_argument("--num-cpus", type=int, help="CPUs of a new local head (sets ray.num_cpus)")
    up.add_argument("--dashboard", action="store_true", help="start the Ray dashboard too")
    up.add_argument("--timeout", type=float, default=900, help="seconds to wait for replicas")
    up.set_defaults(func=cmd_up)

    st = sub.add_parser("status", help="replicas, queue depths, KV usage and cache hit rate")
    st.add_argument("--json", action="store_true", help="print one JSON object")
    st.set_defaults(func=cmd_status)

    down = sub.add_parser("down", help="stop the cluster `fleetlm up` started")
    down.set_defaults(func=cmd_down)


# ---- up --------------------------------------------------------------------------------


def build_config(args: argparse.Namespace) -> ClusterConfig:
    """The cluster file (or defaults) with command-line overrides applied and re-validated."""
    if args.config and args.model:
        raise CLIError("give -c/--config or --model, not both")
    if args.config:
        cfg = load_cluster_config(args.config)
        base = Path(args.config).resolve().parent
    else:
        cfg = default_config(args.model or "demo")
        base = Path.cwd()
    data = cfg.model_dump(mode="json", exclude_unset=False)
    for m in data["models"]:
        # Replicas run in other working directories: make local folders absolute (relative paths
        # in a cluster file are relative to that file).
        if m["model"] not in DEMO_MODELS and not os.path.isabs(m["model"]):
            m["model"] = str((base / m["model"]).resolve())
        if args.replicas is not None:
            m["num_replicas"], m["autoscaling"] = args.replicas, None
        if not args.config and not (m.get("engine") or {}).get("num_threads"):
            # No file: this machine is the cluster. Ray would give a 1-CPU replica one torch
            # thread (OMP_NUM_THREADS=1); split the machine's cores among the replicas instead.
            n = m.get("num_replicas") or 1
            m["engine"] = {
                **(m.get("engine") or {}),
                "num_threads": max(1, (os.cpu_count() or 1) // n),
            }
    if args.host:
        data["http"]["host"] = args.host
    if args.port is not None:
        data["http"]["port"] = args.port
    if args.num_cpus is not None:
        data["ray"]["num_cpus"] = args.num_cpus
    try:
        return ClusterConfig.model_validate(data)
    except ValidationError as e:  # only command-line values can make it invalid here
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise CLIError(f"invalid command-line override: {where}: {first['msg']}") from None


def prepare_for_deploy(cfg: ClusterConfig, build_models: bool) -> ClusterConfig:
    """Check model folders and resolve env API keys to digests (replicas then need no env)."""
    from engine.models.demo import resolve_model

    for i, m in enumerate(cfg.models):
        if m.model in DEMO_MODELS and not build_models:
            continue
        try:
            resolve_model(m.model)  # builds the demo model once, with a progress bar
        except ValueError as e:
            raise CLIError(f"models[{i}].model: {e}") from None
    data = cfg.model_dump(mode="json")
    digests = []
    for i, key in enumerate(cfg.api_keys):
        try:
            digests.append({**key.model_dump(exclude={"sha256", "env"}), "sha256": key.digest()})
        except ValueError:
            msg = f"api_keys[{i}].env: environment variable {key.env} is not set"
            raise CLIError(msg) from None
    data["api_keys"] = digests
    return ClusterConfig.model_validate(data)


def cmd_up(args: argparse.Namespace) -> int:
    from cluster import ray_runtime

    cfg = build_config(args)
    # Both signals stop the cluster cleanly (a SIGTERM while it comes up too), also when a script
    # started us with SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    old = load_state()
    if old is not None:
        if old.head_pid is None or ray_runtime.pid_is_head(old.head_pid):
            msg = f"a fleetlm cluster is already running at {old.url}; `fleetlm down` first"
            raise CLIError(msg)
        ray_runtime.forget_address_file(old.address_file, old.ray_address)
        clear_state()  # its head is gone: a stale record

    address = cfg.ray.address or os.environ.get("RAY_ADDRESS") or None
    deploy_cfg = prepare_for_deploy(cfg, build_models=address is None)
    head = None
    if address is None:
        if not ray_runtime.port_free(cfg.http.port, cfg.http.host):
            raise CLIError(f"http.port: {cfg.http.host}:{cfg.http.port} is in use; pick --port")
        _say(f"Starting a local Ray head ({cfg.ray.num_cpus or 'all'} CPUs)...")
        t0 = time.monotonic()
        try:
            head = ray_runtime.start_head(
                log_path=state_dir() / "ray-head.log",
                num_cpus=cfg.ray.num_cpus,
                port=args.ray_port,
                dashboard=args.dashboard,
                dashboard_host=cfg.ray.dashboard_host,
                die_with_parent=not args.detach,
                extra_env=(
                    ray_runtime.direct_ingress_env(cfg.http.direct_ingress_port)
                    if cfg.http.direct_ingress
                    else None
                ),
            )
        except ray_runtime.RayStartError as e:
            raise CLIError(str(e)) from None
        address, auth_mode = head.address, head.auth_mode
        took = time.monotonic() - t0
        _say(f"Ray head at {address} in {took:.0f}s (auth: {auth_mode}; log {head.log_path})")
    else:
        auth_mode = ray_runtime.auth_mode_for_join()
        _say(f"Joining Ray at {address} (auth: {auth_mode})")
        if cfg.http.direct_ingress:
            env = " ".join(
                f"{k}={v}"
                for k, v in ray_runtime.direct_ingress_env(cfg.http.direct_ingress_port).items()
            )
            _say(
                "http.direct_ingress: Serve reads it from the Ray head's environment; this "
                f"cluster's head must have been started with {env} (else only the proxy serves)"
            )

    url = f"http://{_client_host(cfg.http.host)}:{cfg.http.port}"
    state = ClusterState(
        ray_address=address,
        url=url,
        app_name=APP_NAME,
        head_pid=head.pid if head else None,
        auth_mode=auth_mode,
        address_file=head.address_file if head else None,
        models=[m.name for m in cfg.models],
        config_path=str(Path(args.config).resolve()) if args.config else None,
        detached=args.detach,
        drain_timeout_s=cfg.http.drain_timeout_s,
    )
    save_state(state)
    try:
        ray_runtime.connect(address, auth_mode)
        _forget_drain(APP_NAME)  # a joined cluster may hold an earlier `down`'s drain
        deploy(deploy_cfg)
        wait_until_ready(APP_NAME, timeout_s=args.timeout)
    except (Exception, KeyboardInterrupt) as e:
        _teardown(state)
        if isinstance(e, KeyboardInterrupt):
            raise
        if isinstance(e, CLIError):
            raise
        raise CLIError(f"deploy failed: {e}") from None

    try:
        try:
            from cluster.policy_memory import restore_live

            print(restore_live())
        except Exception as e:  # noqa: BLE001 - serving goes on; say plainly what runs
            print(f"autoscaling policy: built-in defaults (restoring the saved one failed: {e})")
        _print_ready(cfg, url)
        if cfg.http.direct_ingress:
            direct = find_direct_ingress(_client_host(cfg.http.host), cfg.http.direct_ingress_port)
            if direct:
                print(f"  direct ingress (no proxy hop): {direct}/v1")
            else:
                print(
                    f"  direct ingress: nothing answers from port {cfg.http.direct_ingress_port}; "
                    "is the Ray head's environment set (see above)?"
                )
        if args.detach:
            ray_runtime.disconnect()
            print("Detached. `fleetlm status` shows it; `fleetlm down` stops it.")
            return 0
        print("Serving in the foreground; Ctrl-C stops the cluster.")
        while head is None or ray_runtime.pid_is_head(head.pid):
            time.sleep(1.0)
        print("fleetlm: the Ray head exited", file=sys.stderr)
        clear_state()
        return 1
    except KeyboardInterrupt:  # SIGINT or SIGTERM, also while the cluster was coming up
        print("\nShutting down...")
        _teardown(state)
        print("Stopped.")
        return 0


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def deploy(cfg: ClusterConfig) -> None:
    """Start Serve's proxy on the configured host/port and apply the rendered Serve config."""
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    rendered = render_serve_config(cfg)
    serve.start(http_options=rendered["http_options"])
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(rendered))


def wait_until_ready(app_name: str, timeout_s: float) -> None:
    """Poll Serve until the app runs, drawing a progress line; CLIError on failure or timeout."""
    from ray import serve

    t0 = time.monotonic()
    last = ""
    while True:
        elapsed = time.monotonic() - t0
        app = serve.status().applications.get(app_name)
        status = str(app.status.value) if app else "NOT_STARTED"
        parts = []
        if app:
            for name, d in sorted(app.deployments.items()):
                states = {str(getattr(k, "value", k)): v for k, v in d.replica_states.items()}
                total = sum(states.values())
                parts.append(f"{name} {states.get('RUNNING', 0)}/{total}")
        line = f"[{elapsed:5.0f}s] {status.lower()}: " + (", ".join(parts) or "building app")
        if sys.stdout.isatty():
            print("\r" + line.ljust(100), end="", flush=True)
        elif line.split("] ", 1)[1] != last:
            print(line, flush=True)
        last = line.split("] ", 1)[1]
        if status == "RUNNING":
            if sys.stdout.isatty():
                print()
            return
        if status in ("DEPLOY_FAILED", "UNHEALTHY"):
            if sys.stdout.isatty():
                print()
            raise CLIError(f"deploy failed: {_first_lines(app.message if app else '')}")
        if elapsed > timeout_s:
            if sys.stdout.isatty():
                print()
            raise CLIError(f"replicas not ready after {timeout_s:.0f}s ({line}); see the Ray logs")
        time.sleep(0.5)


def _first_lines(msg: str, n: int = 6) -> str:
    lines = [ln for ln in msg.strip().splitlines() if ln.strip()]
    return " | ".join(lines[-n:]) if lines else "no message from Serve"


def find_direct_ingress(host: str, first_port: int, tries: int = 16) -> str | None:
    """The URL of the ingress replica's own HTTP server: Serve gives it the first free port from
    ``first_port``, so probe /health upwards."""
    import httpx

    for port in range(first_port, first_port + tries):
        url = f"http://{host}:{port}"
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return url
        except httpx.HTTPError:
            continue
    return None


def _print_ready(cfg: ClusterConfig, url: str) -> None:
    model = cfg.models[0].name
    auth = ' -H "Authorization: Bearer $API_KEY"' if cfg.api_keys else ""
    body = json.dumps({"model": model, "prompt": "Hello", "max_tokens": 16})
    print(f"\nfleetlm is serving {', '.join(m.name for m in cfg.models)} at {url}/v1")
    print(f"  curl {url}/v1/completions -H 'Content-Type: application/json'{auth} -d '{body}'")


def _drain(state: ClusterState) -> None:
    """Stop admitting and wait for the requests in flight (deployments/drain.py), at most
    ``state.drain_timeout_s``. A second Ctrl-C / SIGTERM cuts the wait short."""
    from ray import serve

    from deployments import drain
    from deployments.names import INGRESS_NAME

    if state.drain_timeout_s <= 0:
        return
    app = serve.status().applications.get(state.app_name)
    dep = app.deployments.get(INGRESS_NAME) if app else None
    if dep is None:
        return
    states = {str(getattr(k, "value", k)): v for k, v in dep.replica_states.items()}
    replicas = states.get("RUNNING", 0)
    if not replicas:
        return
    drain.announce(state.app_name, state.drain_timeout_s)
    _say(
        f"Draining: new requests get a 503; up to {state.drain_timeout_s:g}s for the requests "
        "in flight..."
    )
    t0 = time.monotonic()
    try:
        idle, left = drain.wait_until_idle(
            lambda: drain.read_total(state.app_name, replicas), state.drain_timeout_s
        )
    except KeyboardInterrupt:
        _say("Drain cut short.")
        return
    took = time.monotonic() - t0
    # Idle only once the deadline passed: the ingress ended what was left at its deadline.
    if idle and took < state.drain_timeout_s:
        _say(f"Drained in {took:.1f}s.")
    else:
        what = "an unknown number of" if left is None else str(left)
        _say(f"Grace period over after {took:.0f}s: {what} requests end with an error event.")
        time.sleep(1.0)  # a stream writes its error event at its next chunk


def _forget_drain(app_name: str) -> None:
    from deployments import drain

    try:
        drain.clear(app_name)
    except Exception:  # noqa: BLE001 - no KV: nothing to forget
        pass


def _teardown(state: ClusterState) -> None:
    """Drain, shut Serve down gracefully, then stop the head we started and forget the
    cluster."""
    from cluster import ray_runtime

    try:
        _drain(state)
    except Exception as e:  # noqa: BLE001 - shut down regardless
        _say(f"drain failed ({e}); shutting down")
    try:
        from ray import serve

        if state.head_pid is not None:
            serve.shutdown()
        else:
            serve.delete(state.app_name)
    except Exception:  # noqa: BLE001 - the head is stopped below regardless
        pass
    _forget_drain(state.app_name)
    ray_runtime.disconnect()
    if state.head_pid is not None:
        ray_runtime.stop_head(
            state.head_pid, address_file=state.address_file, address=state.ray_address
        )
    clear_state()


def _say(msg: str) -> None:
    print(msg, flush=True)


# ---- status / down ----------------------------------------------------------------------


def _require_state() -> ClusterState:
    state = load_state()
    if state is None:
        raise CLIError("no running fleetlm cluster recorded here (start one with `fleetlm up`)")
    return state


def cmd_down(args: argparse.Namespace) -> int:
    from cluster import ray_runtime

    state = _require_state()
    if state.head_pid is not None and not ray_runtime.pid_is_head(state.head_pid):
        ray_runtime.forget_address_file(state.address_file, state.ray_address)
        clear_state()
        print("The recorded Ray head is already gone; forgot it.")
        return 0
    try:
        ray_runtime.connect(state.ray_address, state.auth_mode)
    except ConnectionError as e:
        if state.head_pid is None:
            raise CLIError(str(e)) from None
    _teardown(state)
    print(f"Stopped fleetlm at {state.url}.")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from cluster import ray_runtime
    from cluster.status import collect_status, format_status

    state = _require_state()
    if state.head_pid is not None and not ray_runtime.pid_is_head(state.head_pid):
        msg = f"the Ray head (pid {state.head_pid}) is gone; `fleetlm down` forgets it"
        raise CLIError(msg)
    try:
        ray_runtime.connect(state.ray_address, state.auth_mode)
    except ConnectionError as e:
        raise CLIError(str(e)) from None
    report = collect_status(state)
    ray_runtime.disconnect()
    print(json.dumps(report, indent=2) if args.json else format_status(report))
    return 0
