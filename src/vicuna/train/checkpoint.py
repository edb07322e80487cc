"""Training checkpoints: every rank writes its own shards; a checkpoint counts only when its manifest says so.

``OUT/checkpoint-N/``::

    state/shard-RRRRR-model-IIIII-of-KKKKK.safetensors   each rank's pieces of the weights (``model.*``) and of the
                                                          AdamW moments (``optim.*``), written by all ranks at once
    rng/rank-RRRRR.json                                   each rank's Python / NumPy / torch RNG state
    trainer_state.json, scheduler.json, optimizer.json    step and data position, LR schedule, optimizer settings
    model/                                                config, generation config, tokenizer: what
                                                          ``vicuna weights consolidate`` puts next to the weights
    manifest.json                                         written last: every file above, its size and xxh3-128

Why this shape:

- **No pickles.** DCP's default format keeps a pickled ``.metadata`` and pickles non-tensor entries, so resuming
  from a checkpoint someone handed you could run their code. Here tensors go through DCP's Hugging Face storage
  (safetensors, whose headers record each piece's offset in the full tensor) and everything else is JSON.
- **Resharding.** Because each shard says where its piece sits, DCP loads a checkpoint written by N ranks at any
  world size M (1 included), reading on each rank only the slices it holds.
- **A manifest, not a rename.** Object-store mounts (SkyPilot ``MOUNT_CACHED``, gcsfuse) upload files in any order
  and rename folders file by file; a small file can arrive before a large one. A checkpoint is complete only when
  every file the manifest lists is there at its size; anything else is skipped, with a warning that names the
  problem, for the previous complete one.
- **Bounded memory.** DCP's safetensors writer builds each file in memory, so tensors are grouped into files of at
  most :data:`FILE_BYTES` per rank.
"""

from __future__ import annotations

import base64
import errno
import json
import logging
import os
import random
import re
import shutil
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import TrainError
from ..files import fsync_dir, write_json
from .distributed import Dist, gather_objects

log = logging.getLogger("vicuna.train")

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
FORMAT = "vicuna-checkpoint-1"
MANIFEST, TRAINER_STATE, SCHEDULER, OPTIMIZER = "manifest.json", "trainer_state.json", "scheduler.json", "optimizer.json"
STATE_DIR, RNG_DIR, MODEL_DIR = "state", "rng", "model"
FILE_BYTES = 256 * 2**20  # per rank and file (DCP's safetensors writer serialises a whole file in memory)
HASH_CHECKED_BYTES = 2**20  # on resume, files up to this size (the JSON ones) are hash-checked, larger ones sized


class CheckpointLoadError(Exception):
    """This checkpoint cannot be loaded (the message says why); an older one may still be."""


def _failures() -> tuple[type[BaseException], ...]:
    """What a failed checkpoint read or write raises: DCP's CheckpointException derives from BaseException."""
    from torch.distributed.checkpoint.api import CheckpointException

    return Exception, CheckpointException


# ----------------------------------------------------------------------------- completeness


def file_hash(path: Path) -> str:
    """xxh3-128 of a file: ~10x faster than sha256, and corruption (not forgery) is what it must catch."""
    import xxhash

    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


def _entries(root: Path, files) -> dict[str, dict]:
    return {p.relative_to(root).as_posix(): {"bytes": p.stat().st_size, "xxh3_128": file_hash(p)} for p in files}


def problem(path: Path, *, all_hashes: bool = False) -> str | None:
    """Why ``path`` is not a complete checkpoint, or None when it is.

    Complete means: ``manifest.json`` parses, lists weight shards, and every file it lists exists at the listed size
    (small files, and with ``all_hashes`` every file, also with the listed hash).
    """
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
        if manifest.get("format") != FORMAT:
            return f"{MANIFEST} is not a {FORMAT} manifest (format {manifest.get('format')!r})"
    except FileNotFoundError:
        return f"no {MANIFEST} (the save, copy or upload did not finish)"
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{MANIFEST} is unreadable ({type(e).__name__}: {e})"
    if not isinstance(files, dict) or not any(str(k).startswith(STATE_DIR + "/") for k in files):
        return f"{MANIFEST} lists no weight shards"
    for rel, meta in sorted(files.items()):
        f = path / rel
        try:
            size = f.stat().st_size
        except OSError:
            return f"{rel} is missing"
        if size != meta.get("bytes"):
            return f"{rel} has {size} bytes, the manifest says {meta.get('bytes')} (a truncated copy or upload?)"
        if (all_hashes or size <= HASH_CHECKED_BYTES) and file_hash(f) != meta.get("xxh3_128"):
            return f"{rel} does not match its hash in the manifest (corrupted)"
    return None


