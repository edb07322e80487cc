"""Read checkpoints tensor by tensor; write sharded safetensors atomically.

Why not ``from_pretrained``: applying a 7B delta through two loaded models
holds ~30 GB. Reading one tensor at a time (safetensors headers tell every
shape and dtype up front, so all checks run before any work) and flushing
output shards as they fill keeps memory near one shard.

Reading uses ``safetensors.safe_open`` (0.8 reads a tensor without leaving the
file's pages resident) and ``torch.load(mmap=True, weights_only=True)`` for old
``pytorch_model*.bin`` files, one ``.bin`` file mapped at a time.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import struct
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from ..errors import CheckpointError, UsageError, WeightsError
from ..sizes import parse_size
from ..files import replace_dir, write_json

log = logging.getLogger(__name__)

ST_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
# Files that hold weights (never copied as "other files" next to new weights).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".gguf")
DEFAULT_MAX_SHARD = 5 * 10**9  # the Hugging Face convention for "5GB"

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Shapes and dtypes of a safetensors file without reading its data.

    Also proves the file is complete: a download cut short fails here, naming
    the file, before any output is written.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path} is truncated ({size} bytes): not a safetensors file; re-download it")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100 * 2**20):
                raise CheckpointError(
                    f"{path} is truncated or not a safetensors file (header of {n} bytes, file of {size}); "
                    "re-download it"
                )
            header = json.loads(f.read(n))
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} has a corrupt safetensors header ({e}); re-download it") from None
    header.pop("__metadata__", None)
    infos: dict[str, TensorInfo] = {}
    end = 0
    for name, meta in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        if meta["dtype"] not in _ST_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {meta['dtype']}, which is not supported")
        infos[name] = TensorInfo(name, tuple(meta["shape"]), _ST_DTYPES[meta["dtype"]], path)
        end = max(end, meta["data_offsets"][1])
    if size < 8 + n + end:
        last = max(infos, key=lambda k: header[k]["data_offsets"][1])
        raise CheckpointError(
            f"{path} is truncated: {size} bytes, but its header describes {8 + n + end} "
            f"(tensor {last!r} ends past the end of the file); re-download it"
        )
    return infos


class Checkpoint:
    """The weights of one model folder (or one weights file), read lazily.

    ``get(name)`` returns a tensor the caller owns (free to modify in place).
    """

    def __init__(self, path: str | Path, label: str = "model"):
        self.path = Path(path)
        self.label = label
        self.files, self.index_file = self._discover()
        self.format = "bin" if self.files[0].suffix == ".bin" else "safetensors"
        self.tensors: dict[str, TensorInfo] = {}
        for f in self.files:
            infos = read_safetensors_header(f) if self.format == "safetensors" else self._bin_infos(f)
            for name, info in infos.items():
                if name in self.tensors:
                    raise CheckpointError(
                        f"{self.label} checkpoint: tensor {name!r} is in both {self.tensors[name].file} and {f}"
                    )
                self.tensors[name] = info
        if self._weight_map:
            for name, fname in self._weight_map.items():
                if self.tensors.get(name) is None or self.tensors[name].file.name != fname:
                    raise CheckpointError(
                        f"{self.index_file} lists tensor {name!r} in {fname}, but that file does not hold it; "
                        "the index and the shards do not match — re-download the checkpoint"
                    )
        self._bin_cache: tuple[Path, dict] | None = None

    # ----------------------------------------------------------- discovery
    def _discover(self) -> tuple[list[Path], Path | None]:
        p = self.path
        self._weight_map: dict[str, str] = {}
        if not p.exists():
            raise CheckpointError(f"{self.label} checkpoint {p} does not exist")
        if p.is_file():
            if p.suffix not in (".safetensors", ".bin"):
                raise CheckpointError(f"{p} is not a .safetensors or .bin weights file")
            return [p], None
        for index_name in (ST_INDEX, BIN_INDEX):
            index = p / index_name
            if index.exists():
                try:
                    wm = json.loads(index.read_text())["weight_map"]
                except (OSError, ValueError, KeyError, TypeError) as e:
                    raise CheckpointError(f"{index} is not a valid index file ({e}); re-download it") from None
                self._weight_map = wm
                files: set[Path] = set()
                for name, fname in wm.items():
                    f = p / fname
                    if f not in files:
                        if not f.is_file():
                            raise CheckpointError(
                                f"{self.label} checkpoint is incomplete: shard {f} (listed in {index_name} for "
                                f"tensor {name!r}) is missing; download it again"
                            )
                        files.add(f)
                return sorted(files), index
        for pattern in ("model.safetensors", "*.safetensors", "pytorch_model.bin", "pytorch_model*.bin"):
            found = sorted(f for f in p.glob(pattern) if f.is_file())
            if found:
                return found, None
        raise CheckpointError(
            f"no weights in {self.label} folder {p}: expected model.safetensors[.index.json] "
            "or pytorch_model.bin[.index.json]"
        )

    def _load_bin(self, f: Path, mmap: bool = True) -> dict:
        try:
            sd = torch.load(f, map_location="cpu", mmap=mmap, weights_only=True)
        except RuntimeError as e:
            if mmap and "mmap" in str(e):  # legacy (pre-zip) format cannot be mapped
                return self._load_bin(f, mmap=False)
            raise CheckpointError(f"cannot read {f}: {e}; the file may be truncated — re-download it") from None
        except Exception as e:  # pickle / zip errors come in many types
            raise CheckpointError(f"cannot read {f}: {e}; the file may be truncated — re-download it") from None
        if not isinstance(sd, dict):
            raise CheckpointError(f"{f} does not hold a state dict (found {type(sd).__name__})")
        if isinstance(sd.get("state_dict"), dict):  # some training scripts wrap the weights
            sd = sd["state_dict"]
        return sd

    def _bin_infos(self, f: Path) -> dict[str, TensorInfo]:
        sd = self._load_bin(f)
        return {k: TensorInfo(k, tuple(v.shape), v.dtype, f) for k, v in sd.items() if isinstance(v, torch.Tensor)}

    # -------------------------------------------------------------- access
    def names(self) -> list[str]:
        """Tensor names in file order (reading them in this order touches one file at a time)."""
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str) -> torch.Tensor:
        info = self.tensors[name]
        if self.format == "bin":
            if self._bin_cache is None or self._bin_cache[0] != info.file:
                self._bin_cache = None  # unmap the previous file first
                self._bin_cache = (info.file, self._load_bin(info.file))
            return self._bin_cache[1][name].clone()  # own the memory; the mapping is copy-on-write
        from safetensors import SafetensorError, safe_open

        try:
            # pread (safetensors >= 0.8) reads into memory we own; an mmap-backed tensor would keep
            # every page read so far resident (and counted) while the file stays open.
            try:
                f = safe_open(str(info.file), framework="pt", backend="pread")
            except TypeError:  # older safetensors: the mapping goes away with the tensor
                f = safe_open(str(info.file), framework="pt")
            with f:
                return f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"cannot read tensor {name!r} from {info.file}: {e}") from None

    def load_all(self) -> dict[str, torch.Tensor]:
        """Every tensor in memory at once (the fast path for machines with RAM to spare)."""
        out: dict[str, torch.Tensor] = {}
        for f in self.files:
            if self.format == "bin":
                seen: set[int] = set()
                for k, v in self._load_bin(f, mmap=False).items():
                    if isinstance(v, torch.Tensor):
                        ptr = v.untyped_storage().data_ptr()
                        # tied weights share storage in .bin files; callers modify tensors in place
                        out[k] = v.clone() if ptr in seen else v
                        seen.add(ptr)
            else:
                from safetensors import SafetensorError
                from safetensors.torch import load_file

                try:
                    out.update(load_file(f))
                except SafetensorError as e:
                    raise CheckpointError(f"cannot read {f}: {e}") from None
        return out

    @property
    def file_bytes(self) -> dict[Path, int]:
        return {f: f.stat().st_size for f in self.files}

    def close(self) -> None:
        self._bin_cache = None


def embedding_rows(ck: Checkpoint) -> tuple[str, int] | None:
    """(name, rows) of the input embedding, found by the usual names."""
    patterns = (r"(^|\.)embed_tokens\.weight$", r"(^|\.)wte\.weight$", r"word_embeddings\.weight$",
                r"tok_embeddings\.weight$")
    for pat in patterns:
        for name, info in ck.tensors.items():
            if re.search(pat, name) and len(info.shape) == 2:
                return name, info.shape[0]
    return None


# ---------------------------------------------------------------------------- writing


def resolve_shard_size(text: str, source: Checkpoint) -> int:
    """'auto': the source's largest shard, at most 5GB — output mirrors the input's sharding,
    so streaming never buffers more than the input already needed."""
    if text == "auto":
        return min(DEFAULT_MAX_SHARD, max(source.file_bytes.values()))
    return parse_size(text)


_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


class ShardWriter:
    """Write safetensors shards tensor by tensor, as the tensors are computed.

    Why not ``safetensors.torch.save_file``: it needs a whole shard in memory
    at once.  Every output shape and dtype is known from the input headers
    before any work, so the shards' layout and headers are fixed up front and
    each tensor goes to disk as soon as it exists: peak memory is a couple of
    tensors whatever ``max_bytes`` is.  The file format (8-byte header length,
    JSON header padded to 8 bytes, raw little-endian data in offset order) is
    the one safetensors documents; tests read the output back with safetensors
    and transformers.

    A shard is written as ``NAME.part`` and renamed when its last tensor is in,
    so a shard under its final name is complete: a rerun in the same folder
    (see ``atomic_output_dir(resume=...)``) skips it — ask ``done(name)``.
    """

    def __init__(self, folder: Path, plan: list[tuple[str, tuple[int, ...], torch.dtype]], max_bytes: int,
                 metadata: dict[str, str] | None = None):
        self.folder = Path(folder)
        self.metadata = {"format": "pt", **(metadata or {})}
        shards: list[list[TensorInfo]] = [[]]
        size = 0
        for name, shape, dtype in plan:
            info = TensorInfo(name, tuple(shape), dtype, Path())
            if shards[-1] and size + info.nbytes > max_bytes:
                shards.append([])
                size = 0
            shards[-1].append(info)
            size += info.nbytes
        n = len(shards)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._shards = list(zip(names, shards))
        self._headers = [self._header(infos) for infos in shards]
        self.files = [self.folder / name for name in names]
        self.total_bytes = sum(info.nbytes for infos in shards for info in infos)
        self._shard_of = {info.name: i for i, infos in enumerate(shards) for info in infos}
        self._done = {i for i, f in enumerate(self.files) if self._complete(i)}
        self._next = [(i, info) for i, infos in enumerate(shards) if i not in self._done for info in infos]
        self._pos = 0
        self._file = None
        self._file_idx = -1

    @property
    def resumed_tensors(self) -> int:
        return sum(len(self._shards[i][1]) for i in self._done)

    def done(self, name: str) -> bool:
        """True when ``name`` is in a shard finished by an earlier, interrupted run."""
        return self._shard_of[name] in self._done

    def _header(self, infos: list[TensorInfo]) -> bytes:
        header: dict = {"__metadata__": self.metadata}
        offset = 0
        for info in infos:
            header[info.name] = {"dtype": _ST_NAMES[info.dtype], "shape": list(info.shape),
                                 "data_offsets": [offset, offset + info.nbytes]}
            offset += info.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-(8 + len(raw)) % 8)  # data starts 8-byte aligned, as safetensors writes it
        return struct.pack("<Q", len(raw)) + raw

    def _complete(self, idx: int) -> bool:
        f = self.files[idx]
        if not f.is_file():
            return False
        want = self._headers[idx]
        size = len(want) + sum(info.nbytes for info in self._shards[idx][1])
        with open(f, "rb") as fh:
            return f.stat().st_size == size and fh.read(len(want)) == want

    def _open(self, idx: int) -> None:
        self._file = open(self.files[idx].with_name(self.files[idx].name + ".part"), "wb")
        self._file.write(self._headers[idx])
        self._file_idx = idx

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self._pos >= len(self._next):
            raise RuntimeError(f"tensor {name!r} was not in the write plan")
        idx, info = self._next[self._pos]
        if (name, tuple(tensor.shape), tensor.dtype) != (info.name, info.shape, info.dtype):
            raise RuntimeError(  # a bug in the caller, not bad input: the plan came from the same headers
                f"expected tensor {info.name!r} {list(info.shape)} {info.dtype}, "
                f"got {name!r} {list(tensor.shape)} {tensor.dtype}"
            )
        if sys.byteorder != "little" and tensor.element_size() > 1:
            raise WeightsError("writing safetensors on a big-endian machine is not supported")
        if idx != self._file_idx:
            self._open(idx)
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        self._file.write(memoryview(data.numpy()))
        self._pos += 1
        if self._pos == len(self._next) or self._next[self._pos][0] != idx:  # the shard's last tensor
            self._file.close()
            self._file = None
            os.replace(self.files[idx].with_name(self.files[idx].name + ".part"), self.files[idx])

    def close(self) -> list[Path]:
        """Check every planned tensor was written; write the index when there are several shards."""
        if self._pos != len(self._next):
            missing = self._next[self._pos][1].name
            raise RuntimeError(f"{len(self._next) - self._pos} planned tensors were not written (first: {missing!r})")
        if not self._shards[0][1] and not self.files[0].exists():  # no tensors at all: still a valid file
            self.files[0].write_bytes(self._headers[0])
        if len(self.files) > 1:
            weight_map = {info.name: name for name, infos in self._shards for info in infos}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.folder / ST_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return self.files

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        if self._file:  # on error: release the handle; the unfinished shard stays a .part file
            self._file.close()
            self._file = None


def fingerprint(op: str, checkpoints: list[Checkpoint], **settings) -> dict:
    """What must not change for an interrupted run to be resumed: inputs (size, mtime) and settings."""
    files = [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for ck in checkpoints for f in ck.files]
    return json.loads(json.dumps({"op": op, "inputs": files, "settings": settings}, default=str))


@contextmanager
def atomic_output_dir(target: str | Path, force: bool = False, inputs: tuple[Path, ...] = (),
                      resume: dict | None = None) -> Iterator[Path]:
    """Yield a work folder next to ``target``; rename it onto ``target`` only on success.

    An existing non-empty target is replaced only with ``force`` (and only after
    the new one is complete). On an error the work folder is removed — except
    when the run was interrupted (Ctrl+C, or killed) and ``resume`` is given: the
    folder ``.NAME.partial`` then stays, and the same command with the same
    inputs and settings (``resume``, see :func:`fingerprint`) continues in it.
    """
    target = Path(target).absolute()
    for src in inputs:
        src = Path(src).resolve()
        t = target.resolve()
        if t == src or src in t.parents or t in src.parents:
            raise UsageError(f"the output {target} must not be, contain or sit inside the input {src}")
    if target.exists() and not target.is_dir():
        raise UsageError(f"{target} exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not force:
        raise UsageError(f"{target} already exists and is not empty; pass --force to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    if resume is None:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    else:
        tmp = target.parent / f".{target.name}.partial"
        marker = tmp / ".resume.json"
        if tmp.exists():
            try:
                same = json.loads(marker.read_text()) == resume
            except (OSError, ValueError):
                same = False
            if same:
                log.info("resuming the interrupted run in %s", tmp)
            else:
                log.info("removing %s: left by a run with other inputs or settings", tmp)
                shutil.rmtree(tmp)
        tmp.mkdir(exist_ok=True)
        marker.write_text(json.dumps(resume))
    try:
        yield tmp
        if resume is not None:
            (tmp / ".resume.json").unlink()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~umask)
        replace_dir(tmp, target)
    except KeyboardInterrupt:
        if resume is None:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            log.warning("interrupted: finished shards are kept in %s; run the same command again to resume", tmp)
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_other_files(src: Path, dst: Path) -> list[str]:
    """Copy config, tokenizer and other small files, but no weights or weight indexes."""
    copied = []
    if not src.is_dir():
        return copied
    for f in sorted(src.iterdir()):
        if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and not f.name.endswith(".index.json"):
            shutil.copy2(f, dst / f.name)
            copied.append(f.name)
    return copied


def set_config_dtype(folder: Path, dtype: torch.dtype) -> None:
    """Record the weights' dtype in config.json (``dtype``; ``torch_dtype`` for older transformers)."""
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        return
    cfg = json.loads(cfg_path.read_text())
    name = str(dtype).removeprefix("torch.")
    if cfg.get("dtype") == name and cfg.get("torch_dtype", name) == name:
        return
    cfg["dtype"] = name
    if "torch_dtype" in cfg:
        cfg["torch_dtype"] = name
    write_json(cfg_path, cfg)
