"""The bounded GGUF header parse: metadata and tensor table, checked before anything is read.

``read_header`` walks a memory-mapped file front to back and refuses whatever a truncated,
corrupt or hostile header claims beyond the limits below, so a bad file fails fast with a clear
``GGUFError`` in bounded memory and time. ``is_gguf_path`` tells GGUF files from model folders.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
from gguf import GGMLQuantizationType as QType

from .exceptions import GGUFError

logger = logging.getLogger(__name__)

# Limits of the bounded header parse. Real files stay far below them: models have at most a few
# thousand tensors, and the largest vocabularies in use (~262k tokens, ~450k merges) need well
# under 2**21 array elements in all. The parse keeps only scalars and strings (arrays are walked,
# not stored), so its memory is independent of what the header claims; its time is linear in the
# header's size. Only tokenizer.ggml.tokens/merges are read in full later (by transformers).
_GGUF_MAGIC = b"GGUF"
_GGUF_VERSIONS = (2, 3)
_MAX_TENSORS = 1 << 20
_MAX_KV = 1 << 16
_MAX_ARRAY_LEN = 1 << 21
_MAX_ARRAY_ELEMENTS = 1 << 22  # summed over the whole header
_MAX_TENSOR_NAME = 4096
_MAX_KEPT_STRING = 1 << 20  # longer metadata strings are walked over, not kept
_MAX_DIMS = 4
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?"}
_SCALAR_FORMATS.update({10: "<Q", 11: "<q", 12: "<d"})
_STRING, _ARRAY = 8, 9

DEQUANTISABLE_TYPES = frozenset(
    {QType.F32, QType.F16, QType.BF16, QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1, QType.Q8_0}
    | {QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K, QType.TQ1_0, QType.TQ2_0}
    | {QType.IQ1_S, QType.IQ1_M, QType.IQ2_XXS, QType.IQ2_XS, QType.IQ2_S, QType.IQ3_XXS}
    | {QType.IQ3_S, QType.IQ4_NL, QType.IQ4_XS}
)


@dataclass
class TensorEntry:
    """One row of the tensor table: where a tensor's bytes lie and how to read them."""

    name: str
    qtype: QType
    shape: tuple[int, ...]  # torch order (slowest dimension first)
    offset: int  # from the start of the data section
    nbytes: int


@dataclass(frozen=True)
class GGUFArray:
    """A metadata array, summarised: its element type and length (contents are not kept)."""

    element_type: int
    length: int


@dataclass
class GGUFHeader:
    """What a bounded parse of a GGUF header found: metadata, tensor table, data offset."""

    path: Path
    version: int
    metadata: dict[str, Any] = field(default_factory=dict)
    tensors: list[TensorEntry] = field(default_factory=list)
    alignment: int = gguf.GGUF_DEFAULT_ALIGNMENT
    data_start: int = 0
    array_elements: int = 0

    @property
    def architecture(self) -> str | None:
        value = self.metadata.get("general.architecture")
        return value if isinstance(value, str) else None

    def length_of(self, key: str) -> int:
        value = self.metadata.get(key)
        return value.length if isinstance(value, GGUFArray) else 0


class _Cursor:
    """Reads a memory-mapped header front to back, refusing to run past the end of the file."""

    def __init__(self, buf: mmap.mmap, name: str) -> None:
        self.buf, self.name, self.pos, self.size = buf, name, 0, len(buf)

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise GGUFError(
                f"{self.name}: {what} needs {n} bytes at offset {self.pos} but the file has only "
                f"{self.size - self.pos} left; the file is truncated or corrupt -- fetch it again"
            )

    def unpack(self, fmt: str, what: str) -> Any:
        size = struct.calcsize(fmt)
        self.need(size, what)
        values = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return values[0] if len(values) == 1 else values

    def string(self, what: str, limit: int | None = None, keep: int = _MAX_KEPT_STRING) -> str:
        length = self.unpack("<Q", what)
        if limit is not None and length > limit:
            raise GGUFError(
                f"{self.name}: {what} claims a {length}-byte string (limit {limit}); "
                "the header is corrupt or hostile"
            )
        self.need(length, f"{what} ({length}-byte string)")
        start, self.pos = self.pos, self.pos + length
        if length > keep:
            return f"<{length}-byte string>"
        try:
            return bytes(self.buf[start : self.pos]).decode("utf-8")
        except UnicodeDecodeError as err:
            raise GGUFError(f"{self.name}: {what} is not valid UTF-8; the file is corrupt") from err


