"""Start or join Ray for the CLI, with Ray 2.60's token authentication handled.

Facts this module is built on (read from ray 2.60's worker.py, scripts.py and
_private/authentication/, and checked on this machine):
- ``ray.init()`` with no address turns token auth on for the new local cluster and writes a token
  to ``~/.ray/auth_token`` if none exists. ``ray start --head`` turns it on only when
  ``RAY_AUTH_MODE=token`` is set or a token already exists.
- A process that joins with an explicit address (``ray.init(address="IP:PORT")``, ``RAY_ADDRESS``)
  does NOT turn token mode on by itself: against a token cluster it fails after ~20 s with a bare
  ConnectionError. It must run with ``RAY_AUTH_MODE=token`` and find the token in
  ``$RAY_AUTH_TOKEN``, ``$RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``. A token-mode client also
  connects to a cluster whose auth is disabled, so "token whenever a token is available" is safe
  when joining.
- ``ray start --head --block`` stays in the foreground as the parent of the head's processes and, on
  SIGTERM, stops exactly those processes. We start the head that way (in its own session) and stop
  it by its pid: never ``ray stop``, which kills every Ray process on the machine.
- ``ray start`` records its address in ``$RAY_TMPDIR/ray/ray_current_cluster`` (default /tmp/ray),
  which a plain ``ray.init()`` elsewhere then joins; we remove that file when we stop the head.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

AUTH_MODE_ENV = "RAY_AUTH_MODE"
WORKER_NICENESS_ENV = "RAY_worker_niceness"  # Ray's worker_niceness setting (default 15)
# Serve's HTTP proxy reaches the ingress replicas over their inter-deployment gRPC servers instead
# of Ray actor calls (one piece of Serve's throughput-optimized mode; each proxy reads it at start).
# Streaming W1, per 1,000 tokens: proxy 0.20 CPU-s instead of 0.33, ingress 0.26 instead of 0.37
# (BENCHMARKS.md, serving path).
PROXY_GRPC_ENV = "RAY_SERVE_PROXY_USE_GRPC"


def serving_env() -> dict[str, str]:
    """The environment every process of a serving Ray node starts with (Ray and Serve read it at
    start): workers at nice 0 (Ray's default 15 loses the cores to any other process, e.g. a
    client or benchmark on the same machine: about 10% of W1 over HTTP on 2 cores) and the proxy
    talking gRPC to the replicas."""
    return {WORKER_NICENESS_ENV: "0", PROXY_GRPC_ENV: "1"}


def direct_ingress_env(first_port: int) -> dict[str, str]:
    """Ray Serve's throughput-optimized mode with its direct ingress (read by Serve's processes at
    start: it must be in the head's environment). It also runs replica code on the replica's main
    loop, talks gRPC between replicas and freezes GC after start."""
    return {
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(first_port),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(first_port + 1000),
        # Serve holds a draining ingress 30 s by default (for an external load balancer to notice);
        # `fleetlm down` on a local head needn't wait that long.
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5",
    }


_PR_SET_PDEATHSIG = 1


class RayStartError(RuntimeError):
    """The head didn't come up; the message carries the tail of its log."""


@dataclass
class HeadProcess:
    address: str  # GCS "IP:PORT"
    pid: int  # the `ray start --head --block` process
    log_path: Path
    auth_mode: str
    address_file: str  # ray_current_cluster written by this head


def default_token_path() -> Path:
    return Path.home() / ".ray" / "auth_token"


def token_available() -> bool:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    p = Path(path) if path else default_token_path()
    try:
        return bool(p.read_text().strip())
    except OSError:
        return False


def ray_executable() -> str:
    beside = Path(sys.executable).with_name("ray")
    if beside.exists():
        return str(beside)
    found = shutil.which("ray")
    if not found:
        raise RayStartError("the `ray` command isn't installed (pip install 'ray[serve]')")
    return found


def ensure_token() -> None:
    """Create ~/.ray/auth_token (as `ray get-auth-token --generate` does) when no token exists."""
    if token_available():
        return
    subprocess.run(
        [ray_executable(), "get-auth-token", "--generate"],
        check=True,
        capture_output=True,
        timeout=120,
    )


def auth_mode_for_new_head() -> str:
    """An explicit RAY_AUTH_MODE wins; else token auth, Ray's own default for local clusters."""
    return os.environ.get(AUTH_MODE_ENV, "").lower() or "token"


def auth_mode_for_join() -> str:
    explicit = os.environ.get(AUTH_MODE_ENV, "").lower()
    if explicit:
        return explicit
    return "token" if token_available() else "disabled"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def port_free(port: int, host: str = "") -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def ray_address_file() -> str:
    """Path of ray_current_cluster for the current environment (RAY_TMPDIR / TMPDIR / /tmp)."""
    base = os.environ.get("RAY_TMPDIR")
    if not base and sys.platform.startswith("linux"):
        base = os.environ.get("TMPDIR")
    return os.path.join(base or "/tmp", "ray", "ray_current_cluster")