def checkpoint_dirs(out: Path) -> list[tuple[int, Path]]:
    """Every ``checkpoint-N`` folder in ``out``, complete or not, oldest first."""
    found = []
    if out.is_dir():
        for p in out.iterdir():
            m = CHECKPOINT_RE.match(p.name)
            if m and p.is_dir():
                found.append((int(m.group(1)), p))
    return sorted(found)


def complete_checkpoints(out: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(complete checkpoints newest first, [(incomplete checkpoint, its problem)])."""
    good, bad = [], []
    for _, p in reversed(checkpoint_dirs(out)):
        why = problem(p)
        (bad.append((p, why)) if why else good.append(p))
    return good, bad


# ----------------------------------------------------------------------------- state of a run


def model_tensors(model, trainable_only: bool = False) -> dict[str, Any]:
    """The model's state dict (DTensor shards under FSDP) with tied weights once, under their first name.

    SmolLM2 and many small models tie ``lm_head.weight`` to ``model.embed_tokens.weight``; Hugging Face files
    store the tensor once, and so do checkpoints.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=trainable_only))
    first: dict[int, str] = {}
    tied = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if first.setdefault(id(p), name) != name:
            tied.add(name)
    return {k: v for k, v in sd.items() if k not in tied}


def _training_tensors(model, optimizer, lora: bool):
    """Flat ``{"model.<fqn>": t, "optim.<fqn>.<state>": t}`` plus the nested optimizer state dict it came from.

    ``get_optimizer_state_dict`` keys the state by parameter name (so it is the same at any world size) and creates
    AdamW's moments when the optimizer has not stepped yet, which is what loading needs to fill.
    """
    import torch
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    tensors = {f"model.{k}": v for k, v in model_tensors(model, trainable_only=lora).items()}
    osd = get_optimizer_state_dict(model, optimizer)
    for fqn, st in osd["state"].items():
        for k, v in st.items():
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"optimizer state {fqn}.{k} is a {type(v).__name__}, not a tensor")
            tensors[f"optim.{fqn}.{k}"] = v
    return tensors, osd


def _file_index(tensors: dict[str, Any], world: int) -> dict[str, int]:
    """Tensor -> output file number (the same on every rank): model and optimizer in separate files, each file at
    most :data:`FILE_BYTES` per rank, so the writer's in-memory file stays small and consolidation reads only
    weights."""
    index, size, prefix, out = 0, 0, None, {}
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size() / (world if hasattr(t, "to_local") else 1)
        group = name.split(".", 1)[0]
        if group != prefix or (size and size + nbytes > FILE_BYTES):
            index, size, prefix = index + 1, 0, group
        out[name] = index
        size += nbytes
    return out


def _b64(t) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode("ascii")


def _unb64(s: str):
    import torch

    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def rng_state() -> dict:
    import numpy as np
    import torch

    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {"python": [version, list(internal), gauss], "numpy": [name, keys.tolist(), pos, has_gauss, cached],
             "torch": _b64(torch.get_rng_state())}
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointLoadError(f"{path.parent.name}/{path.name} is unreadable ({type(e).__name__}: {e})") from None


def _os_error(e: BaseException | None) -> OSError | None:
    """The OSError behind ``e``: also inside DCP's CheckpointException, which wraps every rank's failure."""
    stack, seen = [e], set()
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError):
            return x
        failures = getattr(x, "failures", None)
        if isinstance(failures, dict):
            stack += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
        stack += [x.__cause__, x.__context__]
    return None


