"""Greedy outputs of our engine are token-for-token those of transformers' generate(); seeded
sampling repeats; bad input is refused with a ValueError naming the field while others keep
running."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.config import EngineConfig
from engine.demo_model import resolve_model
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams

NEW = 12


def mixed_prompts(seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = [1, 2, 7, 16, 17, 31, 64, 100, 129, 200, 333, 450, 512, 600, 650, 700]
    prompts = [torch.randint(10, 4000, (n,), generator=g).tolist() for n in lengths]
    shared = torch.randint(10, 4000, (90,), generator=g).tolist()  # prefix shared by 4 prompts
    prompts += [
        shared + torch.randint(10, 4000, (k,), generator=g).tolist() for k in (3, 20, 40, 5)
    ]
    return prompts


@pytest.fixture(scope="module", params=["demo-small", "qwen2"])
def model_path(request, tmp_path_factory):
    if request.param == "qwen2":
        from tiny_models import tiny_qwen2

        return tiny_qwen2(tmp_path_factory.mktemp("qwen2") / "m", max_position_embeddings=1024)
    return resolve_model("demo-small")


@pytest.fixture(scope="module")
def reference(model_path):
    hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    out = []
    with torch.inference_mode():
        for p in mixed_prompts():
            ids = torch.tensor([p])
            gen = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=NEW,
                min_new_tokens=NEW,
                do_sample=False,
                pad_token_id=0,
            )
            out.append(gen[0, len(p) :].tolist())
    return out


GREEDY = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)


@pytest.mark.parametrize(
    "knobs",
    [
        dict(),  # default: big budget, prefix caching on
        dict(max_num_batched_tokens=128),  # chunked prefill: long prompts span several steps
        dict(num_kv_blocks=60, max_num_batched_tokens=256),  # small pool: forces preemption
        dict(
            enable_prefix_caching=False, enable_chunked_prefill=False, max_num_batched_tokens=1024
        ),
    ],
    ids=["default", "chunked", "preempt", "no-cache-no-chunk"],
)
def test_greedy_matches_hf_generate(model_path, reference, knobs):
    eng = LLMEngine(EngineConfig(model=model_path, **knobs))
    prompts = mixed_prompts()
    # Warm the prefix cache with the shared prefix so the batch sees real hits.
    eng.generate([prompts[-1]], GREEDY)
    res = eng.generate(prompts, GREEDY)
    pairs = enumerate(zip(res, reference, strict=True))
    mismatches = [i for i, (r, ref) in pairs if r.token_ids != ref]
    assert mismatches == []
    stats = eng.stats()
    if knobs.get("enable_prefix_caching", True):
        assert stats.prefix_cache_hit_tokens > 0
    if "num_kv_blocks" in knobs:
        assert stats.num_preemptions > 0
    assert stats.num_free_blocks == stats.num_total_blocks  # everything freed


def test_seeded_sampling_repeats_and_differs_by_seed():
    path = resolve_model("demo-small")
    eng = LLMEngine(EngineConfig(model=path))
    p = list(range(20, 60))

    def run(seed):
        sp = SamplingParams(
            temperature=1.0, top_p=0.9, top_k=50, seed=seed, max_tokens=16, ignore_eos=True
        )
        return [r.token_ids for r in eng.generate([p, p[:10]], [sp, sp])]

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_logprobs_and_stop_strings():
    path = resolve_model("demo-small")
    eng = LLMEngine(EngineConfig(model=path))
    p = list(range(20, 60))
    full = eng.generate(
        [p], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=3)
    )[0]
    assert len(full.logprobs) == 20
    lp = full.logprobs[0]
    assert lp.token_id == full.token_ids[0] and lp.top[0][0] == lp.token_id  # greedy = top-1
    assert math.isclose(lp.logprob, lp.top[0][1], rel_tol=1e-5) and lp.logprob <= 0
    assert len(full.text) > 4
    stop = full.text[3:5]
    cut = eng.generate(
        [p], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[stop])
    )[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(stop)]


@pytest.mark.parametrize(
    "prompt,params,field",
    [
        ([], SamplingParams(), "prompt"),
        ([5, 99999], SamplingParams(), "vocabulary"),
        (list(range(10, 2100)), SamplingParams(), "context length"),
        ([5, 6], SamplingParams(max_tokens=5000), "max_tokens"),
    ],
)
def test_bad_input_is_refused_and_others_keep_running(prompt, params, field):
    eng = LLMEngine(EngineConfig(model=resolve_model("demo-small")))
    good = eng.add_request("good", [10, 11, 12], SamplingParams(temperature=0, max_tokens=3))
    with pytest.raises(ValueError, match=field):
        eng.add_request("bad", prompt, params)
    outs = []
    while eng.has_unfinished():
        outs += eng.step()
    assert [o.request_id for o in outs if o.finished] == [good]


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": float("nan")}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"top_k": -5}, "top_k"),
        ({"logprobs": 50}, "logprobs"),
    ],
)
def test_sampling_params_validation_names_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)