def _read_value(cur: _Cursor, header: GGUFHeader, vtype: int, what: str, depth: int = 0) -> Any:
    """One metadata value: a scalar, a string, or (walked over) a ``GGUFArray``."""
    if vtype in _SCALAR_FORMATS:
        return cur.unpack(_SCALAR_FORMATS[vtype], what)
    if vtype == _STRING:
        return cur.string(what, keep=_MAX_KEPT_STRING if depth == 0 else 0)
    if vtype != _ARRAY or depth > 1:
        raise GGUFError(f"{cur.name}: {what} has unknown value type {vtype}; the file is corrupt")
    itype, count = cur.unpack("<IQ", f"{what} (array header)")
    header.array_elements += count
    if count > _MAX_ARRAY_LEN or header.array_elements > _MAX_ARRAY_ELEMENTS:
        raise GGUFError(
            f"{cur.name}: {what} claims an array of {count} elements (limit {_MAX_ARRAY_LEN}, "
            f"{_MAX_ARRAY_ELEMENTS} in all); the header is corrupt or hostile"
        )
    if itype in _SCALAR_FORMATS:
        cur.need(count * struct.calcsize(_SCALAR_FORMATS[itype]), f"{what} ({count} elements)")
        cur.pos += count * struct.calcsize(_SCALAR_FORMATS[itype])
    else:
        cur.need(count * 8, f"{what} ({count} elements)")  # each element takes 8 bytes or more
        for _ in range(count):
            _read_value(cur, header, itype, what, depth + 1)
    return GGUFArray(itype, count)


def _read_kv(cur: _Cursor, header: GGUFHeader, kv_count: int) -> None:
    for index in range(kv_count):
        key = cur.string(f"metadata key #{index}", limit=1 << 16)
        vtype = cur.unpack("<I", f"type of {key!r}")
        if key in header.metadata:
            raise GGUFError(f"{cur.name}: metadata key {key!r} appears twice; the file is corrupt")
        header.metadata[key] = _read_value(cur, header, vtype, f"metadata {key!r}")
    alignment = header.metadata.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFError(f"{cur.name}: alignment {alignment!r} is not a power of two; corrupt")
    header.alignment = alignment


def _read_tensor_entry(cur: _Cursor, index: int) -> TensorEntry:
    name = cur.string(f"name of tensor #{index}", limit=_MAX_TENSOR_NAME)
    n_dims = cur.unpack("<I", f"dimension count of {name!r}")
    if not 1 <= n_dims <= _MAX_DIMS:
        raise GGUFError(f"{cur.name}: tensor {name!r} claims {n_dims} dimensions (1..{_MAX_DIMS})")
    dims = cur.unpack(f"<{n_dims}Q", f"dimensions of {name!r}")
    dims = (dims,) if n_dims == 1 else tuple(dims)
    raw_type, offset = cur.unpack("<IQ", f"type and offset of {name!r}")
    if any(d == 0 or d > 1 << 40 for d in dims) or math.prod(dims) > 1 << 48:
        raise GGUFError(f"{cur.name}: tensor {name!r} has absurd dimensions {list(dims)}")
    qtype = _checked_type(cur.name, name, raw_type)
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if dims[0] % block:
        raise GGUFError(
            f"{cur.name}: tensor {name!r} rows of {dims[0]} are not whole {qtype.name} blocks"
        )
    nbytes = math.prod(dims) // block * type_size
    return TensorEntry(name, qtype, tuple(reversed(dims)), offset, nbytes)


