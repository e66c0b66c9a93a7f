"""W5 (repetition) decode speed with speculative decoding: none vs n-gram vs draft model, batch 1
and batch 16, in one run on the same engine settings and prompts.

    python bench/speculative.py --json out/spec.json [--model demo-copy] [--draft demo-copy-small]

W5 prompts ask the model to repeat/continue text that is in the prompt (a passage given twice and
started a third time), which is where prompt lookup helps a model that copies. The default model,
``demo-copy``, is the embedded demo model trained to continue text from its context (induction
heads); ``demo-copy-small`` is its draft. ``--model demo`` runs the random-weight demo model, which
never copies (acceptance ~0). ``--draft-is-target`` adds an oracle row (draft = target, every draft
accepted) that bounds what the verification path can gain on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from tqdm import tqdm

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.models.demo import corpus_token_ids, resolve_model
from engine.sampling_params import SamplingParams


def w5_prompts(tokenizer, n: int, seed: int = 0, passages: str = "random") -> list[list[int]]:
    """``passages``: "random" token spans, or "text": 48-token windows of the corpus the demo
    tokenizer was trained on (prose and code, whose repeated words make copying ambiguous)."""
    g = torch.Generator().manual_seed(seed)
    corpus = corpus_token_ids(tokenizer) if passages == "text" else None
    out = []
    for _ in range(n):
        if corpus is not None:
            start = int(torch.randint(0, len(corpus) - 48, (1,), generator=g))
            passage = corpus[start : start + 48]
        else:
            passage = torch.randint(10, 4000, (48,), generator=g).tolist()
        ask = tokenizer.encode("Repeat the following text exactly:\n")
        out.append(ask + passage + tokenizer.encode("\nAgain:\n") + passage + passage[:8])
    return out


def decode_tok_s(engine: LLMEngine, prompts, out_len: int) -> float:
    """Output tokens per second of the decode phase (prefill timed separately and excluded)."""
    engine.block_manager.reset_prefix_cache()
    sp = SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True)
    first = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    engine.generate(prompts, first)  # prefill cached; decode below starts from warm prefixes
    t = time.perf_counter()
    res = engine.generate(prompts, sp)
    dt = time.perf_counter() - t
    return sum(len(r.token_ids) for r in res) / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="demo-copy", help="target model (demo name or HF folder)")
    ap.add_argument(
        "--draft",
        default="demo-copy-small",
        help="draft model (shares the tokenizer); none: no draft-model row",
    )
    ap.add_argument("--num-tokens", type=int, default=4, help="drafts per step (k)")
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--draft-is-target", action="store_true", help="add the oracle row")
    ap.add_argument(
        "--passages",
        choices=["random", "text"],
        default="random",
        help="W5 passages: random token spans, or windows of real text (corpus)",
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    path = resolve_model(args.model)
    methods: dict[str, dict | None] = {
        "none": None,
        "ngram": {"method": "ngram", "num_tokens": args.num_tokens},
    }
    if args.draft != "none":
        methods["draft_model"] = {
            "method": "draft_model",
            "model": args.draft,
            "num_tokens": args.num_tokens,
        }
    if args.draft_is_target:
        methods["oracle_draft_is_target"] = {
            "method": "draft_model",
            "model": args.model,
            "num_tokens": args.num_tokens,
        }
    engines = {m: LLMEngine(EngineConfig(model=path, speculative=s)) for m, s in methods.items()}
    prompts = w5_prompts(engines["none"].tokenizer, 16, passages=args.passages)
    result: dict = {
        "batch1": {},
        "batch16": {},
        "acceptance": {},
        "model": args.model,
        "draft": args.draft,
        "num_tokens": args.num_tokens,
        "passages": args.passages,
    }
    with tqdm(total=len(methods) * 2 * args.repeats, desc="W5", unit="run") as bar:
        for batch in (1, 16):
            rates: dict[str, list[float]] = {m: [] for m in methods}
            for _ in range(args.repeats):
                for m, eng in engines.items():
                    rates[m].append(decode_tok_s(eng, prompts[:batch], args.output_len))
                    bar.update()
            result[f"batch{batch}"] = {m: statistics.median(v) for m, v in rates.items()}
    for m, eng in engines.items():
        st = eng.stats()
        if m != "none":
            result["acceptance"][m] = st.spec_accepted_tokens / max(1, st.spec_draft_tokens)
    print(
        f"\nW5 ({args.passages} passages) decode output tok/s, model {args.model}, "
        f"draft {args.draft} (k={args.num_tokens}, median of {args.repeats}):"
    )
    for b in ("batch1", "batch16"):
        base = result[b]["none"]
        row = ", ".join(f"{m} {v:.1f} ({v / base:.2f}x)" for m, v in result[b].items())
        print(f"  {b}: {row}")
    print("  acceptance: " + ", ".join(f"{m} {a:.2f}" for m, a in result["acceptance"].items()))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        json.dump(result, open(args.json, "w"), indent=2)


if __name__ == "__main__":
    main()
