"""`fleetlm bench`: run a benchmark workload against any OpenAI-compatible server (ours, vLLM's)."""

from __future__ import annotations

import argparse
import asyncio
import sys

import httpx

from cluster.cli import CLIError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmark an OpenAI-compatible server with workload W1/W2/W3/W5",
        description="Send a workload (shared/WORKLOADS.md) to URL/v1/completions as streamed "
        "requests with random token-id prompts; print vLLM-style TTFT/TPOT/ITL/E2E, throughput, "
        "goodput and prefix-cache hit rate.",
    )
    p.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", help="model name sent in requests (default: first of /v1/models)")
    p.add_argument("--workload", required=True, type=str.upper, choices=["W1", "W2", "W3", "W5"])
    drive = p.add_argument_group("driving (defaults come from the workload)")
    drive.add_argument("--concurrency", type=int, help="max requests in flight")
    drive.add_argument(
        "--rate",
        type=parse_rates,
        help="Poisson arrival rate, requests/s; a comma list (1,2,4,8) runs a sweep, one run each",
    )
    size = p.add_argument_group("workload size (defaults per WORKLOADS.md)")
    size.add_argument("--num-requests", type=int, help="W1/W3/W5: number of requests")
    size.add_argument("--prompt-len", type=int, help="W1/W3 prompt tokens; W5 repeated segment")
    size.add_argument("--output-len", type=int, help="output tokens per request")
    size.add_argument("--groups", type=int, help="W2: prefix groups")
    size.add_argument("--prompts-per-group", type=int, help="W2: prompts per group")
    size.add_argument("--prefix-len", type=int, help="W2: shared prefix tokens")
    size.add_argument("--question-len", type=int, help="W2: unique question tokens")
    tok = p.add_argument_group("prompt tokens")
    tok.add_argument(
        "--vocab-size", type=int, help="random ids are drawn below this (default 4096)"
    )
    tok.add_argument(
        "--tokenizer",
        help="model folder (or demo/demo-small) whose vocabulary size and special ids to use",
    )
    tok.add_argument("--seed", type=int, default=0, help="prompt and arrival seed")
    out = p.add_argument_group("results")
    out.add_argument("--json", help="write the full result (per-request rows too) to this file")
    out.add_argument("--png", help="write latency/throughput plots to this PNG file")
    out.add_argument("--slo-ttft-ms", type=float, default=1000.0, help="goodput TTFT SLO")
    out.add_argument("--slo-tpot-ms", type=float, default=100.0, help="goodput TPOT SLO")
    out.add_argument("--slo-e2e-ms", type=float, help="goodput end-to-end SLO (off by default)")
    p.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout, seconds")
    p.add_argument(
        "--no-continuous-usage",
        action="store_true",
        help="don't ask for usage in every chunk (for servers that reject the vLLM extension)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_bench)


def tokenizer_vocab(name_or_path: str) -> tuple[int, set[int]]:
    """(vocab size, special token ids) of a local tokenizer folder or an embedded demo name."""
    from transformers import AutoTokenizer

    path = name_or_path
    if name_or_path in ("demo", "demo-small"):
        from engine.models.demo import resolve_model

        path = resolve_model(name_or_path, progress=False)
    tok = AutoTokenizer.from_pretrained(path)
    return len(tok), set(tok.all_special_ids)


def parse_rates(text: str) -> list[float]:
    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--rate must be numbers separated by commas: {e}") from e
    if not rates or any(not r > 0 for r in rates):
        raise argparse.ArgumentTypeError(f"--rate values must be > 0, got {text!r}")
    return rates


def cmd_bench(args: argparse.Namespace) -> int:
    from cluster.bench import SLO, BenchResult, first_model, make_workload, run_workload
    from cluster.bench.report import summary_text, sweep_text, write_json

    vocab_size, exclude = 4096, set()
    if args.tokenizer:
        vocab_size, exclude = tokenizer_vocab(args.tokenizer)
    if args.vocab_size:
        vocab_size = args.vocab_size
    rates: list[float | None] = list(args.rate) if args.rate else [None]
    try:
        workload = make_workload(
            args.workload,
            vocab_size=vocab_size,
            seed=args.seed,
            exclude_ids=exclude,
            num_requests=args.num_requests,
            prompt_len=args.prompt_len,
            output_len=args.output_len,
            groups=args.groups,
            prompts_per_group=args.prompts_per_group,
            prefix_len=args.prefix_len,
            question_len=args.question_len,
            rate=rates[0],
            concurrency=args.concurrency,
        )
        slo = SLO(args.slo_ttft_ms, args.slo_tpot_ms, args.slo_e2e_ms)
    except ValueError as e:
        raise CLIError(str(e)) from e

    async def go() -> list[BenchResult]:
        model = args.model or await first_model(args.url, args.api_key)
        results = []
        for rate in rates:
            r = await run_workload(
                args.url,
                model,
                workload,
                rate=rate,
                api_key=args.api_key,
                slo=slo,
                timeout_s=args.timeout,
                seed=args.seed,
                progress=not args.no_progress,
                continuous_usage=not args.no_continuous_usage,
            )
            print(summary_text(r), flush=True)
            results.append(r)
        return results

    try:
        results = asyncio.run(go())
    except ValueError as e:
        raise CLIError(str(e)) from e
    except (OSError, httpx.HTTPError) as e:  # /v1/models unreachable or refused
        raise CLIError(f"cannot list models at {args.url}: {e}") from e
    sweep = len(results) > 1
    if sweep:
        print(sweep_text(results))
    if args.json:
        print(f"wrote {write_json(results if sweep else results[0], args.json)}")
    if args.png:
        from cluster.bench.plots import write_png, write_sweep_png

        png = write_sweep_png(results, args.png) if sweep else write_png(results[0], args.png)
        print(f"wrote {png}")
    # Exit 1 when every request failed, so scripts notice a dead or misconfigured server.
    if all(r.completed == 0 for r in results):
        print("fleetlm bench: every request failed", file=sys.stderr)
        return 1
    return 0
