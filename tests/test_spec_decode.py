"""Speculative decoding: identical greedy output with each proposer, the rejection-sampling rule
keeps the target distribution (chi-square, fixed seed), rollback frees exactly the draft-only
blocks."""

import pytest
import torch

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.models.demo import resolve_model
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Request
from engine.spec_decode import SpeculativeConfig, ngram_propose, verify


def test_ngram_propose_most_recent_longest_match():
    toks = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3]
    assert ngram_propose(toks, 2, max_n=3) == [
        7,
        8,
    ]  # most recent earlier "1 2 3" is followed by 7 8
    assert ngram_propose([4, 5, 6], 3) == []
    assert ngram_propose([5, 6, 5], 3, max_n=1) == [6, 5]


def test_verify_greedy_accepts_longest_matching_prefix_plus_one():
    logits = torch.full((4, 10), -5.0)
    for row, tok in enumerate([3, 4, 7, 2]):
        logits[row, tok] = 5.0
    assert verify(logits, [3, 4, 5], None, None) == [3, 4, 7]  # third draft wrong -> target's 7
    assert verify(logits, [3, 4, 7], None, None) == [3, 4, 7, 2]  # all accepted + bonus
    assert verify(logits, [1, 4, 7], None, None) == [3]


def test_rejection_sampling_preserves_target_distribution():
    # Tiny vocabulary; the first emitted token must follow p regardless of the draft.
    torch.manual_seed(0)
    logits = torch.tensor([[1.0, 0.2, -0.5, 0.7, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    p = torch.softmax(logits[0], -1)
    g = torch.Generator().manual_seed(1234)
    n = 20000
    for draft in (3, 2):  # a likely and an unlikely draft
        counts = torch.zeros(5)
        for _ in range(n):
            out = verify(logits, [draft], lambda row: torch.softmax(row, -1), g)
            counts[out[0]] += 1
        expected = p * n
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < 18.47, (draft, chi2, counts.tolist())  # df=4, p=0.001


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_rejection_sampling_on_cuda_generator():
    # The sampler's generators live on the engine's device; the uniform draw must come from there.
    logits = torch.tensor([[1.0, 0.2, -0.5, 0.7, 0.0]] * 3, device="cuda")
    runs = []
    for _ in range(2):
        g = torch.Generator(device="cuda").manual_seed(7)
        runs.append(
            [verify(logits, [3, 0], lambda row: torch.softmax(row, -1), g) for _ in range(50)]
        )
    assert runs[0] == runs[1] and all(1 <= len(o) <= 3 for o in runs[0])


def test_rollback_frees_draft_only_blocks():
    bm = BlockManager(num_blocks=8, block_size=4)
    s = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=128)
    r = Request("a", [10, 11, 12, 13, 14, 15], SamplingParams(max_tokens=10), 4)
    s.add(r)
    out, reqs = s.schedule()
    s.update(reqs, out.num_scheduled_tokens, [[16]])  # 7 tokens, 6 computed, 2 blocks
    assert r.block_table == [0, 1]
    r.spec_token_ids = [17, 18, 19, 20]  # decode token + 4 drafts -> positions 6..10 -> 3 blocks
    out, reqs = s.schedule()
    assert out.num_scheduled_tokens == [5] and r.block_table == [0, 1, 2]
    s.update(reqs, [5], [[99]], num_rejected=[4])  # all drafts rejected; 99 is the target's token
    assert r.num_computed_tokens == 7 and r.token_ids[-2:] == [16, 99]
    assert r.block_table == [0, 1] and bm.blocks[2].ref_cnt == 0  # the draft-only block came back
    assert bm.num_free_blocks == 6


def test_speculative_config_errors_name_fields():
    with pytest.raises(ValueError, match="method"):
        SpeculativeConfig.from_dict({"method": "medusa"})
    with pytest.raises(ValueError, match="num_tokens"):
        SpeculativeConfig.from_dict({"method": "ngram", "num_tokens": 0})
    with pytest.raises(ValueError, match="speculative.model"):
        SpeculativeConfig.from_dict({"method": "draft_model"})


def repetitive_prompts():
    g = torch.Generator().manual_seed(0)
    base = [torch.randint(10, 4000, (n,), generator=g).tolist() for n in (5, 30, 90, 200)]
    shared = base[2]
    return [b * 3 for b in base] + [shared + [7, 8, 9], shared + [5] * 20]


@pytest.fixture(scope="module")
def greedy_reference():
    eng = LLMEngine(EngineConfig(model=resolve_model("demo-small")))
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    return [r.token_ids for r in eng.generate(repetitive_prompts(), sp)]


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
@pytest.mark.parametrize(
    "knobs",
    [dict(), dict(num_kv_blocks=48, max_num_batched_tokens=48)],
    ids=["default", "chunked+preempt"],
)
def test_greedy_identical_with_speculation(method, knobs, greedy_reference, tmp_path_factory):
    spec = {"method": method, "num_tokens": 4, "max_batch_size": 64}
    if method == "draft_model":
        from tiny_models import tiny_llama  # a different, smaller model: real rejections

        spec["model"] = tiny_llama(tmp_path_factory.mktemp("draft") / "m")
    eng = LLMEngine(EngineConfig(model=resolve_model("demo-small"), speculative=spec, **knobs))
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    prompts = repetitive_prompts()
    eng.generate(prompts[-2:], sp)  # warm the prefix cache
    res = eng.generate(prompts, sp)
    assert [r.token_ids for r in res] == greedy_reference
    st = eng.stats()
    assert st.spec_draft_tokens > 0
    assert st.prefix_cache_hit_tokens > 0
    assert st.num_free_blocks == st.num_total_blocks
    if knobs:
        assert st.num_preemptions > 0


def test_backoff_for_large_batches():
    spec = {"method": "ngram", "num_tokens": 4, "max_batch_size": 2}
    eng = LLMEngine(EngineConfig(model=resolve_model("demo-small"), speculative=spec))
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    eng.generate(repetitive_prompts(), sp)  # 6 running > 2: no drafts while all run together
    first = eng.stats().spec_draft_tokens
    eng.generate(repetitive_prompts()[:1], sp)
    assert eng.stats().spec_draft_tokens >= first
    assert first <= 8 * 2  # only the tail of the run (<= 2 left) could speculate


def test_draft_model_under_block_pressure_finishes_every_request():
    # So few blocks that draft slots often can't be allocated (and requests are preempted).
    spec = {"method": "draft_model", "model": "demo-small", "num_tokens": 3}
    eng = LLMEngine(
        EngineConfig(
            model=resolve_model("demo-small"), num_kv_blocks=16, max_num_seqs=8, speculative=spec
        )
    )
    prompts = [list(range(100, 170)) + [i] for i in range(10)]
    params = [
        SamplingParams(temperature=0.8 if i % 2 else 0.0, seed=i, max_tokens=40, ignore_eos=True)
        for i in range(10)
    ]
    res = eng.generate(prompts, params)
    assert [len(r.token_ids) for r in res] == [40] * 10
    st = eng.stats()
    assert st.num_preemptions > 0 and st.num_free_blocks == st.num_total_blocks


def test_backed_off_draft_skips_steps_and_catches_up():
    """A request speculates alone, is backed off while three more run (the draft runs no forward
    then), and resumes: the draft's first forward catches its KV up over the tokens decoded
    meanwhile. Draft = target, so correct catch-up KV shows as near-total acceptance."""
    path = resolve_model("demo-small")
    spec = {"method": "draft_model", "model": path, "num_tokens": 3, "max_batch_size": 2}
    eng = LLMEngine(EngineConfig(model=path, speculative=spec))
    calls: list[tuple[int, list[int], list[int]]] = []
    real_forward = eng.draft_runner.forward

    def recording_forward(out, token_ids):
        calls.append(
            (len(eng.scheduler.running), out.num_computed_tokens, out.num_scheduled_tokens)
        )
        return real_forward(out, token_ids)

    eng.draft_runner.forward = recording_forward
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(10, 4000, (n,), generator=g).tolist() for n in (40, 9, 17, 25)]
    long = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    short = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    got: dict[str, list[int]] = {}

    def run(until):
        while eng.has_unfinished() and not until():
            for o in eng.step():
                got.setdefault(o.request_id, []).extend(o.new_token_ids)

    eng.add_request("a", prompts[0], long)
    run(lambda: len(got.get("a", [])) >= 8)
    assert calls and eng.stats().spec_draft_tokens > 0  # "a" speculated alone
    n_before = len(calls)
    for i in (1, 2, 3):
        eng.add_request(f"b{i}", prompts[i], short)
    run(lambda: False)

    ref = LLMEngine(EngineConfig(model=path))
    want = [r.token_ids for r in ref.generate(prompts, [long, short, short, short])]
    assert [got[rid] for rid in ("a", "b1", "b2", "b3")] == want
    assert all(n_running <= 2 for n_running, _, _ in calls)  # backed off: no draft forward
    # After the back-off, one forward covered the tokens "a" decoded while the draft slept.
    catch_ups = [
        (c, n) for _, comp, sched in calls[n_before:] for c, n in zip(comp, sched, strict=True)
    ]
    assert any(c > 0 and n > 4 for c, n in catch_ups)
    st = eng.stats()
    assert st.spec_accepted_tokens >= 0.9 * st.spec_draft_tokens
    assert st.num_free_blocks == st.num_total_blocks


def test_back_off_counts_waiting_requests():
    """A burst admitted over several steps: the first running requests must not speculate while
    the rest of the (large) batch is still queued."""
    from engine.spec_decode import SpecController

    cfg = SpeculativeConfig.from_dict({"method": "ngram", "num_tokens": 2, "max_batch_size": 4})
    ctl = SpecController(cfg)
    running = []
    for i in range(3):
        r = Request(f"r{i}", [1, 2, 3, 4], SamplingParams(temperature=0), block_size=4)
        r.num_computed_tokens = r.num_tokens - 1  # decoding: one token to compute
        running.append(r)
    assert [r.request_id for r in ctl.eligible(running)] == ["r0", "r1", "r2"]
    assert [r.request_id for r in ctl.eligible(running, num_waiting=1)] == ["r0", "r1", "r2"]
    assert ctl.eligible(running, num_waiting=2) == []  # 3 running + 2 queued > 4