def _checked_type(file_name: str, tensor: str, raw_type: int) -> QType:
    supported = ", ".join(sorted(t.name for t in DEQUANTISABLE_TYPES))
    try:
        qtype = QType(raw_type)
    except ValueError:
        raise GGUFError(
            f"{file_name}: tensor {tensor!r} uses unknown ggml type {raw_type}; the file is "
            f"corrupt or newer than the installed gguf package (supported: {supported})"
        ) from None
    if qtype not in DEQUANTISABLE_TYPES:
        raise GGUFError(
            f"{file_name}: tensor {tensor!r} is stored as {qtype.name}, which EvoMerge cannot "
            f"dequantise; re-quantise the model to one of: {supported}"
        )
    return qtype


def _check_tensor_table(cur: _Cursor, header: GGUFHeader) -> None:
    seen: set[str] = set()
    pad = header.alignment
    header.data_start = (cur.pos + pad - 1) // pad * pad
    for entry in header.tensors:
        if entry.name in seen:
            raise GGUFError(f"{cur.name}: tensor {entry.name!r} appears twice; the file is corrupt")
        seen.add(entry.name)
        if entry.offset % pad:
            raise GGUFError(f"{cur.name}: tensor {entry.name!r} is not {pad}-byte aligned")
        end = header.data_start + entry.offset + entry.nbytes
        if end > cur.size:
            raise GGUFError(
                f"{cur.name}: tensor {entry.name!r} ends at byte {end} but the file has "
                f"{cur.size} bytes; the file is truncated -- fetch it again"
            )


def read_header(path: str | Path) -> GGUFHeader:
    """Parse and check a GGUF header within bounded memory and time.

    Raises:
        GGUFError: missing file, bad magic or version, truncation, absurd counts or lengths,
            duplicate names, or a tensor type gguf-py cannot dequantise.
    """
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"GGUF file {path} does not exist or is not a file; check the path")
    size = path.stat().st_size
    if size < 24:
        raise GGUFError(f"{path.name}: only {size} bytes, too short for a GGUF header; truncated")
    with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if bytes(buf[:4]) != _GGUF_MAGIC:
            raise GGUFError(
                f"{path.name}: bad magic {bytes(buf[:4])!r} (expected b'GGUF'); not a GGUF file"
            )
        cur = _Cursor(buf, path.name)
        cur.pos = 4
        header = GGUFHeader(path, version=cur.unpack("<I", "version"))
        if header.version not in _GGUF_VERSIONS:
            raise GGUFError(
                f"{path.name}: GGUF version {header.version} is not supported (supported: 2, 3; "
                "big-endian files are not); convert the model with a current llama.cpp"
            )
        tensor_count, kv_count = cur.unpack("<QQ", "tensor and metadata counts")
        if tensor_count > _MAX_TENSORS or tensor_count * 24 > size:
            raise GGUFError(
                f"{path.name}: header claims {tensor_count} tensors; corrupt or hostile"
            )
        if kv_count > _MAX_KV or kv_count * 13 > size:
            raise GGUFError(f"{path.name}: header claims {kv_count} metadata entries; corrupt")
        _read_kv(cur, header, kv_count)
        header.tensors = [_read_tensor_entry(cur, i) for i in range(tensor_count)]
        _check_tensor_table(cur, header)
    return header


def is_gguf_path(path: object) -> bool:
    """Whether ``path`` names a GGUF file: a ``.gguf`` suffix, or a file with the GGUF magic."""
    if not isinstance(path, (str, os.PathLike)):
        return False
    candidate = Path(path)
    if candidate.suffix.lower() == ".gguf":
        return True
    try:
        with candidate.open("rb") as handle:
            return handle.read(4) == _GGUF_MAGIC
    except OSError:
        return False
