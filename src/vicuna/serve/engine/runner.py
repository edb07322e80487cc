"""The model side of the HF engine: the model and its paged KV cache; prefill, decode, sample, embed.

It runs what the scheduler (:mod:`vicuna.serve.engine.scheduler`) chose, on the rows it
is given, and knows nothing of queues or threads. Each row gets its true ``position_ids``
and a mask over its own tokens only, so a request's output does not depend on who else is
in the batch (float32: exactly; see docs/serving.md).

Seams for what other parts add on top (one function each, so they stay small):

- :meth:`Runner.sample` samples every row of a batch from its logits — the one place a
  per-row constraint on the logits (a token bitmask) belongs, just before sampling;
- :meth:`Runner.prefill` computes the last position's logits (``logits_to_keep=1``); a
  request that needs every prompt position's logits prefills with ``logits_to_keep=0``
  and is admitted with ``cache_prefix=False`` so the positions it needs are computed;
- :meth:`Runner._forward` is the only call into the model.

Many LoRA adapters on one base: rows of different adapters (and of the base) run in one
forward through peft's mixed-batch inference (``adapter_names``, one entry per row): each
LoRA layer computes the base projection for the whole batch once and adds each adapter's
low-rank update to its own rows. Why peft's and not a batched LoRA matmul of our own
(S-LoRA/punica style): peft already handles every adapter layout it can load (ranks,
alphas, rsLoRA, target modules) with the same code that trains them, one base stays in
memory, and on CPU the per-adapter gather it does costs little next to the base matmuls;
a fused kernel pays off on GPUs at dozens of adapters, where the vLLM backend has one.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ...errors import InvalidRequest, ServeError
from ...generation import GenerationError, SamplingParams
from .kv import KVPlan, PagedKVCache

log = logging.getLogger(__name__)


def _plain_greedy(p: SamplingParams) -> bool:
    """Rows the batched argmax serves without calling the sampler."""
    return p.greedy and p.logprobs is None and p.repetition_penalty == 1.0 and not (
        p.presence_penalty or p.frequency_penalty)


def non_finite_error() -> ServeError:
    """What a row whose scores turned inf/NaN fails with (it fails alone; the batch goes on)."""
    return ServeError("the model produced non-finite scores (inf/NaN) for this request; its generation was stopped",
                      status=500)


class Runner:
    """Forwards over a paged KV cache. Rows are :class:`vicuna.serve.engine.scheduler.Request` objects."""

    def __init__(self, model, plan: KVPlan):
        self.model = model
        self.base_adapter = "__base__"  # what peft calls rows without an adapter of their own
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.plan = plan
        self.kv = PagedKVCache(plan, self.dtype, self.device)
        attn = getattr(model.config, "_attn_implementation", "sdpa")
        if attn not in ("sdpa", "eager"):
            # We pass our own 4-D mask, which flash/flex kernels do not take.
            log.warning("attention %r does not take a 4-D padding mask; the HF engine switches to sdpa "
                        "(use --backend vllm for flash attention)", attn)
            model.set_attn_implementation("sdpa")
            attn = "sdpa"
        self._float_mask = attn == "eager"  # eager adds the mask; sdpa takes a boolean one

    def set_model(self, model, base_adapter: str) -> None:
        """The model with LoRA adapters loaded (or removed); ``base_adapter``: what rows of the served base use."""
        self.model = model
        self.base_adapter = base_adapter

    def _adapter_kwargs(self, rows: list[Any]) -> dict[str, Any]:
        """``adapter_names`` for peft's mixed batch, once named adapters are loaded (else a plain forward)."""
        named = [a for a in getattr(self.model, "peft_config", {}) if a != "default"]
        if not named:
            return {}
        return {"adapter_names": [r.adapter or self.base_adapter for r in rows]}

    def slots(self, blocks: list[int], start: int, end: int):
        """Slot of each token ``start..end-1`` of a sequence holding ``blocks``."""
        bs = self.plan.block_size
        j = torch.arange(start, end)
        return torch.tensor(blocks, dtype=torch.long)[j // bs] * bs + j % bs

    def _forward(self, ids, positions, mask, all_logits: bool = False, **adapters):
        """The model's scores at each row's last position, or at every position (the only call into the model)."""
        d = self.device
        mask = mask.to(d)
        if self._float_mask:
            mask = torch.zeros(mask.shape, dtype=self.dtype, device=d).masked_fill(~mask, torch.finfo(self.dtype).min)
        out = self.model(input_ids=ids.to(d), position_ids=positions.to(d), attention_mask=mask, cache=self.kv,
                         use_cache=True, logits_to_keep=0 if all_logits else 1, **adapters)
        return out.logits if all_logits else out.logits[:, -1]

    def warm_up(self, blocks: list[int]) -> None:
        """One tiny prefill and decode over ``blocks`` (room for 9 tokens), so the first request does not pay
        the kernels' set-up."""
        slots, n = self.slots(blocks, 0, 9).to(self.device), 8
        self.kv.plan_forward(slots[:n])
        self._forward(torch.zeros(1, n, dtype=torch.long), torch.arange(n)[None],
                      torch.ones(n, n, dtype=torch.bool).tril()[None, None])
        self.kv.plan_forward(slots[n:], slots[None])
        self._forward(torch.zeros(1, 1, dtype=torch.long), torch.tensor([[n]]),
                      torch.ones(1, 1, 1, n + 1, dtype=torch.bool))

    def prefill(self, rows: list[Any], all_logits: bool = False):
        """Compute each row's context from ``row.cached`` on, in one left-padded forward; the last logits
        (``all_logits``: every position's, ``(rows, width, vocab)``, each row right-aligned).

        Rows with nothing cached attend to their own fresh K/V only (nothing is read back). When a row starts
        after a cached prefix, every row reads its whole context from the cache (its new tokens are written
        first), and each query sees the keys up to its own position.
        """
        contexts = [r.context() for r in rows]
        starts = [r.cached for r in rows]
        n, width = len(rows), max(len(c) - s for c, s in zip(contexts, starts))
        ids = torch.zeros(n, width, dtype=torch.long)
        positions = torch.zeros(n, width, dtype=torch.long)
        valid = torch.zeros(n, width, dtype=torch.bool)
        write = torch.zeros(n, width, dtype=torch.long)  # padding writes to slot 0
        for i, (r, ctx, s) in enumerate(zip(rows, contexts, starts)):
            pad = width - (len(ctx) - s)
            ids[i, pad:] = torch.tensor(ctx[s:])
            positions[i, pad:] = torch.arange(s, len(ctx))
            valid[i, pad:] = True
            write[i, pad:] = self.slots(r.blocks, s, len(ctx))
        if not any(starts):
            mask = torch.ones(width, width, dtype=torch.bool).tril()[None]
            if not valid.all():  # causal over real tokens; a padding position sees itself (no empty mask row)
                mask = mask & valid[:, None, :] | torch.eye(width, dtype=torch.bool)
            self.kv.plan_forward(write.view(-1).to(self.device))
        else:
            lengths = torch.tensor([len(c) for c in contexts])
            t = int(lengths.max())
            j = torch.arange(t)
            read = torch.zeros(n, t, dtype=torch.long)
            for i, r in enumerate(rows):
                read[i, :len(contexts[i])] = self.slots(r.blocks, 0, len(contexts[i]))
            # a query sees the row's keys up to its own position (a padding query, at position 0, sees key 0)
            mask = (j[None, None, :] <= positions[:, :, None]) & (j[None, :] < lengths[:, None])[:, None, :]
            self.kv.plan_forward(write.view(-1).to(self.device), read.to(self.device))
        return self._forward(ids, positions, mask[:, None], all_logits=all_logits, **self._adapter_kwargs(rows))

    def decode(self, rows: list[Any]):
        """One forward adding every row's ``last_token`` after its ``length`` cached tokens; the logits."""
        bs = self.plan.block_size
        lengths = torch.tensor([r.length for r in rows])
        width = max(len(r.blocks) for r in rows)
        table = torch.tensor([r.blocks + [0] * (width - len(r.blocks)) for r in rows])
        j = torch.arange(int(lengths.max()) + 1)
        valid = j[None, :] <= lengths[:, None]  # the row's tokens and the one being added
        slots = torch.where(valid, table[:, j // bs] * bs + j % bs, 0)
        write = slots.gather(1, lengths[:, None]).view(-1)
        self.kv.plan_forward(write.to(self.device), slots.to(self.device))
        return self._forward(torch.tensor([[r.last_token] for r in rows]), lengths[:, None],
                             valid[:, None, None, :], **self._adapter_kwargs(rows))

    def sample(self, rows: list[Any], logits) -> list[int | ServeError]:
        """The next token of every row, or the error that row fails with (it fails alone; the others go on).

        Per-row constraints on the scores (a grammar's token bitmask) are applied to ``logits`` here, before
        the argmax and the sampler.
        """
        # one pass gives plain greedy rows their token (the first maximum, as argmax) and flags rows whose
        # best score is NaN or inf (NaN propagates through max)
        best, greedy = logits.max(dim=-1)
        finite, greedy = torch.isfinite(best).tolist(), greedy.tolist()
        out: list[int | ServeError] = []
        for i, r in enumerate(rows):
            if not finite[i]:
                out.append(non_finite_error())
                continue
            try:
                out.append(greedy[i] if _plain_greedy(r.seq.params) else r.seq.sample(logits[i]))
            except GenerationError as e:  # this request's own settings broke sampling
                out.append(InvalidRequest(f"sampling failed: {e}", param=e.param))
            except Exception as e:  # noqa: BLE001 - isolate the row, keep the batch
                log.exception("sampling failed for one request")
                out.append(ServeError(f"sampling failed: {type(e).__name__}: {e}", status=500))
        return out

    def embed(self, ids: list[int], adapter: str | None = None) -> list[float]:
        """Mean-pooled last hidden state of ``ids``, L2-normalised (no KV cache involved)."""
        row = type("Row", (), {"adapter": adapter})
        hidden = self.model(input_ids=torch.tensor([ids], device=self.device), output_hidden_states=True,
                            use_cache=False, logits_to_keep=1, **self._adapter_kwargs([row])).hidden_states[-1][0]
        return torch.nn.functional.normalize(hidden.float().mean(dim=0), dim=-1).cpu().tolist()
