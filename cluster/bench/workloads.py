"""Benchmark workloads W1, W2, W3, W5 (see shared/WORKLOADS.md) as lists of request specs.

Prompts are random token ids, sent as ``prompt: [ids]`` to /v1/completions, so any server with the
same vocabulary gets exactly ``prompt_len`` tokens (no tokenizer round trip). Every builder is
deterministic for a given seed. A workload says how it is driven by default (fixed concurrency or
Poisson rate); callers may override both.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

WORKLOADS = ("W1", "W2", "W3", "W5")

# Token ids below this are skipped when drawing random prompts: HF tokenizers put their special
# tokens (pad/bos/eos/unk) first, and a BOS or EOS inside a prompt confuses some models.
DEFAULT_MIN_TOKEN_ID = 16
DEFAULT_VOCAB_SIZE = 4096  # the embedded demo models' vocabulary

# W5's paraphrased duplicates (semantic-cache hits): each group is one question, several ways.
PARAPHRASES: list[list[str]] = [
    [
        "What is the capital of France?",
        "Which city is the capital of France?",
        "Tell me the capital city of France.",
    ],
    [
        "How many days are there in a leap year?",
        "A leap year has how many days?",
        "What is the number of days in a leap year?",
    ],
    [
        "Who wrote the play Hamlet?",
        "Which author wrote Hamlet?",
        "Hamlet was written by whom?",
    ],
    [
        "What is the boiling point of water at sea level in Celsius?",
        "At sea level, water boils at what temperature in Celsius?",
        "In degrees Celsius, what is water's boiling point at sea level?",
    ],
]


@dataclass
class RequestSpec:
    prompt: list[int] | str  # token ids (exact length) or text (W5 paraphrases)
    max_tokens: int
    prompt_len: int  # tokens when prompt is ids; 0 (unknown here) for text prompts
    tag: str = ""  # groups requests in the report, e.g. "group3", "dup"


@dataclass
class WorkloadSpec:
    name: str
    requests: list[RequestSpec]
    concurrency: int | None = None  # default max in-flight requests; None: unbounded
    rate: float | None = None  # default Poisson arrival rate (req/s); None: all at once
    ignore_eos: bool = True
    temperature: float = 0.0
    params: dict[str, Any] = field(default_factory=dict)  # builder arguments, for the report

    def __post_init__(self) -> None:
        if not self.requests:
            raise ValueError("workload has no requests")


def _check_pos(**kwargs: int | None) -> None:
    for name, v in kwargs.items():
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ValueError(f"{name} must be a positive integer, got {v!r}")


class TokenSampler:
    """Draws random token ids in [min_token_id, vocab_size), skipping any id listed as special."""

    def __init__(
        self,
        vocab_size: int = DEFAULT_VOCAB_SIZE,
        seed: int = 0,
        min_token_id: int = DEFAULT_MIN_TOKEN_ID,
        exclude: set[int] | None = None,
    ) -> None:
        if vocab_size <= min_token_id:
            raise ValueError(
                f"vocab_size must exceed min_token_id={min_token_id}, got {vocab_size}"
            )
        self.rng = random.Random(seed)
        self.ids = [i for i in range(min_token_id, vocab_size) if i not in (exclude or set())]

    def draw(self, n: int) -> list[int]:
        return [self.rng.choice(self.ids) for _ in range(n)]


def build_w1(
    sampler: TokenSampler, num_requests: int = 32, prompt_len: int = 128, output_len: int = 64
) -> WorkloadSpec:
    """Batch: every request submitted at once; the figure is output tokens/s."""
    _check_pos(num_requests=num_requests, prompt_len=prompt_len, output_len=output_len)
    reqs = [
        RequestSpec(sampler.draw(prompt_len), output_len, prompt_len) for _ in range(num_requests)
    ]
    return WorkloadSpec(
        "W1",
        reqs,
        concurrency=num_requests,
        params=dict(num_requests=num_requests, prompt_len=prompt_len, output_len=output_len),
    )


def build_w2(
    sampler: TokenSampler,
    groups: int = 16,
    prompts_per_group: int = 16,
    prefix_len: int = 512,
    question_len: int = 64,
    output_len: int = 64,
    concurrency: int = 16,
) -> WorkloadSpec:
    """Shared prefix: each prompt = its group's system prefix + a unique question; shuffled."""
    _check_pos(
        groups=groups,
        prompts_per_group=prompts_per_group,
        prefix_len=prefix_len,
        question_len=question_len,
        output_len=output_len,
        concurrency=concurrency,
    )
    reqs = []
    for g in range(groups):
        prefix = sampler.draw(prefix_len)
        for _ in range(prompts_per_group):
            prompt = prefix + sampler.draw(question_len)
            reqs.append(RequestSpec(prompt, output_len, len(prompt), tag=f"group{g}"))
    sampler.rng.shuffle(reqs)
    return WorkloadSpec(
        "W2",
        reqs,
        concurrency=concurrency,
        params=dict(
            groups=groups,
            prompts_per_group=prompts_per_group,
            prefix_len=prefix_len,
            question_len=question_len,
            output_len=output_len,
        ),
    )