def _describe_failure(e: BaseException) -> str:
    err = _os_error(e)
    if err is not None and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return "disk full"
    if err is not None:
        return f"{err.strerror or err}" + (f" ({err.filename})" if err.filename else "")
    return f"{type(e).__name__}: {e}"


# ----------------------------------------------------------------------------- saving and loading


def _quiet_dcp() -> None:
    """DCP warns on every single-process save and load, even when asked for one (``no_dist=True``); background
    saves warn from their own thread, out of reach of ``warnings.catch_warnings``. (Idempotent.)"""
    warnings.filterwarnings("ignore", message="torch.distributed is (disabled, )?unavailable or uninitialized, assuming")


def _everywhere(fn: Callable[[], Any], d: Dist) -> tuple[Any, str | None]:
    """Run ``fn`` on every rank; returns (its result, the first rank's error message or None) on every rank.

    A failure on one rank alone would leave the others waiting in the next collective, so each step that can
    fail (a write, a read) is followed by this agreement.
    """
    try:
        result, error = fn(), None
    except CheckpointLoadError as e:
        result, error = None, str(e)
    except _failures() as e:  # every rank re-raises it as a clear error
        result, error = None, _describe_failure(e)
    errors = [e for e in gather_objects(error, d) if e]
    return result, (errors[0] if errors else None)


@dataclass
class _Pending:
    """A save whose shards are (maybe still) being written; finished by :meth:`Checkpointer.finish`."""

    path: Path
    step: int
    files: dict = field(default_factory=dict)  # this rank's manifest entries so far
    thread: threading.Thread | None = None
    error: str | None = None