def start_head(
    *,
    log_path: Path,
    num_cpus: int | None = None,
    port: int | None = None,
    dashboard: bool = False,
    dashboard_host: str = "127.0.0.1",
    die_with_parent: bool = False,
    timeout_s: float = 120.0,
    extra_env: dict[str, str] | None = None,
) -> HeadProcess:
    """Start `ray start --head --block` in its own session and wait until it serves.

    Ports: GCS on `port` (default 6379 when free, so `ray status` finds it); the client server,
    dashboard and dashboard agent get free ports, so several clusters on one machine don't collide.
    die_with_parent: the head gets SIGTERM when this process dies (foreground `fleetlm up`).
    """
    auth_mode = auth_mode_for_new_head()
    if auth_mode == "token":
        ensure_token()
    if port is None:
        port = 6379 if port_free(6379) else free_port()
    elif not port_free(port):
        raise RayStartError(f"port {port} for the Ray head is in use")
    dashboard_port = 8265 if dashboard and port_free(8265) else free_port()
    args = [
        ray_executable(),
        "start",
        "--head",
        "--block",
        f"--port={port}",
        "--disable-usage-stats",
        f"--include-dashboard={'true' if dashboard else 'false'}",
        f"--dashboard-host={dashboard_host}",
        f"--dashboard-port={dashboard_port}",
        f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
    ]
    if num_cpus is not None:
        args.append(f"--num-cpus={num_cpus}")
    env = {**serving_env(), **os.environ, AUTH_MODE_ENV: auth_mode}
    env.update(extra_env or {})
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # Ctrl-C in our terminal must not reach it; we stop it in order
            preexec_fn=_die_with_parent if die_with_parent else None,
        )
    try:
        return _wait_for_head(proc, log_path, auth_mode, timeout_s)
    except BaseException:  # not up in time, or Ctrl-C: don't leave a half-started head behind
        stop_head(proc.pid)
        raise


def _wait_for_head(
    proc: subprocess.Popen, log_path: Path, auth_mode: str, timeout_s: float
) -> HeadProcess:
    deadline = time.monotonic() + timeout_s
    address = None
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace")
        if proc.poll() is not None:
            raise RayStartError(f"`ray start --head` exited ({proc.returncode}):\n{_tail(text)}")
        m = re.search(r"ray start --address='([^']+)'", text)
        if m:
            address = m.group(1)
        if address and "block forever" in text:
            return HeadProcess(address, proc.pid, log_path, auth_mode, ray_address_file())
        time.sleep(0.2)
    raise RayStartError(f"Ray head not up after {timeout_s:.0f}s:\n{_tail(log_path.read_text())}")


def _die_with_parent() -> None:
    # Runs in the child between fork and exec (Linux): SIGTERM when the `fleetlm up` process dies.
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def _tail(text: str, n: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


def pid_is_head(pid: int) -> bool:
    """True when `pid` is alive and is a `ray start --head --block` (guards against pid reuse)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True  # no /proc (macOS): trust the recorded pid
    return b"start" in cmdline and b"--head" in cmdline and b"--block" in cmdline


def stop_head(
    pid: int,
    timeout_s: float = 75.0,
    address_file: str | None = None,
    address: str | None = None,
) -> bool:
    """SIGTERM the head we started (it stops its own raylet, GCS, workers); SIGKILL after timeout.

    On SIGTERM the head first drains the node for up to $RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S
    (30 s; quick when Serve was shut down first, as `down` does), then stops its processes: the
    default timeout leaves room for both, since a SIGKILL mid-drain would orphan them.

    Returns True when it is gone. Removes `address_file` (ray_current_cluster) if it still names
    `address`, this head's cluster, so a later plain `ray.init()` doesn't try to join a dead one.
    """
    if pid_is_head(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.2)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
            time.sleep(0.5)
    gone = not _alive(pid)
    if gone and address is not None:
        forget_address_file(address_file, address)
    return gone


def forget_address_file(address_file: str | None, address: str) -> None:
    """Remove ray_current_cluster when it still names `address` (a head that died unstopped)."""
    if address_file and _read(address_file) == address:
        try:
            os.remove(address_file)
        except OSError:
            pass


def _alive(pid: int) -> bool:
    try:
        # Reap it if it is our child (foreground `up`), so it doesn't linger as a zombie.
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        return state != "Z"
    except OSError:
        return True


def _read(path: str | None) -> str | None:
    if not path:
        return None
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def connect(address: str, auth_mode: str) -> None:
    """ray.init() as a driver of the cluster at `address`, quietly, with the given auth mode.

    Raises ConnectionError with a hint about tokens when the cluster can't be reached.
    """
    os.environ[AUTH_MODE_ENV] = auth_mode
    import ray

    try:  # Ray caches its config at import; refresh it as ray's own _enable_token_auth does.
        from ray._raylet import Config

        Config.initialize("")
    except Exception:  # noqa: BLE001 - best effort across Ray versions
        pass
    if ray.is_initialized():
        return
    # ray.init() replaces the SIGTERM handler with sys.exit(15): `fleetlm up`'s handler (stop
    # Serve and the head, then exit 0) would never run. Keep the caller's handler.
    main = threading.current_thread() is threading.main_thread()
    sigterm = signal.getsignal(signal.SIGTERM) if main else None
    try:
        ray.init(
            address=address,
            log_to_driver=False,
            logging_level="ERROR",
            configure_logging=True,
            namespace="fleetlm",
        )
    except ConnectionError as e:
        hint = ""
        if auth_mode == "token" and not token_available():
            hint = " (token auth: set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH to the cluster's token)"
        elif auth_mode != "token":
            hint = " (if the cluster uses token auth, set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN)"
        raise ConnectionError(f"can't connect to Ray at {address}: {e}{hint}") from None
    finally:
        if sigterm is not None:
            signal.signal(signal.SIGTERM, sigterm)


def disconnect() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
