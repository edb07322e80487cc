"""Who runs next and which KV blocks each sequence holds: queues, admission, preemption, the prefix cache.

Pure bookkeeping over token ids and block numbers — no torch, no model — so every
rule here is unit-tested without loading anything (``tests/test_engine_scheduler.py``).
:class:`vicuna.serve.engine.hf.HFEngine` asks it what to run each iteration and tells it
what ran; :class:`vicuna.serve.engine.runner.Runner` does the forwards.

The rules (vLLM's, see docs/serving.md):

- **Admission by free blocks.** A waiting request is admitted, in arrival order, when the
  blocks for its context plus the slot of its next token are free (blocks already in the
  prefix cache count as its own) and its new tokens fit the prefill budget; a request
  that does not fit stops admission (no overtaking: a long prompt is never starved).
- **Growth and preemption.** A running row takes one block each time it crosses a block
  boundary; when none is free, the most recently admitted row is preempted: its blocks
  are released and it goes back to the front of the queue, to be recomputed (its prompt
  and what it has generated) when readmitted. No newcomer is admitted in a step that
  preempted.
- **Automatic prefix caching.** Every *full* block is keyed by a hash chained over the
  token ids from the start of the sequence (and the LoRA adapter that computed it), so a
  key names one exact prefix. Blocks are shared by reference count; a request whose
  context starts with cached blocks takes them instead of recomputing them (the last
  context token is always computed: its logits give the next token). A block whose last
  holder finishes keeps its key and goes to an LRU pool; it is evicted (its key dropped,
  the block reused) only when no block without a key is free. Partial blocks are never
  shared. A preempted request's blocks go to the same pool, so readmission usually finds
  them.
"""

from __future__ import annotations

import collections
import hashlib
import time
from dataclasses import dataclass, field
from typing import Any


def block_key(parent: bytes, tokens: list[int] | tuple[int, ...], adapter: str | None) -> bytes:
    """The key of a full block: a hash of its parent's key, its tokens and the adapter that computed its K/V.

    blake2b-128, not Python's ``hash``: a collision would hand a request another prefix's K/V, so the key must
    be collision-free in practice (as vLLM's sha256 option), and hashing a block is microseconds.
    """
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(b",".join(str(t).encode() for t in tokens))
    if adapter is not None:
        h.update(b"\0lora:" + adapter.encode())
    return h.digest()