class Checkpointer:
    """Saves (in the foreground, or in the background with DCP ``async_save``) and loads one run's checkpoints.

    Every method is collective: all ranks call it together.
    """

    def __init__(self, out: Path, model, optimizer, scheduler, d: Dist, *, lora: bool, keep: int,
                 background: bool = False, model_files: Callable[[Path], None] | None = None):
        self.out, self.model, self.optimizer, self.scheduler, self.d = Path(out), model, optimizer, scheduler, d
        self.lora, self.keep, self.model_files = lora, max(keep, 1), model_files
        self.pending: _Pending | None = None
        self._group = None
        if background and d.on:
            import torch.distributed as dist

            # the background writer's collectives must not interleave with the training loop's
            self._group = dist.new_group(backend="gloo")

    # ------------------------------------------------------------------ save
    def save(self, step: int, trainer_state: dict, *, background: bool = False) -> Path:
        """Write ``checkpoint-<step>``; in the background, only the small files are written before returning."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import HuggingFaceStorageWriter

        self.finish()
        d = self.d
        pending = _Pending(self.out / f"checkpoint-{step}", step)
        path = pending.path
        tensors, osd = _training_tensors(self.model, self.optimizer, self.lora)
        _quiet_dcp()

        def prepare() -> None:
            if d.main:
                if path.exists():  # an incomplete leftover of an earlier attempt at this step
                    shutil.rmtree(path)
                (path / RNG_DIR).mkdir(parents=True)

        def small_files() -> None:
            written = [path / RNG_DIR / f"rank-{d.rank:05d}.json"]
            write_json(written[0], rng_state())
            if d.main:
                write_json(path / TRAINER_STATE, {**trainer_state, "format": FORMAT, "step": step,
                                                  "world_size": d.world})
                write_json(path / SCHEDULER, self.scheduler.state_dict())
                write_json(path / OPTIMIZER, {"param_groups": osd["param_groups"]})
                written += [path / TRAINER_STATE, path / SCHEDULER, path / OPTIMIZER]
                if self.model_files is not None:
                    (path / MODEL_DIR).mkdir()
                    self.model_files(path / MODEL_DIR)
                    written += sorted(p for p in (path / MODEL_DIR).rglob("*") if p.is_file())
            pending.files.update(_entries(path, written))

        for fn in (prepare, small_files):
            _, error = _everywhere(fn, d)
            if error:
                self._fail(pending, error)
        writer = HuggingFaceStorageWriter(str(path / STATE_DIR), fqn_to_index_mapping=_file_index(tensors, d.world),
                                          save_distributed=True)
        if background:
            try:
                response = dcp.async_save(tensors, storage_writer=writer, process_group=self._group,
                                          no_dist=not d.on)
            except _failures() as e:  # staging failed (e.g. host memory): nothing is in flight
                pending.error = _describe_failure(e)
            else:
                future = getattr(response, "upload_completion", response)
                pending.thread = threading.Thread(target=self._complete, args=(pending, future.result), daemon=True,
                                                  name=f"checkpoint-{step}")
                pending.thread.start()
        else:
            self._complete(pending, lambda: dcp.save(tensors, storage_writer=writer, no_dist=not d.on))
        self.pending = pending
        if not background:
            self.finish()
        return path

    def _complete(self, pending: _Pending, write: Callable[[], Any]) -> None:
        """Write (or wait for) this rank's shards, then hash them for the manifest; errors are kept for finish()."""
        try:
            write()
            mine = sorted((pending.path / STATE_DIR).glob(f"shard-{self.d.rank + 1:05d}-*.safetensors"))
            pending.files.update(_entries(pending.path, mine))
        except _failures() as e:  # reported on every rank by finish()
            pending.error = _describe_failure(e)

    def busy(self) -> bool:
        """True while this rank's background save is still writing."""
        return self.pending is not None and self.pending.thread is not None and self.pending.thread.is_alive()

    def finish(self) -> None:
        """Wait for the pending save, then (rank 0) write its manifest and drop checkpoints beyond the newest K."""
        pending, self.pending = self.pending, None
        if pending is None:
            return
        if pending.thread is not None:
            pending.thread.join()
        results = gather_objects({"files": pending.files, "error": pending.error}, self.d)
        errors = [r["error"] for r in results if r["error"]]
        if errors:
            self._fail(pending, errors[0])

        def manifest() -> None:
            if self.d.main:
                files = {k: v for r in results for k, v in r["files"].items()}
                write_json(pending.path / MANIFEST, {"format": FORMAT, "step": pending.step,
                                                     "world_size": self.d.world, "files": files})
                fsync_dir(pending.path)
                self._rotate()

        _, error = _everywhere(manifest, self.d)
        if error:
            self._fail(pending, error)
        log.info("saved %s", pending.path)

    def _rotate(self) -> None:
        good, bad = complete_checkpoints(self.out)
        for old in good[self.keep:]:
            shutil.rmtree(old, ignore_errors=True)
        newest = int(CHECKPOINT_RE.match(good[0].name).group(1)) if good else -1
        for p, _ in bad:  # debris of saves that never finished, older than the newest complete one
            if int(CHECKPOINT_RE.match(p.name).group(1)) < newest:
                shutil.rmtree(p, ignore_errors=True)

    def _fail(self, pending: _Pending, error: str) -> None:
        """Remove the unfinished checkpoint and raise the same clear error on every rank."""
        from .distributed import barrier

        barrier(self.d)
        good = []
        if self.d.main:
            shutil.rmtree(pending.path, ignore_errors=True)
            good, _ = complete_checkpoints(self.out)
        after = f"; rerunning resumes from {good[0].name}" if good else ""
        hint = " Free some space (or lower --save-total-limit)." if error == "disk full" else ""
        raise TrainError(f"cannot write checkpoint {pending.path}: {error}.{hint} Nothing is lost but the steps "
                         f"since the last complete checkpoint{after}.")

    # ------------------------------------------------------------------ load
    def load(self, path: Path) -> dict:
        """Restore weights, optimizer, schedule and RNG from ``path``; returns its trainer state.

        Raises :class:`CheckpointLoadError` (on every rank) when the checkpoint is unusable; the model may then be
        half-loaded, and loading another checkpoint overwrites all of it.
        """
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        d = self.d
        rng_file = path / RNG_DIR / f"rank-{d.rank:05d}.json"

        def read() -> tuple:
            state = _read_json(path / TRAINER_STATE)
            if not isinstance(state, dict) or state.get("format") != FORMAT or not isinstance(state.get("step"), int):
                raise CheckpointLoadError(f"{TRAINER_STATE} is not a {FORMAT} trainer state")
            groups = _read_json(path / OPTIMIZER)
            if not isinstance(groups, dict) or not isinstance(groups.get("param_groups"), list):
                raise CheckpointLoadError(f"{OPTIMIZER} holds no param_groups list")
            schedule = _read_json(path / SCHEDULER)
            if not isinstance(schedule, dict):
                raise CheckpointLoadError(f"{SCHEDULER} is not a scheduler state")
            same_world = state.get("world_size") == d.world and rng_file.exists()
            return state, groups["param_groups"], schedule, _read_json(rng_file) if same_world else None

        result, error = _everywhere(read, d)
        if error:
            raise CheckpointLoadError(error)
        state, groups, schedule, rng = result
        tensors, osd = _training_tensors(self.model, self.optimizer, self.lora)
        _quiet_dcp()
        try:
            dcp.load(tensors, storage_reader=_reader(path / STATE_DIR), no_dist=not d.on)
        except _failures() as e:  # DCP gathers every rank's failure; safetensors and planner errors vary
            raise CheckpointLoadError(f"its shards do not load ({_load_failure(e)})") from None
        groups, error = _everywhere(lambda: _restore_groups(groups, osd["param_groups"]), d)
        if error:
            raise CheckpointLoadError(error)
        osd["param_groups"] = groups
        set_optimizer_state_dict(self.model, self.optimizer, osd)
        current = self.scheduler.state_dict()  # only known keys: a scheduler takes any attribute it is given
        self.scheduler.load_state_dict({**current, **{k: v for k, v in schedule.items()
                                                      if k in current and k != "lr_lambdas"}})
        try:
            if rng is not None:
                set_rng_state(rng)
        except (KeyError, TypeError, ValueError) as e:  # the weights loaded; a run without dropout does not care
            log.warning("%s: rank %d's RNG state is unreadable (%s); not restored", path.name, d.rank, e)
        if rng is None and d.main:
            log.warning("%s was written by %s processes, now %d: RNG state not restored", path.name,
                        state.get("world_size"), d.world)
        return state