def build_w3(
    sampler: TokenSampler,
    num_requests: int = 64,
    prompt_len: int = 256,
    output_len: int = 128,
    rate: float = 1.0,
) -> WorkloadSpec:
    """Online: Poisson arrivals at `rate` req/s, unbounded concurrency."""
    _check_pos(num_requests=num_requests, prompt_len=prompt_len, output_len=output_len)
    if not rate > 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    reqs = [
        RequestSpec(sampler.draw(prompt_len), output_len, prompt_len) for _ in range(num_requests)
    ]
    return WorkloadSpec(
        "W3",
        reqs,
        rate=rate,
        params=dict(num_requests=num_requests, prompt_len=prompt_len, output_len=output_len),
    )


def build_w5(
    sampler: TokenSampler,
    num_requests: int = 8,
    segment_len: int = 32,
    repeats: int = 4,
    output_len: int = 64,
    paraphrases: bool = True,
) -> WorkloadSpec:
    """Repetition, at batch 1 by default.

    "repeat" requests: a random segment repeated `repeats` times then its first half again, so the
    likely continuation is text already in the prompt (n-gram / prompt-lookup speculation).
    With `paraphrases`, each question of PARAPHRASES is then sent in all its wordings, tagged "orig"
    for the first and "dup" for the rest (semantic-cache hits and their latency), greedy.
    """
    _check_pos(
        num_requests=num_requests, segment_len=segment_len, repeats=repeats, output_len=output_len
    )
    reqs = []
    for _ in range(num_requests):
        seg = sampler.draw(segment_len)
        prompt = seg * repeats + seg[: segment_len // 2]
        reqs.append(RequestSpec(prompt, output_len, len(prompt), tag="repeat"))
    if paraphrases:
        for group in PARAPHRASES:
            for i, text in enumerate(group):
                reqs.append(RequestSpec(text, output_len, 0, tag="orig" if i == 0 else "dup"))
    return WorkloadSpec(
        "W5",
        reqs,
        concurrency=1,
        params=dict(
            num_requests=num_requests,
            segment_len=segment_len,
            repeats=repeats,
            output_len=output_len,
            paraphrases=paraphrases,
        ),
    )


def make_workload(
    name: str,
    *,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    seed: int = 0,
    exclude_ids: set[int] | None = None,
    num_requests: int | None = None,
    prompt_len: int | None = None,
    output_len: int | None = None,
    groups: int | None = None,
    prompts_per_group: int | None = None,
    prefix_len: int | None = None,
    question_len: int | None = None,
    rate: float | None = None,
    concurrency: int | None = None,
) -> WorkloadSpec:
    """Build a named workload; None leaves each size at its WORKLOADS.md default.

    An option that the workload does not use raises ValueError naming it, so a typo in a benchmark
    script cannot silently run the default shape.
    """
    name = name.upper()
    sampler = TokenSampler(vocab_size, seed, exclude=exclude_ids)
    given = {
        k: v
        for k, v in dict(
            num_requests=num_requests,
            prompt_len=prompt_len,
            output_len=output_len,
            groups=groups,
            prompts_per_group=prompts_per_group,
            prefix_len=prefix_len,
            question_len=question_len,
            rate=rate,
            concurrency=concurrency,
        ).items()
        if v is not None
    }
    allowed = {
        "W1": {"num_requests", "prompt_len", "output_len", "concurrency", "rate"},
        "W2": {
            "groups",
            "prompts_per_group",
            "prefix_len",
            "question_len",
            "output_len",
            "concurrency",
            "rate",
        },
        "W3": {"num_requests", "prompt_len", "output_len", "rate", "concurrency"},
        "W5": {"num_requests", "prompt_len", "output_len", "concurrency", "rate"},
    }
    if name not in allowed:
        raise ValueError(f"workload must be one of {', '.join(WORKLOADS)}, got {name!r}")
    bad = sorted(set(given) - allowed[name])
    if bad:
        raise ValueError(f"option(s) {bad} do not apply to workload {name}")
    drive = {k: given.pop(k) for k in ("concurrency", "rate") if k in given}
    if name == "W1":
        spec = build_w1(sampler, **given)
    elif name == "W2":
        spec = build_w2(sampler, **given)
    elif name == "W3":
        spec = build_w3(sampler, **given)
    else:
        if "prompt_len" in given:  # W5's prompt is segment × repeats; prompt_len sets the segment
            given["segment_len"] = given.pop("prompt_len")
        spec = build_w5(sampler, **given)
    if "concurrency" in drive:
        spec.concurrency = drive["concurrency"]
    if "rate" in drive:
        spec.rate = drive["rate"]
    return spec
