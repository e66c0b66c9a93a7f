"""Exact budgets, chunking, FCFS order and preemption choices of the scheduler."""

from engine.block_manager import BlockManager
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Request

BS = 4


def make(num_blocks=16, budget=16, max_seqs=8, chunked=True):
    bm = BlockManager(num_blocks, BS)
    return Scheduler(bm, max_seqs, budget, max_model_len=256, enable_chunked_prefill=chunked), bm


def req(rid, n, max_tokens=8):
    return Request(rid, list(range(100, 100 + n)), SamplingParams(max_tokens=max_tokens), BS)


def run_step(s, token=7):
    out, reqs = s.schedule()
    sampled = [[token] if smp else [] for smp in out.sample]
    s.update(reqs, out.num_scheduled_tokens, sampled)
    return out


def test_chunked_prefill_under_budget_then_mixed_decode():
    s, _ = make(budget=10)
    a, b = req("a", 6), req("b", 12)
    s.add(a)
    s.add(b)
    out = run_step(s)
    assert (out.req_ids, out.num_scheduled_tokens, out.sample) == (
        ["a", "b"],
        [6, 4],
        [True, False],
    )
    out = run_step(s)  # a decodes (1), b continues its prompt (8 of remaining 8)
    assert (out.req_ids, out.num_scheduled_tokens, out.sample) == (["a", "b"], [1, 8], [True, True])
    assert a.num_output_tokens == 2 and b.num_output_tokens == 1
    out = run_step(s)
    assert out.num_scheduled_tokens == [1, 1]


def test_no_chunking_waits_for_budget():
    s, _ = make(budget=10, chunked=False)
    s.add(req("a", 6))
    s.add(req("b", 12))
    out = run_step(s)
    assert out.req_ids == ["a"]  # b (12 tokens) never fits in a 10-token budget unchunked


def test_max_num_seqs_caps_running():
    s, _ = make(budget=64, max_seqs=2)
    for i in range(3):
        s.add(req(f"r{i}", 4))
    out = run_step(s)
    assert out.req_ids == ["r0", "r1"] and len(s.waiting) == 1


def test_preempts_newest_when_blocks_run_out_and_recomputes():
    s, bm = make(num_blocks=4, budget=64)
    a, b = req("a", 8, max_tokens=8), req("b", 7, max_tokens=8)
    s.add(a)
    s.add(b)
    out = run_step(s)  # a: 2 blocks, b: 2 blocks -> pool full; both got a first token
    assert out.req_ids == ["a", "b"] and bm.num_free_blocks == 0
    out = run_step(s)  # a needs a 3rd block (token 9): b, the newest, is preempted
    assert out.preempted_req_ids == ["b"] and out.req_ids == ["a"]
    assert b.num_computed_tokens == 0 and b.block_table == [] and s.waiting[0] is b
    assert b.num_output_tokens == 1  # its output so far is kept, recomputed later
    steps = 0
    while s.has_unfinished():
        run_step(s)
        steps += 1
        assert steps < 100
    assert a.finish_reason == b.finish_reason == "length"
    assert a.num_output_tokens == b.num_output_tokens == 8
    assert s.num_preemptions >= 1 and bm.num_free_blocks == 4


def test_fcfs_and_stop_token_frees_blocks():
    s, bm = make(budget=64)
    a = Request("a", [1, 2, 3], SamplingParams(max_tokens=8, stop_token_ids=[7]), BS)
    s.add(a)
    run_step(s, token=7)
    assert a.finish_reason == "stop" and not s.has_unfinished()
    assert bm.num_free_blocks == 16


def test_abort_frees_blocks_at_once():
    s, bm = make(budget=64)
    a = req("a", 10)
    s.add(a)
    run_step(s)
    assert bm.num_free_blocks == 16 - 3
    s.abort(a)
    assert bm.num_free_blocks == 16 and a.finish_reason == "abort" and not s.has_unfinished()