def _restore_groups(saved: list[dict], current: list[dict]) -> list[dict]:
    """Saved optimizer settings (learning rate et al.), checked to cover the same parameters as this run's."""
    if len(saved) != len(current) or any(sorted(s.get("params", [])) != sorted(c["params"])
                                         for s, c in zip(saved, current)):
        raise CheckpointLoadError("its optimizer covers other parameters than this run's model")
    out = []
    for s, c in zip(saved, current):
        g = dict(c)
        g.update({k: tuple(v) if isinstance(c.get(k), tuple) else v for k, v in s.items() if k in c})
        out.append(g)
    return out


def _load_failure(e: BaseException) -> str:
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
        e = inner[0] if isinstance(inner, tuple) else inner
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return f"{type(e).__name__}: {text}"[:300]


def _reader(path: Path):
    """DCP's safetensors reader: headers and slices only; nothing in the checkpoint is unpickled."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    return HuggingFaceStorageReader(str(path))


# ----------------------------------------------------------------------------- Hugging Face folders


def sharded_load_problem(path: Path, names: list[str]) -> str | None:
    """Why the base model at ``path`` cannot be read shard by shard (None when it can)."""
    from ..errors import WeightsError
    from ..weights.checkpoint import read_safetensors_header

    if not path.is_dir():
        return f"{path} is not a local folder"
    files = sorted(path.glob("*.safetensors"))
    if not files:
        return f"{path} has no .safetensors weights"
    try:
        have = {n for f in files for n in read_safetensors_header(f)}
    except WeightsError as e:
        return str(e)
    missing = [n for n in names if n not in have]
    return f"its files lack {missing[0]!r} and {len(missing) - 1} more tensors" if missing else None


def load_pretrained_shards(model, path: Path, d: Dist) -> None:
    """Fill a model's (FSDP2-sharded) parameters from a Hugging Face safetensors folder: each rank reads only the
    rows it holds, converted to the parameters' dtype, so no rank ever holds the whole model."""
    import torch.distributed.checkpoint as dcp

    _quiet_dcp()
    dcp.load(model_tensors(model), storage_reader=_reader(path), no_dist=not d.on)


