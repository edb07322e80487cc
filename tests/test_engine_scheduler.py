"""The HF engine's scheduler and block pool on token ids alone: no torch, no model.

Admission by free blocks, preemption order, prefix-cache hits, sharing by reference count, LRU eviction under
pressure and the release of blocks on finish, abort and disconnect (the engine releases through the same call).
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

from vicuna.serve.engine.scheduler import BlockPool, Request, Scheduler, block_key

BS = 4  # tokens per block


def req(tokens, adapter=None, out=(), **kw) -> Request:
    return Request(list(tokens), SimpleNamespace(output_ids=list(out)), adapter=adapter, **kw)


def sched(blocks=16, *, batch=8, prefill=1000, caching=True) -> Scheduler:
    return Scheduler(blocks, BS, max_batch_size=batch, max_prefill_tokens=prefill, prefix_caching=caching)


def run(s: Scheduler) -> list[Request]:
    """Admit, and mark every admitted request's context as computed (what a prefill does)."""
    group, cancelled = s.admit()
    assert not cancelled
    for r in group:
        r.length = r.context_length
    s.running_added(group)
    return group


def finish(s: Scheduler, r: Request) -> None:
    r.done = True
    s.release(r)
    s.drop_finished()


def test_the_scheduler_needs_no_torch():
    import subprocess

    code = "import sys, vicuna.serve.engine.scheduler; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_admission_by_free_blocks_in_arrival_order():
    s = sched(blocks=6, caching=False)
    a, b, c = req(range(7)), req(range(100, 117)), req(range(200, 202))  # 2, 5 and 1 blocks (+ next slot)
    s.waiting.extend([a, b, c])
    assert run(s) == [a] and s.pool.num_free == 4  # b needs 5 of the 4 left: nothing of it is taken...
    assert list(s.waiting) == [b, c]  # ...and c, which would fit, does not overtake it (b is never starved)
    finish(s, a)
    assert run(s) == [b, c] and s.pool.num_free == 0
    assert [len(r.blocks) for r in (b, c)] == [5, 1]


def test_the_prefill_budget_counts_new_tokens_and_padding():
    s = sched(blocks=64, prefill=24, caching=False)
    rs = [req(range(i * 100, i * 100 + 10)) for i in range(4)]
    s.waiting.extend(rs)
    assert run(s) == rs[:2]  # 2 rows x 10 tokens fit 24; a third would make 30
    assert len(s.waiting) == 2 and s.max_batch_size == 8


def test_preemption_takes_the_latest_admitted_and_queues_it_first():
    s = sched(blocks=4, caching=False)
    a, b = req(range(3)), req(range(10, 13))  # 3 tokens + next slot = 1 block each
    s.waiting.extend([a, b])
    run(s)
    later = req(range(20, 22))
    s.waiting.append(later)
    for r in (a, b):
        r.length = 4  # both rows' blocks are full: each needs one more
    assert s.reserve_decode_slots() == [] and s.pool.num_free == 0
    for r in (a, b):
        r.length = 8
    assert s.reserve_decode_slots() == [b]  # a gets the block b freed; b (admitted last) goes back...
    assert list(s.waiting) == [b, later] and b.blocks == [] and b.length == 0  # ...first in the queue
    assert len(a.blocks) == 3 and s.running == [a] and s.preemptions == 1


def test_a_shared_prefix_is_found_block_by_block_and_shared_by_reference():
    s = sched(blocks=32)
    system = list(range(1000, 1010))  # 10 tokens: 2 full blocks + 2 tokens
    a = req(system + [1, 2, 3])
    s.waiting.append(a)
    run(s)
    assert a.cached == 0 and s.prefix_hits == 0 and s.prefix_queries == 13
    b = req(system + [7, 8, 9, 10, 11])
    s.waiting.append(b)
    run(s)
    assert b.cached == 2 * BS and b.blocks[:2] == a.blocks[:2]  # the 2 full system blocks, shared
    assert b.blocks[2] != a.blocks[2]  # the partial block is never shared
    assert [s.pool.refs(x) for x in a.blocks[:2]] == [2, 2]
    assert s.prefix_hits == 8 and s.prefix_queries == 13 + 15
    finish(s, a)
    assert [s.pool.refs(x) for x in b.blocks[:2]] == [1, 1]  # b still holds them


