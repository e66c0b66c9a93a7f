"""Greedy outputs of our engine are token-for-token those of transformers' generate(); seeded
sampling repeats; bad input is refused with a ValueError naming the field while others keep
running."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.models.demo import resolve_model
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


@pytest.fixture(scope="module")
def family(request):
    return request.param


@pytest.fixture(scope="module")
def model_path(family, tmp_path_factory):
    if family == "demo-small":
        return resolve_model("demo-small")
    import tiny_models

    kw = {}
    if family == "llama3-rope":  # Llama 3.1's rope scaling: a different frequency per band
        family, kw["rope_parameters"] = "llama", LLAMA3_ROPE
    make = getattr(tiny_models, f"tiny_{family}")
    return make(tmp_path_factory.mktemp(family) / "m", max_position_embeddings=1024, **kw)


LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


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

KNOBS = {
    "default": dict(),  # big budget, prefix caching on
    "chunked": dict(max_num_batched_tokens=128),  # long prompts span several steps
    "preempt": dict(num_kv_blocks=60, max_num_batched_tokens=256),  # small pool: preemption
    "no-cache-no-chunk": dict(
        enable_prefix_caching=False, enable_chunked_prefill=False, max_num_batched_tokens=1024
    ),
    # decode steps on 1 torch thread, steps with >= 64 prompt tokens on 2 (chunks of 128)
    "decode-threads": dict(max_num_batched_tokens=128, num_threads=2, decode_num_threads=1),
}
# Our own model code (model_impl "fleetlm", the default for these families) on every knob for the
# demo Llama and Qwen2 (biases); Mistral and Qwen3 (q/k norms, head_dim apart from hidden/heads)
# on the knobs that reach every attention case; transformers' modules (the fallback for other
# architectures) on each family too.
CASES = [
    *[(f, k, "fleetlm") for f in ("demo-small", "qwen2") for k in KNOBS],
    *[(f, k, "fleetlm") for f in ("mistral", "qwen3") for k in ("chunked", "preempt")],
    ("llama3-rope", "chunked", "fleetlm"),
    *[(f, "preempt", "transformers") for f in ("demo-small", "qwen2", "qwen3")],
    ("demo-small", "chunked", "transformers"),
]


@pytest.mark.parametrize("family,knob,impl", CASES, indirect=["family"])
def test_greedy_matches_hf_generate(model_path, reference, knob, impl):
    knobs = KNOBS[knob]
    threads = torch.get_num_threads()
    try:
        eng = LLMEngine(EngineConfig(model=model_path, model_impl=impl, **knobs))
        assert eng.runner.own == (impl == "fleetlm")
        prompts = mixed_prompts()
        # Warm the prefix cache with the shared prefix so the batch sees real hits.
        eng.generate([prompts[-1]], GREEDY)
        res = eng.generate(prompts, GREEDY)
    finally:
        torch.set_num_threads(threads)  # num_threads knobs set the process's torch threads
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


def test_one_requests_failure_ends_it_alone():
    """A seed torch refuses (set past validation) and a detokenizer that raises end their own
    requests with finish_reason "error" and a message; the others in the same steps finish."""
    eng = LLMEngine(EngineConfig(model=resolve_model("demo-small")))
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    bad_seed = SamplingParams(temperature=1.0, max_tokens=6, ignore_eos=True, seed=1)
    eng.add_request("ok-1", [10, 11, 12], greedy)
    eng.add_request("seed", [10, 11, 12, 13], bad_seed)
    bad_seed.seed = 2**80  # past validation: the request's own data breaks its sampling
    eng.add_request("detok", [20, 21], greedy)
    eng.add_request("ok-2", list(range(30, 70)), greedy)

    def broken(*args, **kwargs):
        raise RuntimeError("detokenizer broke")

    eng.detoks["detok"].add = broken
    outs = []
    while eng.has_unfinished():
        outs += eng.step()
    final = {o.request_id: o for o in outs if o.finished}
    assert final["seed"].finish_reason == "error" and "seed" not in final["seed"].new_token_ids
    assert "sampling failed" in final["seed"].error
    assert final["detok"].finish_reason == "error" and "detokenizer broke" in final["detok"].error
    for rid in ("ok-1", "ok-2"):
        assert final[rid].finish_reason == "length" and final[rid].num_output_tokens == 6
    stats = eng.stats()
    assert stats.num_free_blocks == stats.num_total_blocks and not eng.requests


def test_batched_sampler_rules():
    """Batched rules against their definitions: top-k keeps k tokens, top-p the smallest prefix
    reaching p, min-p drops below min_p * max; penalties; seeded rows repeat."""
    from engine.sampler import Sampler
    from engine.sequence import Request

    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    s = Sampler(torch.device("cpu"))
    ps = [
        SamplingParams(temperature=1.0, top_k=5),
        SamplingParams(temperature=0.5, top_p=0.6),
        SamplingParams(temperature=1.0, min_p=0.2),
        SamplingParams(temperature=1.0),
    ]
    probs = s.probs(logits, ps)
    assert int((probs[0] > 0).sum()) == 5
    assert set(probs[0].nonzero().flatten().tolist()) == set(logits[0].topk(5).indices.tolist())
    p1 = torch.softmax(logits[1] / 0.5, -1)
    sp, _ = p1.sort(descending=True)
    keep = int(((sp.cumsum(0) - sp) <= 0.6).sum())
    assert int((probs[1] > 0).sum()) == keep
    p2 = torch.softmax(logits[2], -1)
    assert torch.equal(probs[2] > 0, p2 >= 0.2 * p2.max())
    torch.testing.assert_close(probs[3], torch.softmax(logits[3], -1))
    torch.testing.assert_close(probs.sum(-1), torch.ones(4))

    def req(rid, params, tokens):
        r = Request(rid, tokens[:2], params, 16)
        r.token_ids = list(tokens)
        return r

    pen = SamplingParams(temperature=0, repetition_penalty=2.0, frequency_penalty=0.5)
    r = req("p", pen, [3, 4, 7, 7])  # prompt [3, 4], output [7, 7]
    row = torch.zeros(1, 50)
    row[0, 3], row[0, 7], row[0, 9] = 2.0, -1.0, 0.5
    out = s._apply_penalties(row, [0], [r])
    assert out[0, 3] == 1.0 and out[0, 7] == -2.0 - 1.0 and out[0, 9] == 0.5
    # A seeded row draws from its own generator: the same whatever its neighbours and order.
    flat = torch.zeros(3, 50)
    batch = [req(f"s{i}", SamplingParams(temperature=1.0, seed=i), [1, 2]) for i in range(3)]
    batch[1].params.seed = None
    a, _ = Sampler(torch.device("cpu")).sample(flat.clone(), batch)
    again = [req(f"t{i}", SamplingParams(temperature=1.0, seed=i), [1, 2]) for i in (2, 0)]
    b, _ = Sampler(torch.device("cpu"), seed=99).sample(flat[:2].clone(), again)
    assert [a[2], a[0]] == b


def test_finished_requests_are_not_retained():
    """Once the engine has finished a request (length, stop string, abort, error), nothing in it
    keeps the Request alive: in a long-lived process (a replica, a benchmark running round after
    round) retained requests would pile up, and every GC pass would walk them. Reference counts
    alone must free them (the collector is off while we look)."""
    import gc
    import weakref

    eng = LLMEngine(EngineConfig(model=resolve_model("demo-small"), num_kv_blocks=64))
    kinds = [
        SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
        SamplingParams(temperature=1.0, seed=7, max_tokens=6, ignore_eos=True),
        SamplingParams(temperature=0.8, top_k=5, max_tokens=4, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=0, max_tokens=8, stop=["a", "e", " "]),
    ]
    gc.collect()
    gc.disable()
    try:
        refs = []
        for i, p in enumerate(kinds * 2):
            rid = eng.add_request(None, list(range(10 + i, 40 + i)), p)
            refs.append(weakref.ref(eng.requests[rid]))
        aborted = eng.add_request(None, list(range(50, 90)), SamplingParams(max_tokens=50))
        refs.append(weakref.ref(eng.requests[aborted]))
        eng.step()
        assert eng.abort(aborted)
        while eng.has_unfinished():
            eng.step()
        eng.step()  # the scheduler reports the last finished ids on the next schedule
        alive = [r() for r in refs if r() is not None]
        assert not alive, [(r, [type(o).__name__ for o in gc.get_referrers(r)]) for r in alive]
    finally:
        gc.enable()
    assert eng.stats().num_free_blocks == eng.stats().num_total_blocks