def full_tensors(model, d: Dist, trainable_only: bool = False):
    """(name, full CPU tensor) for every weight, gathered one at a time (every rank must iterate)."""
    for name, t in model_tensors(model, trainable_only).items():
        full = t.full_tensor() if hasattr(t, "full_tensor") else t
        yield name, full.detach().cpu()


@dataclass
class ConsolidateResult:
    target: Path
    tensors: int
    files: list[Path]
    adapter: bool


def consolidate(checkpoint: str | Path, output: str | Path, *, dtype: str | None = None,
                max_shard_size: str = "5GB", force: bool = False) -> ConsolidateResult:
    """A training checkpoint -> a Hugging Face model folder (or PEFT adapter folder), streamed.

    Reads tensors a group at a time (DCP reassembles each from every rank's pieces) and writes them with the
    weights area's streaming shard writer, so memory stays near ``READ_BYTES`` whatever the model size. Every file's
    hash is checked first.
    """
    import torch
    import torch.distributed.checkpoint as dcp

    from ..errors import CheckpointError
    from ..sizes import parse_size
    from ..weights.checkpoint import DTYPES, ShardWriter, atomic_output_dir, set_config_dtype

    ckpt = Path(checkpoint)
    why = problem(ckpt, all_hashes=True) if ckpt.is_dir() else f"{ckpt} is not a folder"
    if why:
        raise CheckpointError(f"{ckpt}: not a complete training checkpoint: {why}")
    files_dir = ckpt / MODEL_DIR
    if not (files_dir / "config.json").exists() and not (files_dir / "adapter_config.json").exists():
        raise CheckpointError(f"{ckpt}: holds no model config ({MODEL_DIR}/config.json); it was written by a run "
                              "that did not record one")
    adapter = (files_dir / "adapter_config.json").exists()
    meta = _reader(ckpt / STATE_DIR).read_metadata().state_dict_metadata
    names = [k for k in meta if k.startswith("model.")]
    want = DTYPES[dtype] if dtype else None

    def out_name(key: str) -> str:
        name = key[len("model."):]
        return name.replace(".default.", ".") if adapter else name  # PEFT files drop the adapter name

    plan = [(out_name(k), tuple(meta[k].size), want or meta[k].properties.dtype) for k in names]
    _quiet_dcp()
    with atomic_output_dir(output, force=force, inputs=(ckpt,)) as tmp:
        for f in sorted(files_dir.iterdir()):
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
        with ShardWriter(tmp, plan, parse_size(max_shard_size)) as writer:
            for group in _read_groups(names, meta):
                buf = {k: torch.empty(tuple(meta[k].size), dtype=meta[k].properties.dtype) for k in group}
                dcp.load(buf, storage_reader=_reader(ckpt / STATE_DIR), no_dist=True)
                for k in group:
                    writer.add(out_name(k), buf[k].to(want) if want else buf[k])
            files = writer.close()
        if adapter:
            if len(files) != 1:
                raise CheckpointError("a LoRA adapter larger than --max-shard-size: raise it")
            os.replace(files[0], tmp / "adapter_model.safetensors")
            files = [Path(output) / "adapter_model.safetensors"]
        elif want is not None:
            set_config_dtype(tmp, want)
    return ConsolidateResult(Path(output), len(names), files, adapter)


READ_BYTES = 512 * 2**20


def _read_groups(names: list[str], meta) -> list[list[str]]:
    """Consecutive tensors of at most READ_BYTES together (one tensor alone when larger)."""
    groups: list[list[str]] = [[]]
    size = 0
    for k in names:
        n = meta[k].size.numel() * meta[k].properties.dtype.itemsize
        if groups[-1] and size + n > READ_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += n
    return groups