def test_the_last_token_is_always_computed_and_adapters_do_not_share():
    s = sched(blocks=32)
    a = req(range(8))  # exactly 2 blocks
    s.waiting.append(a)
    run(s)
    finish(s, a)
    same = req(range(8))
    s.waiting.append(same)
    run(s)
    assert same.cached == BS  # the second block holds the last token, whose logits are needed
    other = req(range(8), adapter="lora-a")
    s.waiting.append(other)
    run(s)
    assert other.cached == 0  # K/V computed by another adapter is another prefix
    assert block_key(b"", [1, 2], None) != block_key(b"", [1, 2], "lora-a") != block_key(b"x", [1, 2], "lora-a")


def test_decoded_tokens_fill_blocks_that_a_later_turn_reuses():
    """A chat's next turn starts with the previous turn's prompt and answer: both are cached."""
    s = sched(blocks=32)
    a = req(range(6))
    s.waiting.append(a)
    run(s)
    for t in range(100, 106):  # six decode steps: the answer
        a.seq.output_ids.append(t)
        s.reserve_decode_slots()
        a.length += 1
        s.computed(a)
    finish(s, a)
    turn2 = req(list(range(6)) + list(range(100, 105)) + [7, 8, 9])  # 11 tokens of history + 3 new
    s.waiting.append(turn2)
    run(s)
    assert turn2.cached == 8  # the 2 full blocks of history (the third was still partial)


def test_finished_prefixes_are_kept_and_evicted_only_under_pressure_least_recent_first():
    s = sched(blocks=6)
    a, b = req(range(9)), req(range(50, 59))  # 3 blocks each, 2 of them full (keyed)
    s.waiting.append(a)
    run(s)
    finish(s, a)
    s.waiting.append(b)
    run(s)
    finish(s, b)
    assert s.pool.num_free == 6 and s.pool.num_cached == 4  # all free, and 4 blocks still hold prefixes
    filler = req(range(200, 203))  # 1 block: taken from the plain (unkeyed) free blocks first
    s.waiting.append(filler)
    run(s)
    assert s.pool.evictions == 0 and s.pool.num_cached == 4
    big = req(range(300, 307))  # 2 blocks, 1 plain left: one cached block is evicted, the least recent:
    s.waiting.append(big)
    run(s)
    assert s.pool.evictions == 1
    a_hit, b_hit = s._match(req(range(9)), 9), s._match(req(range(50, 59)), 9)
    assert len(a_hit) == 1 and len(b_hit) == 2  # a's tail block went (a was released first), b's prefix stays


def test_the_tail_of_a_sequence_is_evicted_before_its_head():
    pool = BlockPool(4)
    blocks = pool.allocate(3)
    for i, b in enumerate(blocks):
        pool.register(b, bytes([i]))
    pool.free(blocks)
    pool.allocate(1 + 1)  # the one plain block, then one eviction
    assert pool.match([bytes([0]), bytes([1]), bytes([2])]) == blocks[:2]  # the last block went


def test_blocks_come_back_on_finish_abort_and_disconnect():
    s = sched(blocks=12)
    shared = list(range(500, 508))
    rs = [req(shared + [i, i + 1]) for i in range(3)]
    s.waiting.extend(rs)
    run(s)
    finish(s, rs[0])  # finished
    rs[1].cancelled = True  # the client went away: the engine aborts it through the same release
    finish(s, rs[1])
    gone = req(range(700, 703))
    s.waiting.append(gone)
    gone.cancelled = True  # disconnected while waiting: handed back as cancelled, never admitted
    group, cancelled = s.admit()
    assert group == [] and cancelled == [gone] and gone.blocks == []
    finish(s, rs[2])
    assert s.pool.num_free == s.pool.num_blocks and all(s.pool.refs(b) == 0 for b in range(1, 13))


def test_prefix_caching_off_shares_nothing_and_requests_may_opt_out():
    s = sched(blocks=32, caching=False)
    for _ in range(2):
        s.waiting.append(req(range(12)))
        r = run(s)[0]
    assert r.cached == 0 and s.prefix_queries == 0 and s.pool.num_cached == 0
    s = sched(blocks=32)
    s.waiting.append(req(range(12)))
    run(s)
    opt_out = req(range(12), cache_prefix=False)  # e.g. a request that needs every prompt position's logits
    s.waiting.append(opt_out)
    run(s)
    assert opt_out.cached == 0 and s.prefix_queries == 12
