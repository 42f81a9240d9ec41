"""Files on disk: atomic writes, run-owned paths, and a streaming safetensors writer.

Everything EvoMerge writes appears atomically: it is built in a temporary sibling and renamed
into place when complete, so a crash leaves either nothing or the whole result. A streaming
merge writes each batch of tensors on a background thread (:class:`WriteBehind`) while it
computes the next.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import struct
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .exceptions import ConfigurationError, MergeError

logger = logging.getLogger(__name__)

_created_lock = threading.Lock()
_created_paths: set[Path] = set()


def register_created(path: str | Path) -> Path:
    """Record that this process created ``path``, so ``clean_up_models`` may delete it."""
    resolved = Path(path).resolve()
    with _created_lock:
        _created_paths.add(resolved)
    return resolved


def created_paths() -> set[Path]:
    with _created_lock:
        return set(_created_paths)


def forget_created(path: str | Path) -> None:
    with _created_lock:
        _created_paths.discard(Path(path).resolve())


def read_json_or_yaml(
    path: str | Path, *, what: str, missing: str, default_format: str = "json"
) -> Any:
    """Parse a JSON or YAML file: ``.json`` is JSON, ``.yaml``/``.yml`` YAML, others as
    ``default_format``.

    Raises:
        ConfigurationError: ``{what} {path} does not exist; {missing}`` when there is no such
            file, or the parser's first line when it is not valid.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigurationError(f"{what} {path} does not exist; {missing}")
    suffix = path.suffix.lower().lstrip(".")
    kind = "yaml" if suffix in ("yaml", "yml") else "json" if suffix == "json" else default_format
    text = path.read_text(encoding="utf-8")
    try:
        if kind == "yaml":
            import yaml

            return yaml.safe_load(text)
        return json.loads(text)
    except Exception as exc:  # noqa: BLE001 - json and yaml raise different error types
        raise ConfigurationError(f"{path}: not valid {kind}: {str(exc).splitlines()[0]}") from None


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def check_destination(
    dest: str | Path, *, overwrite: bool = False, protected: Sequence[Path] = ()
) -> Path:
    """Refuse a destination that is a non-empty folder (unless ``overwrite``) or lies in a source.

    Raises:
        ConfigurationError: naming the destination and the fix.
    """
    dest = Path(dest).resolve()
    for source in protected:
        source = Path(source).resolve()
        if dest == source or source in dest.parents:
            raise ConfigurationError(
                f"output folder {dest} is inside source model folder {source}; "
                "choose another --output"
            )
    if dest.exists() and not dest.is_dir():
        raise ConfigurationError(f"output path {dest} exists and is a file; choose a folder path")
    if dest.is_dir() and any(dest.iterdir()) and not overwrite:
        raise ConfigurationError(
            f"output folder {dest} already exists and is not empty; "
            "choose another path or allow overwriting"
        )
    parent = dest.parent
    while not parent.exists():
        parent = parent.parent
    try:  # a real probe: permissions, read-only mounts and special file systems all show here
        probe = tempfile.mkdtemp(prefix=".evomerge-probe-", dir=parent)
        os.rmdir(probe)
    except OSError as exc:
        raise ConfigurationError(
            f"cannot write under {parent} ({exc.strerror or exc}); choose a writable --output"
        ) from None
    return dest


