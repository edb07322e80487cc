"""The engines behind the serving commands, one interface (:class:`~.base.EngineBase`).

- :mod:`.base` — :class:`ModelConfig`, :class:`EngineConfig`, :class:`EngineStats`, the :class:`Meter`,
  request preparation shared by every backend;
- the HF engine (ours): :mod:`.hf` (the thread bridge and the loop), :mod:`.scheduler` (queues, blocks,
  preemption, the prefix cache; no torch), :mod:`.runner` (the forwards), :mod:`.kv` (the paged pools);
- the backends that delegate batching to a library: :mod:`.external` (what they share), :mod:`.vllm`,
  :mod:`.llamacpp`.

Imports go one way: ``launch -> engine.{hf,vllm,llamacpp} -> engine.base``.
"""

from .base import BACKENDS, EngineBase, EngineConfig, EngineStats, Meter, ModelConfig, drain_retry_after
from .hf import HFEngine  # torch is imported by its runner, when an engine is built

__all__ = ["BACKENDS", "EngineBase", "EngineConfig", "EngineStats", "HFEngine", "Meter", "ModelConfig",
           "drain_retry_after"]