class BlockPool:
    """Blocks ``1..num_blocks`` (block 0 is the padding block, never handed out), reference counted.

    Free blocks without a key are a stack (handed out again first, so on CPU the memory a budget touches
    stays close to the peak in use); free blocks with a key wait in an LRU pool and are evicted, least
    recently released first, only when the stack is empty.
    """

    def __init__(self, num_blocks: int, caching: bool = True):
        self.num_blocks = num_blocks
        self.caching = caching
        self._plain = list(range(num_blocks, 0, -1))  # free, no key
        self._lru: collections.OrderedDict[int, None] = collections.OrderedDict()  # free, keyed; oldest first
        self._refs = [0] * (num_blocks + 1)
        self._key_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}
        self.evictions = 0

    @property
    def num_free(self) -> int:
        return len(self._plain) + len(self._lru)

    @property
    def num_cached(self) -> int:
        """Blocks holding a keyed prefix (in use or free)."""
        return len(self._block_of)

    def allocate(self, n: int) -> list[int] | None:
        """``n`` blocks for new tokens, or None (and nothing taken) when fewer are free."""
        if n > self.num_free:
            return None
        k = min(n, len(self._plain))
        taken = self._plain[len(self._plain) - k:][::-1]
        del self._plain[len(self._plain) - k:]
        while len(taken) < n:  # under pressure: evict the least recently released cached block
            b, _ = self._lru.popitem(last=False)
            del self._block_of[self._key_of.pop(b)]
            self.evictions += 1
            taken.append(b)
        for b in taken:
            self._refs[b] = 1
        return taken

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each block; the last reference sends it to the stack or, keyed, to the LRU.

        The tail is released first, so a sequence's last blocks are evicted before its first ones (a shorter
        prefix stays useful longer).
        """
        for b in reversed(blocks):
            self._refs[b] -= 1
            if self._refs[b] == 0:
                if b in self._key_of:
                    self._lru[b] = None
                else:
                    self._plain.append(b)

    def match(self, keys: list[bytes]) -> list[int]:
        """The cached blocks of the longest prefix of ``keys`` (nothing is taken)."""
        hit = []
        if self.caching:
            for key in keys:
                b = self._block_of.get(key)
                if b is None:
                    break
                hit.append(b)
        return hit

    def free_among(self, blocks: list[int]) -> int:
        """How many of ``blocks`` are free (taking them as hits uses up free blocks)."""
        return sum(self._refs[b] == 0 for b in blocks)

    def share(self, blocks: list[int]) -> None:
        """One more reference to each of ``blocks`` (prefix hits); a free one leaves the LRU pool."""
        for b in blocks:
            if self._refs[b] == 0:
                del self._lru[b]
            self._refs[b] += 1

    def register(self, block: int, key: bytes) -> None:
        """``block`` now holds the full block ``key``; a key already cached elsewhere keeps its first block."""
        if self.caching and key not in self._block_of and block not in self._key_of:
            self._block_of[key] = block
            self._key_of[block] = key

    def refs(self, block: int) -> int:
        return self._refs[block]


@dataclass(eq=False)
class Request:
    """One request's scheduling state (and, for the engine's bridge, where its deltas go)."""

    prompt_ids: list[int]
    seq: Any  # has .output_ids: vicuna.generation.Sequence in the engine
    adapter: str | None = None  # the LoRA adapter serving it (None: the base model)
    cache_prefix: bool = True  # False: prefill every position (a request that needs all prompt positions' logits)
    loop: Any = None
    queue: Any = None
    arrival: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    done: bool = False
    blocks: list[int] = field(default_factory=list)  # the block table: block i holds tokens [i*bs, (i+1)*bs)
    length: int = 0  # tokens of this request in the KV cache
    cached: int = 0  # of them, how many the prefix cache supplied at its last admission
    keys: list[bytes] = field(default_factory=list)  # keys of its first full blocks, as far as computed
    registered: int = 0  # its first blocks known to the prefix cache (hits, or registered after a forward)
    last_token: int = -1  # sampled, not yet in the cache
    logprobs_sent: int = 0
    prompt_logprobs_sent: bool = False
    matcher: Any = None  # structured outputs: a structured.Matcher when the output follows a grammar
    first_token_at: float | None = None

    def context(self) -> list[int]:
        """What a prefill runs: the prompt and, after a preemption, everything generated so far."""
        return self.prompt_ids + list(self.seq.output_ids)

    @property
    def context_length(self) -> int:
        return len(self.prompt_ids) + len(self.seq.output_ids)


class Scheduler:
    """The waiting queue, the running batch and the block pool of one engine."""

    def __init__(self, num_blocks: int, block_size: int, *, max_batch_size: int, max_prefill_tokens: int,
                 prefix_caching: bool = True):
        self.block_size = block_size
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.pool = BlockPool(num_blocks, caching=prefix_caching)
        self.waiting: collections.deque[Request] = collections.deque()  # preempted ones go first
        self.running: list[Request] = []  # in admission order: the last is preempted first
        self.preemptions = 0
        self.prefix_queries = 0  # context tokens of admitted requests that could have been cached
        self.prefix_hits = 0  # of them, supplied by the cache

    @property
    def prefix_caching(self) -> bool:
        return self.pool.caching

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    # ---- each iteration
    def reserve_decode_slots(self) -> list[Request]:
        """Give every running row a slot for its next token; preempt the latest admitted when blocks run out.

        Returns the preempted requests (already back at the front of the queue)."""
        preempted, i = [], 0
        while i < len(self.running):
            r = self.running[i]
            if r.length < len(r.blocks) * self.block_size:
                i += 1
                continue
            block = self.pool.allocate(1)
            if block is not None:
                r.blocks += block
                i += 1
                continue
            victim = self.running.pop()  # may be r itself: then the loop ends
            self.preempt(victim)
            preempted.append(victim)
        return preempted

    def preempt(self, r: Request) -> None:
        """Release ``r``'s blocks and queue it first; its context is recomputed (or found cached) on readmission."""
        self.release(r)
        self.preemptions += 1
        self.waiting.appendleft(r)

    def admit(self) -> tuple[list[Request], list[Request]]:
        """(admitted, cancelled): waiting requests whose blocks are free, in arrival order, within the prefill
        budget (new tokens × rows, padding included), and the cancelled ones met at the head of the queue."""
        group: list[Request] = []
        cancelled: list[Request] = []
        width = 0
        while self.waiting and len(self.running) + len(group) < self.max_batch_size:
            r = self.waiting[0]
            if r.cancelled:
                cancelled.append(self.waiting.popleft())
                continue
            n = r.context_length
            hit = self._match(r, n)
            new = n - len(hit) * self.block_size
            if group and max(width, new) * (len(group) + 1) > self.max_prefill_tokens:
                break
            need = self.blocks_for(n + 1) - len(hit)  # + the slot of its next token
            if need > self.pool.num_free - self.pool.free_among(hit):
                break
            self.waiting.popleft()
            self.pool.share(hit)
            r.blocks = hit + self.pool.allocate(need)
            r.registered, r.cached = len(hit), len(hit) * self.block_size
            if r.cache_prefix and self.prefix_caching:
                self.prefix_queries += n
                self.prefix_hits += r.cached
            group.append(r)
            width = max(width, new)
        return group, cancelled

    def _match(self, r: Request, n: int) -> list[int]:
        """Cached blocks at the start of ``r``'s context (never its last token: its logits are needed)."""
        if not (self.prefix_caching and r.cache_prefix):
            return []
        full = (n - 1) // self.block_size
        if len(r.keys) < full:
            self._extend_keys(r, r.context(), full)
        return self.pool.match(r.keys[:full])

    def _extend_keys(self, r: Request, tokens: list[int], full: int) -> None:
        bs = self.block_size
        while len(r.keys) < full:
            i = len(r.keys)
            r.keys.append(block_key(r.keys[-1] if r.keys else b"", tokens[i * bs:(i + 1) * bs], r.adapter))

    def running_added(self, group: list[Request]) -> None:
        """``group`` was prefilled (their ``length`` set): they join the running batch."""
        self.running += group
        for r in group:
            self.computed(r)

    def computed(self, r: Request) -> None:
        """``r``'s KV now holds ``r.length`` tokens: key the blocks that became full, so others can share them."""
        if not (self.prefix_caching and r.cache_prefix) or r.done:
            return
        full = r.length // self.block_size
        if r.registered >= full:
            return
        if len(r.keys) < full:
            self._extend_keys(r, r.context(), full)
        for i in range(r.registered, full):
            self.pool.register(r.blocks[i], r.keys[i])
        r.registered = full

    def release(self, r: Request) -> None:
        """Give back ``r``'s blocks (finished, aborted, failed or preempted); keyed ones stay cached."""
        self.pool.free(r.blocks)
        r.blocks = []
        r.length = r.cached = r.registered = 0

    def drop_finished(self) -> None:
        self.running = [r for r in self.running if not r.done]

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)