@contextlib.contextmanager
def atomic_directory(dest: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``dest``; on success rename it to ``dest``.

    On any exception the temporary folder is removed and ``dest`` is untouched.
    """
    dest = Path(dest).resolve()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    try:
        yield tmp
        if dest.exists():
            if not overwrite and any(dest.iterdir()):
                raise ConfigurationError(
                    f"output folder {dest} appeared while writing; nothing was overwritten"
                )
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    register_created(dest)


# -- safetensors, written tensor by tensor --------------------------------------------------------

_ST_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


#: Bytes per write call: a tensor's bytes go out as views, without a ``tobytes`` copy, in pieces
#: (one write of a few hundred MB to a new file was the slowest way here).
_WRITE_CHUNK = 16 * 2**20


@dataclass(frozen=True)
class TensorPlan:
    """One tensor of an output file: its name, shape and dtype (known before computing it)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * torch.empty((), dtype=self.dtype).element_size()


class StreamingSafetensorsWriter:
    """Writes one safetensors file whose tensors arrive one at a time, in plan order.

    safetensors puts every tensor's offsets in the header, so the header is computed from the
    plan up front; then each tensor's bytes are appended as it is produced. Peak memory is one
    tensor, not the file. The format: 8-byte little-endian header length, a JSON header
    (padded with spaces to 8-byte alignment), then the raw little-endian tensor bytes.
    """

    def __init__(
        self, path: str | Path, plan: Sequence[TensorPlan], metadata: dict[str, str] | None = None
    ):
        self.path = Path(path)
        self._plan = list(plan)
        self._next = 0
        header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        for item in self._plan:
            if item.dtype not in _ST_DTYPES:
                raise MergeError(
                    f"cannot write tensor {item.name} of dtype {item.dtype} to safetensors"
                )
            header[item.name] = {
                "dtype": _ST_DTYPES[item.dtype],
                "shape": list(item.shape),
                "data_offsets": [offset, offset + item.nbytes],
            }
            offset += item.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        self._handle = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        self._handle.write(struct.pack("<Q", len(raw)))
        self._handle.write(raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        item = self._plan[self._next]
        if name != item.name or tuple(tensor.shape) != item.shape or tensor.dtype != item.dtype:
            raise MergeError(
                f"tensor {name} {list(tensor.shape)} {tensor.dtype} does not match the planned "
                f"{item.name} {list(item.shape)} {item.dtype}"
            )
        data = tensor.detach().to("cpu").contiguous().view(-1).view(torch.uint8)
        view = data.numpy().data  # a memoryview of the bytes
        for start in range(0, len(view), _WRITE_CHUNK):
            self._handle.write(view[start : start + _WRITE_CHUNK])
        self._next += 1

    def write_all(
        self, values: Sequence[tuple[TensorPlan, torch.Tensor]], dtype: torch.dtype
    ) -> None:
        """:meth:`write` each ``(plan, value)`` in order, cast to ``dtype``."""
        for item, value in values:
            self.write(item.name, value.to(dtype))

    def close(self) -> None:
        if self._next != len(self._plan):
            self._handle.close()
            raise MergeError(
                f"{self.path.name}: wrote {self._next} of {len(self._plan)} planned tensors"
            )
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()


class WriteBehind:
    """Writes a batch on a background thread while the next one is computed.

    Two output buffers take turns: a batch is computed into one while the other's tensors are
    still being written; :meth:`buffer` waits for a buffer's earlier writes before reusing it.
    Writes run in submission order; an error surfaces at the next :meth:`buffer` or :meth:`drain`.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="evomerge-writer")
        self._buffers: list[torch.Tensor | None] = [None, None]
        self._pending: list[Future[Any] | None] = [None, None]
        self._turn = 0

    def __enter__(self) -> WriteBehind:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if exc[0] is None:
                self.drain()
        finally:
            self._pool.shutdown(wait=True)

    def buffer(self, batch: Sequence[TensorPlan]) -> torch.Tensor:
        """A flat float32 buffer for ``batch`` (the one whose writes finished longest ago)."""
        count = sum(math.prod(item.shape) for item in batch)
        pending = self._pending[self._turn]
        if pending is not None:
            pending.result()
        buffer = self._buffers[self._turn]
        if buffer is None or buffer.numel() < count:
            buffer = self._buffers[self._turn] = torch.empty(
                count, dtype=torch.float32, device=self.device
            )
        return buffer[:count]

    def submit(self, write: Callable[[], Any]) -> None:
        """Run ``write`` (which reads the buffer last handed out) on the writer thread."""
        self._pending[self._turn] = self._pool.submit(write)
        self._turn ^= 1

    def drain(self) -> None:
        """Wait for every submitted write; re-raise the first error."""
        for index, pending in enumerate(self._pending):
            if pending is not None:
                self._pending[index] = None
                pending.result()


def plan_shards(plan: Sequence[TensorPlan], max_shard_bytes: int) -> list[list[TensorPlan]]:
    """Split tensors, in order, into shards of at most ``max_shard_bytes`` (one tensor may exceed
    it)."""
    shards: list[list[TensorPlan]] = [[]]
    size = 0
    for item in plan:
        if shards[-1] and size + item.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item.nbytes
    return shards


def shard_file_names(count: int) -> list[str]:
    """Hugging Face's names: ``model.safetensors`` or ``model-00001-of-00003.safetensors``."""
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def write_shard_index(
    folder: Path, shards: Sequence[Sequence[TensorPlan]], names: Sequence[str]
) -> None:
    if len(names) == 1:
        return
    weight_map = {
        item.name: file for shard, file in zip(shards, names, strict=True) for item in shard
    }
    total = sum(item.nbytes for shard in shards for item in shard)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# -- content hashes --------------------------------------------------------------------------------


def cache_root() -> Path:
    """EvoMerge's cache folder: ``$EVOMERGE_CACHE``, else ``~/.cache/evomerge``."""
    root = os.environ.get("EVOMERGE_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "evomerge"


def file_sha256(path: Path, memo_dir: Path | None = None) -> str:
    """SHA-256 of the file's bytes, memoised per (path, size, mtime) so big files hash once."""
    stat = path.stat()
    stamp = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()
    memo = memo_dir / hashlib.sha256(stamp).hexdigest() if memo_dir else None
    if memo is not None and memo.is_file():
        return memo.read_text().strip()
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 23):
            digest.update(chunk)
    if memo is not None:
        atomic_write_text(memo, digest.hexdigest())
    return digest.hexdigest()


def files_sha256(files: Sequence[Path]) -> str:
    """One SHA-256 for a set of files: over each file's name and SHA-256, in name order (so a
    model's content hash does not depend on where its folder lies)."""
    memo = cache_root() / "hash-memo"
    digest = hashlib.sha256()
    for file in sorted(files, key=lambda f: f.name):
        digest.update(f"{file.name}\0{file_sha256(file, memo)}\n".encode())
    return digest.hexdigest()
