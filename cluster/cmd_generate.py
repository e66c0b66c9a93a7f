"""`fleetlm generate --model demo "prompt" ...`: offline generation with the engine (no Ray/HTTP).

One prompt streams its text as it is generated; several run as one continuous batch and print in
order.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from cluster.cli import CLIError


def register(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="generate text offline with the engine (no server)")
    g.add_argument("prompts", nargs="+", metavar="PROMPT", help="prompt text(s); '-' reads stdin")
    g.add_argument("--model", default="demo", help="demo, demo-small or a local HF model folder")
    g.add_argument("--max-tokens", type=int, default=64, help="new tokens per prompt")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, help="per-request sampling seed")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="always generate --max-tokens")
    g.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    g.add_argument(
        "--engine",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="engine option (EngineConfig field), e.g. --engine max_num_seqs=8 (repeatable)",
    )
    g.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    g.set_defaults(func=cmd_generate)


def parse_engine_options(pairs: list[str]) -> dict[str, Any]:
    """KEY=VALUE strings → typed values (YAML scalars: 8 → int, true → bool, null → None)."""
    import yaml

    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CLIError(f"--engine: expected KEY=VALUE, got {pair!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def cmd_generate(args: argparse.Namespace) -> int:
    from engine.config import EngineConfig
    from engine.sampling_params import SamplingParams

    opts = parse_engine_options(args.engine)
    for owned in ("model",):
        if owned in opts:
            raise CLIError(f"--engine {owned}=...: use --{owned}")
    try:
        config = EngineConfig.from_dict({**opts, "model": args.model})
        params = SamplingParams(
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
            max_tokens=args.max_tokens,
            stop=list(args.stop),
            ignore_eos=args.ignore_eos,
        )
        params.validate()
    except (TypeError, ValueError) as e:
        raise CLIError(str(e)) from None

    prompts = [sys.stdin.read() if p == "-" else p for p in args.prompts]
    from engine.llm_engine import LLMEngine

    try:
        engine = LLMEngine(config)
    except ValueError as e:
        raise CLIError(f"--model: {e}") from None
    ids = [_encode(engine.tokenizer, p, args.chat) for p in prompts]
    stream = len(prompts) == 1 and not args.json
    t0 = time.perf_counter()
    texts: dict[str, list[str]] = {}
    finish: dict[str, str | None] = {}
    counts: dict[str, int] = {}
    order = []
    try:
        for prompt_ids in ids:
            rid = engine.add_request(None, prompt_ids, params)
            order.append(rid)
            texts[rid], finish[rid], counts[rid] = [], None, 0
    except ValueError as e:
        raise CLIError(str(e)) from None
    while engine.has_unfinished():
        for out in engine.step():
            texts[out.request_id].append(out.new_text)
            counts[out.request_id] += len(out.new_token_ids)
            if stream and out.new_text:
                print(out.new_text, end="", flush=True)
            if out.finished:
                finish[out.request_id] = out.finish_reason
    elapsed = time.perf_counter() - t0
    total = sum(counts.values())
    if stream:
        print()
    for i, rid in enumerate(order):
        text = "".join(texts[rid])
        if args.json:
            row = {
                "prompt": prompts[i],
                "text": text,
                "finish_reason": finish[rid],
                "prompt_tokens": len(ids[i]),
                "completion_tokens": counts[rid],
            }
            print(json.dumps(row))
        elif not stream:
            print(f"--- [{i}] {prompts[i]!r} ({finish[rid]})\n{text}")
    print(
        f"{len(order)} prompt(s), {total} tokens in {elapsed:.2f}s ({total / elapsed:.1f} tok/s)",
        file=sys.stderr,
    )
    return 0


def _encode(tokenizer: Any, prompt: str, chat: bool) -> list[int]:
    if chat:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        # transformers 5 may return a BatchEncoding-like mapping instead of a list
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return tokenizer.encode(prompt)
