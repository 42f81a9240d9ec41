"""GGUF in and out: read llama.cpp model files as Hugging Face folders, and ship merges as GGUF.

GGUF in (``gguf_to_hf``): a bounded parse of the header checks the file (a truncated or hostile
file fails fast with a clear error, whatever its header claims) and yields its metadata and
tensor table. Tensors are dequantised with ``gguf.quants`` (F32, F16, BF16, Q4_0, Q4_1, Q5_0,
Q5_1, Q8_0, Q2_K..Q6_K and the IQ types), renamed to Hugging Face names with
``gguf.get_tensor_name_map``, and llama's Q/K row permutation is undone; the config comes from
transformers' GGUF key table, the tokenizer from transformers' GGUF tokenizer conversion. The
result is an ordinary HF folder in a cache keyed by the file's content hash
(``$EVOMERGE_CACHE/gguf``, else ``~/.cache/evomerge/gguf``), written atomically and reused next
time. Llama-family files (llama, mistral, smollm) and qwen2 are supported; other architectures
raise ``GGUFError`` naming the architecture. (``gguf.GGUFReader`` is not used on this path: it
keeps ~1.4 KB of Python objects per metadata array element, 0.5 GB for a Llama 3 vocabulary.)

GGUF out (``export_gguf``): architecture metadata from the HF config, the tokenizer (byte-level BPE
as ``gpt2``, SentencePiece-style BPE as ``llama``, merges, special tokens, chat template), tensors
under GGUF names and layout (Q/K permuted), as f32, f16, bf16 or q8_0 -- written by
``gguf.GGUFWriter`` one tensor at a time into a temp file that is renamed when complete.

Run it::

    python -m agent_forge.evomerge.gguf_utils export MODEL_DIR OUT.gguf [--outtype q8_0]
    python -m agent_forge.evomerge.gguf_utils info FILE.gguf [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import mmap
import os
import shutil
import struct
import sys
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import gguf
import numpy as np
import torch
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
_STRING, _ARRAY, _UINT32 = 8, 9, 4

DEQUANTISABLE_TYPES = frozenset(
    {QType.F32, QType.F16, QType.BF16, QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1, QType.Q8_0}
    | {QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K, QType.TQ1_0, QType.TQ2_0}
    | {QType.IQ1_S, QType.IQ1_M, QType.IQ2_XXS, QType.IQ2_XS, QType.IQ2_S, QType.IQ3_XXS}
    | {QType.IQ3_S, QType.IQ4_NL, QType.IQ4_XS}
)
SUPPORTED_ARCHITECTURES = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}
_ARCH_OF_MODEL_TYPE = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
_PERMUTED_ARCHS = {"llama"}  # llama.cpp keeps llama's Q/K rows interleaved for its rope kernel
OUTTYPES = {"f32": QType.F32, "f16": QType.F16, "bf16": QType.BF16, "q8_0": QType.Q8_0}
_FILE_TYPES = {
    QType.F32: gguf.LlamaFileType.ALL_F32,
    QType.F16: gguf.LlamaFileType.MOSTLY_F16,
    QType.BF16: gguf.LlamaFileType.MOSTLY_BF16,
    QType.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
}
_IMPORT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_MAX_SHARD_BYTES = 1 << 30
_IGNORED_GGUF_TENSORS = {"rope_freqs.weight"}  # rope frequency factors: derived, not learned


# ----------------------------------------------------------------------------------------------
# Bounded header parse
# ----------------------------------------------------------------------------------------------


@dataclass
class _TensorEntry:
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
    tensors: list[_TensorEntry] = field(default_factory=list)
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


def _read_tensor_entry(cur: _Cursor, index: int) -> _TensorEntry:
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
    return _TensorEntry(name, qtype, tuple(reversed(dims)), offset, nbytes)


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


# ----------------------------------------------------------------------------------------------
# GGUF in
# ----------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$EVOMERGE_CACHE/gguf``, else ``~/.cache/evomerge/gguf``."""
    root = os.environ.get("EVOMERGE_CACHE")
    return Path(root) / "gguf" if root else Path.home() / ".cache" / "evomerge" / "gguf"


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
        memo.parent.mkdir(parents=True, exist_ok=True)
        memo.write_text(digest.hexdigest())
    return digest.hexdigest()


def gguf_to_hf(
    path: str | Path, cache_dir: str | Path | None = None, *, dtype: str = "float32"
) -> Path:
    """Turn a GGUF file into a cached Hugging Face model folder and return the folder.

    Args:
        path: the ``.gguf`` file.
        cache_dir: where converted folders live (default: ``default_cache_dir()``).
        dtype: the safetensors dtype, ``float32`` (exact for every quant type), ``float16`` or
            ``bfloat16``.

    Raises:
        GGUFError: the file is missing, malformed, of an unsupported architecture or quant type.
    """
    path = Path(path)
    if dtype not in _IMPORT_DTYPES:
        raise GGUFError(f"dtype {dtype!r} is not one of {sorted(_IMPORT_DTYPES)}")
    header = read_header(path)
    _check_architecture(path, header.architecture)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / f"{file_sha256(path, cache / '.hash-memo')[:32]}-{dtype}"
    if (target / "config.json").is_file():
        logger.info("GGUF %s: reusing cached conversion %s", path.name, target)
        return target
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=cache))
    try:
        _convert_gguf(header, staging, _IMPORT_DTYPES[dtype])
        try:
            staging.rename(target)
        except OSError:  # another process finished first: keep theirs
            if not (target / "config.json").is_file():
                raise
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("GGUF %s converted to %s", path.name, target)
    return target


def _check_architecture(path: Path, architecture: str | None) -> None:
    if architecture is None:
        raise GGUFError(f"{path.name}: no general.architecture in the metadata; not a model file")
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise GGUFError(
            f"{path.name}: GGUF architecture {architecture!r} is not supported; EvoMerge reads "
            f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))} files (Llama, Mistral, SmolLM, Qwen2) "
            "-- for other models pass the original Hugging Face folder instead"
        )


def _convert_gguf(header: GGUFHeader, out: Path, dtype: torch.dtype) -> None:
    """Write config, tokenizer, generation config and weights of the file into ``out``."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    config = _config_from_header(header)
    tokenizer = _tokenizer_from_file(header.path)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    config.architectures = [type(skeleton).__name__]
    config.dtype = dtype
    names = _gguf_to_hf_names(skeleton, str(header.architecture), config.num_hidden_layers)
    written = _write_shards(_hf_tensors(header, config, names, dtype), out)
    if missing := sorted(_expected_keys(skeleton, config) - written):
        raise GGUFError(f"{header.path.name}: tensors missing from the file: {missing[:5]}")
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    GenerationConfig.from_model_config(config).save_pretrained(out)
    source = {
        "source_file": header.path.name,
        "architecture": header.architecture,
        "tensor_types": Counter(t.qtype.name for t in header.tensors),
    }
    (out / "gguf_source.json").write_text(json.dumps(source, indent=2) + "\n")


def _config_from_header(header: GGUFHeader) -> Any:
    """The transformers config, read from the metadata through transformers' GGUF key table."""
    from transformers import AutoConfig
    from transformers.integrations import GGUF_CONFIG_MAPPING

    arch = str(header.architecture)
    table = cast(dict[str, dict[str, Any]], GGUF_CONFIG_MAPPING)
    values: dict[str, Any] = {}
    for section in (arch, "tokenizer"):
        for key, hf_key in table[section].items():
            value = header.metadata.get(f"{section}.{key}")
            if hf_key is not None and value is not None and not isinstance(value, GGUFArray):
                values[hf_key] = value
    tensors = {t.name: t for t in header.tensors}
    if "token_embd.weight" not in tensors:
        raise GGUFError(f"{header.path.name}: no token_embd.weight tensor; not a complete model")
    values.setdefault("vocab_size", tensors["token_embd.weight"].shape[0])
    _check_sizes(header.path.name, values, tensors)
    values["tie_word_embeddings"] = "output.weight" not in tensors
    rope = _rope_scaling_from(header.metadata, arch)
    if rope:
        values["rope_scaling"] = rope
    try:
        return AutoConfig.for_model(arch, **values)
    except (ValueError, TypeError) as err:
        raise GGUFError(f"{header.path.name}: metadata do not make a valid config: {err}") from err


def _check_sizes(file_name: str, values: dict[str, Any], tensors: dict[str, _TensorEntry]) -> None:
    """The metadata's layer count and width must match the tensors (bounds what gets built)."""
    blocks = {n.split(".")[1] for n in tensors if n.startswith("blk.")}
    layers = 1 + max((int(b) for b in blocks if b.isdigit()), default=-1)
    if values.get("num_hidden_layers") != layers:
        raise GGUFError(
            f"{file_name}: metadata say {values.get('num_hidden_layers')} layers but the file "
            f"holds tensors for {layers}; the file is inconsistent"
        )
    if values.get("hidden_size") != tensors["token_embd.weight"].shape[1]:
        raise GGUFError(
            f"{file_name}: metadata say hidden size {values.get('hidden_size')} but "
            f"token_embd.weight is {list(tensors['token_embd.weight'].shape)}; inconsistent file"
        )


def _rope_scaling_from(metadata: dict[str, Any], arch: str) -> dict[str, Any] | None:
    """Linear / YaRN rope scaling from the metadata (llama.cpp's keys), if any."""
    kind = metadata.get(f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        return None
    if kind not in ("linear", "yarn"):
        raise GGUFError(f"rope scaling {kind!r} in the GGUF metadata is not supported")
    scaling = {"rope_type": kind, "factor": float(metadata[f"{arch}.rope.scaling.factor"])}
    original = metadata.get(f"{arch}.rope.scaling.original_context_length")
    if kind == "yarn" and original is not None:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


def _tokenizer_from_file(path: Path) -> Any:
    """transformers' own GGUF tokenizer conversion (its fast metadata reader, not GGUFReader)."""
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    try:
        return TokenizersBackend.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, KeyError, OSError) as err:
        raise GGUFError(
            f"{path.name}: transformers could not rebuild the tokenizer: {err}"
        ) from err


def _gguf_to_hf_names(
    skeleton: torch.nn.Module, architecture: str, n_layers: int
) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{gguf tensor name: (HF parameter name, shape)}`` from the model's own parameters."""
    name_map = gguf.get_tensor_name_map(SUPPORTED_ARCHITECTURES[architecture], n_layers)
    mapping: dict[str, tuple[str, tuple[int, ...]]] = {}
    for hf_name, value in skeleton.state_dict().items():
        stem, _, suffix = hf_name.rpartition(".")
        gguf_name = name_map.get_name(stem)
        if gguf_name is not None:
            mapping[f"{gguf_name}.{suffix}"] = (hf_name, tuple(value.shape))
    return mapping


def _expected_keys(skeleton: torch.nn.Module, config: Any) -> set[str]:
    keys = set(skeleton.state_dict())
    if getattr(config, "tie_word_embeddings", False):
        keys.discard("lm_head.weight")
    return keys


def permute_qk(weight: np.ndarray, n_head: int, *, inverse: bool = False) -> np.ndarray:
    """Reorder Q/K rows between HF's rotate-half layout and llama.cpp's interleaved pairs.

    Each head's rows ``[x_0..x_{d/2-1}, y_0..y_{d/2-1}]`` become ``[x_0, y_0, x_1, y_1, ...]``
    (``inverse`` undoes it). Works for weights ``(n_head*d, in)`` and biases ``(n_head*d,)``.
    """
    rest = weight.shape[1:]
    half = weight.shape[0] // n_head // 2
    split = (n_head, half, 2) if inverse else (n_head, 2, half)
    return weight.reshape(*split, *rest).swapaxes(1, 2).reshape(weight.shape)


def _head_count_for(name: str, config: Any) -> int | None:
    if ".attn_q." in name:
        return config.num_attention_heads
    if ".attn_k." in name:
        return config.num_key_value_heads
    return None


def _hf_tensors(
    header: GGUFHeader,
    config: Any,
    names: dict[str, tuple[str, tuple[int, ...]]],
    dtype: torch.dtype,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Dequantised tensors under HF names, one at a time, read from a memory map of the file."""
    blob = np.memmap(header.path, mode="r", dtype=np.uint8)
    permuted = header.architecture in _PERMUTED_ARCHS
    for entry in header.tensors:
        target = names.get(entry.name)
        if target is None:
            if entry.name in _IGNORED_GGUF_TENSORS:
                logger.warning(
                    "GGUF tensor %s (Llama 3.1-style rope scaling) ignored, as transformers' own "
                    "GGUF loader does: the imported config uses plain rope",
                    entry.name,
                )
                continue
            raise GGUFError(f"GGUF tensor {entry.name!r} has no Hugging Face counterpart")
        hf_name, shape = target
        if entry.shape != shape:
            raise GGUFError(
                f"{header.path.name}: tensor {entry.name} has shape {list(entry.shape)} but the "
                f"metadata imply {list(shape)}; the file is inconsistent"
            )
        start = header.data_start + entry.offset
        rows = math.prod(entry.shape[:-1])  # (rows, bytes per row), as gguf.quants expects
        raw = blob[start : start + entry.nbytes].reshape(rows, -1)
        values = gguf.quants.dequantize(raw, entry.qtype).reshape(entry.shape)
        heads = _head_count_for(entry.name, config) if permuted else None
        if heads is not None:
            values = permute_qk(values, heads, inverse=True)
        yield hf_name, torch.from_numpy(np.require(values, np.float32, ["C", "W"])).to(dtype)


def _write_shards(tensors: Iterable[tuple[str, torch.Tensor]], out: Path) -> set[str]:
    """Save tensors as safetensors shards of at most ``_MAX_SHARD_BYTES``; return their names."""
    files: list[Path] = []
    groups: list[list[str]] = []
    pending: dict[str, torch.Tensor] = {}
    pending_bytes = total = 0
    for name, tensor in tensors:
        if pending and pending_bytes + tensor.nbytes > _MAX_SHARD_BYTES:
            files.append(_save_part(pending, out / f"part-{len(files):05d}.safetensors"))
            groups.append(list(pending))
            pending, pending_bytes = {}, 0
        pending[name] = tensor
        pending_bytes += tensor.nbytes
        total += tensor.nbytes
    files.append(_save_part(pending, out / f"part-{len(files):05d}.safetensors"))
    groups.append(list(pending))
    _name_shards(files, groups, total, out)
    return {name for group in groups for name in group}


def _save_part(tensors: dict[str, torch.Tensor], file: Path) -> Path:
    from safetensors.torch import save_file

    save_file(tensors, file, metadata={"format": "pt"})
    return file


def _name_shards(files: list[Path], groups: list[list[str]], total: int, out: Path) -> None:
    """Give the parts Hugging Face's names, with an index when there is more than one."""
    if len(files) == 1:
        files[0].rename(out / "model.safetensors")
        return
    weight_map = {}
    for index, (file, names) in enumerate(zip(files, groups, strict=True), start=1):
        final = f"model-{index:05d}-of-{len(files):05d}.safetensors"
        file.rename(out / final)
        weight_map.update(dict.fromkeys(names, final))
    index_doc = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index_doc, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------
# GGUF out
# ----------------------------------------------------------------------------------------------


def export_gguf(model_dir: str | Path, out_path: str | Path, outtype: str = "f16") -> Path:
    """Write the HF model in ``model_dir`` (llama, mistral or qwen2) as a GGUF file.

    Args:
        model_dir: a folder with ``config.json``, safetensors weights and a tokenizer.
        out_path: the ``.gguf`` file to write (its folder is created if needed).
        outtype: ``f32``, ``f16`` (default), ``bf16`` or ``q8_0``; 1-D tensors (norms) stay F32.

    Returns:
        ``out_path``, written atomically.

    Raises:
        GGUFError: unsupported architecture, tokenizer or rope scaling; missing weights.
    """
    model_dir, out_path = Path(model_dir), Path(out_path)
    if outtype not in OUTTYPES:
        raise GGUFError(f"outtype {outtype!r} is not one of {', '.join(OUTTYPES)}")
    config = _load_hf_config(model_dir)
    arch = _ARCH_OF_MODEL_TYPE[config.model_type]
    sources = _safetensors_files(model_dir)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    temp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    try:
        writer = gguf.GGUFWriter(temp, arch)
        _add_model_metadata(writer, config, model_dir, OUTTYPES[outtype])
        _add_tokenizer(writer, model_dir, config)
        _write_tensors(writer, config, arch, sources, OUTTYPES[outtype])
        writer.close()
        os.replace(temp, out_path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    logger.info("wrote %s (%s, %.1f MB)", out_path, outtype, out_path.stat().st_size / 1e6)
    return out_path


def _load_hf_config(model_dir: Path) -> Any:
    from transformers import AutoConfig

    if not (model_dir / "config.json").is_file():
        raise GGUFError(f"{model_dir} has no config.json; pass a Hugging Face model folder")
    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (ValueError, OSError) as err:
        raise GGUFError(f"{model_dir}/config.json could not be read: {err}") from err
    if config.model_type not in _ARCH_OF_MODEL_TYPE:
        raise GGUFError(
            f"model type {config.model_type!r} cannot be exported to GGUF; supported: "
            f"{', '.join(sorted(_ARCH_OF_MODEL_TYPE))}"
        )
    return config


def _safetensors_files(model_dir: Path) -> dict[str, Path]:
    """``{tensor name: file}`` for the folder's safetensors weights (single file or sharded)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / file for name, file in weight_map.items()}
    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise GGUFError(
            f"{model_dir} has no safetensors weights; re-save the model with save_pretrained "
            "(pickled .bin checkpoints are not read)"
        )
    from safetensors import safe_open

    with safe_open(single, framework="pt") as handle:
        return dict.fromkeys(handle.keys(), single)


def _rope(config: Any) -> tuple[float, dict[str, Any]]:
    """(theta, scaling parameters) from a transformers 4 or 5 config."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = getattr(config, "rope_scaling", None) or {}
    params = {**scaling, **params}
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    return float(theta), params


def _add_model_metadata(
    writer: gguf.GGUFWriter, config: Any, model_dir: Path, qtype: QType
) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_type("model")
    writer.add_name(Path(getattr(config, "_name_or_path", "") or model_dir.name).name or "model")
    writer.add_file_type(_FILE_TYPES[qtype])
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    if head_dim * config.num_attention_heads != config.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    theta, params = _rope(config)
    writer.add_rope_freq_base(theta)
    _add_rope_scaling(writer, params)


def _add_rope_scaling(writer: gguf.GGUFWriter, params: dict[str, Any]) -> None:
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in ("default", None):
        return
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(params["factor"]))
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(params["factor"]))
        if "original_max_position_embeddings" in params:
            writer.add_rope_scaling_orig_ctx_len(int(params["original_max_position_embeddings"]))
    elif kind != "llama3":  # llama3 travels as the rope_freqs tensor, see _rope_freqs
        raise GGUFError(
            f"rope scaling {kind!r} cannot be exported to GGUF (default, linear, yarn, llama3 can)"
        )


def _rope_freqs(config: Any) -> torch.Tensor | None:
    """Llama 3.1-style rope: llama.cpp divides each base frequency by these factors."""
    theta, params = _rope(config)
    if params.get("rope_type", params.get("type")) != "llama3":
        return None
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    dim = scaled.numel() * 2
    base = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    return (base / scaled.float()).float()


# --- tokenizer ---------------------------------------------------------------------------------


def _load_fast_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (ValueError, OSError) as err:
        raise GGUFError(
            f"{model_dir}: tokenizer could not be loaded ({err}); save one beside the model"
        ) from err
    if not getattr(tokenizer, "is_fast", False):
        raise GGUFError(f"{model_dir}: only fast (tokenizers-backed) tokenizers can be exported")
    return tokenizer


def _pre_tokenizer_name(pre: dict[str, Any] | None) -> str:
    """llama.cpp's name for a byte-level BPE pre-tokenizer (``tokenizer.ggml.pre``)."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    pre = pre or {}
    kind = pre.get("type")
    parts = pre.get("pretokenizers", []) if kind == "Sequence" else []
    kinds = [p.get("type") for p in parts]
    if kind == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"]:
        regex = parts[0].get("pattern", {}).get("Regex")
        preferred = ["llama-bpe", "qwen2", "gpt-4o", "tekken", "qwen35"]
        names = [n for n, split in GGUF_PRE_TOKENIZER_SPLITS.items() if split == regex]
        for name in sorted(names, key=lambda n: preferred.index(n) if n in preferred else 99):
            return name
    logger.warning(
        "unrecognised pre-tokenizer %s; writing 'gpt-2' (llama.cpp may split text differently)", pre
    )
    return "gpt-2"


def _is_sentencepiece(spec: dict[str, Any]) -> bool:
    """SentencePiece-style BPE: byte fallback, or words marked with ``▁`` instead of bytes."""
    text = json.dumps([spec.get("pre_tokenizer"), spec.get("normalizer")], ensure_ascii=False)
    return bool(spec["model"].get("byte_fallback")) or "Metaspace" in text or "\u2581" in text


def _adds_space_prefix(spec: dict[str, Any]) -> bool:
    """Whether the tokenizer puts ``▁`` before the text (Metaspace's scheme or a Prepend)."""
    text = json.dumps([spec.get("pre_tokenizer"), spec.get("normalizer")], ensure_ascii=False)
    return (
        '"prepend_scheme": "first"' in text
        or '"prepend_scheme": "always"' in text
        or ('"Prepend"' in text)
    )


def _merge_pairs(spec: dict[str, Any]) -> list[tuple[str, str]]:
    pairs = [
        tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["model"]["merges"]
    ]
    if any(len(p) != 2 or " " in p[0] or " " in p[1] for p in pairs):
        raise GGUFError("tokenizer merges contain spaces inside tokens; GGUF cannot store them")
    return pairs  # type: ignore[return-value]


def _vocabulary(tokenizer: Any, spec: dict[str, Any], n_vocab: int) -> tuple[list[str], list[int]]:
    """Token strings by id (padded to the embedding size) and their llama.cpp token types."""
    T = gguf.TokenType
    tokens, types = [f"[PAD{i}]" for i in range(n_vocab)], [int(T.UNUSED)] * n_vocab
    for token, index in tokenizer.get_vocab().items():
        if index >= n_vocab:
            raise GGUFError(
                f"token {token!r} has id {index} but the model embeds only {n_vocab} ids"
            )
        tokens[index], types[index] = token, int(T.NORMAL)
    for index, added in tokenizer.added_tokens_decoder.items():
        types[index] = int(T.CONTROL if added.special else T.USER_DEFINED)
    if _is_sentencepiece(spec):
        for index, token in enumerate(tokens):
            if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                types[index] = int(T.BYTE)
        if tokenizer.unk_token_id is not None:
            types[tokenizer.unk_token_id] = int(T.UNKNOWN)
    return tokens, types


def _merge_scores(tokens: list[str], merges: list[tuple[str, str]]) -> list[float]:
    """SentencePiece scores for llama.cpp: earlier merges score higher (``-rank``)."""
    rank: dict[str, int] = {}
    for index, (left, right) in enumerate(merges):
        rank.setdefault(left + right, index)
    return [-float(rank[t]) if t in rank else 0.0 for t in tokens]


def _special_flags(tokenizer: Any) -> dict[str, bool]:
    """Whether encoding adds BOS / EOS, measured rather than read from config files."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    extra = len(with_special) > len(plain)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return {
        "bos": bool(extra and bos is not None and with_special[0] == bos),
        "eos": bool(extra and eos is not None and with_special[-1] == eos),
    }


def _add_tokenizer(writer: gguf.GGUFWriter, model_dir: Path, config: Any) -> None:
    tokenizer = _load_fast_tokenizer(model_dir)
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE":
        raise GGUFError(
            f"tokenizer model {spec['model']['type']!r} cannot be exported; GGUF export handles "
            "BPE tokenizers (byte-level 'gpt2' or SentencePiece-style 'llama')"
        )
    tokens, types = _vocabulary(tokenizer, spec, config.vocab_size)
    merges = _merge_pairs(spec)
    if _is_sentencepiece(spec):
        writer.add_tokenizer_model("llama")
        writer.add_token_scores(_merge_scores(tokens, merges))
        writer.add_add_space_prefix(_adds_space_prefix(spec))
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_pre_tokenizer_name(spec.get("pre_tokenizer")))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([f"{left} {right}" for left, right in merges])
    _add_special_tokens(writer, tokenizer, config)


def _add_special_tokens(writer: gguf.GGUFWriter, tokenizer: Any, config: Any) -> None:
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is None:
            token_id = getattr(config, f"{kind}_token_id", None)
        if isinstance(token_id, list):
            token_id = token_id[0] if token_id else None
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(int(token_id))
    flags = _special_flags(tokenizer)
    writer.add_add_bos_token(flags["bos"])
    writer.add_add_eos_token(flags["eos"])
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)


# --- tensors -------------------------------------------------------------------------------------


@dataclass
class _OutTensor:
    hf_name: str | None  # None for tensors computed here (rope_freqs)
    gguf_name: str
    shape: tuple[int, ...]
    qtype: QType


def _tensor_plan(
    config: Any, arch: str, sources: dict[str, Path], outtype: QType
) -> list[_OutTensor]:
    from safetensors import safe_open

    name_map = gguf.get_tensor_name_map(SUPPORTED_ARCHITECTURES[arch], config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    plan: list[_OutTensor] = []
    for file in sorted(set(sources.values())):
        with safe_open(file, framework="pt") as handle:
            for hf_name in handle.keys():
                if hf_name.endswith("rotary_emb.inv_freq") or (
                    tied and hf_name == "lm_head.weight"
                ):
                    continue
                stem, _, suffix = hf_name.rpartition(".")
                gguf_stem = name_map.get_name(stem)
                if gguf_stem is None:
                    raise GGUFError(f"tensor {hf_name!r} has no GGUF name for architecture {arch}")
                shape = tuple(handle.get_slice(hf_name).get_shape())
                plan.append(
                    _OutTensor(hf_name, f"{gguf_stem}.{suffix}", shape, _pick_type(shape, outtype))
                )
    if not tied and "lm_head.weight" not in sources:
        raise GGUFError("config says embeddings are untied but lm_head.weight is missing")
    plan.sort(key=_tensor_order)
    if (freqs := _rope_freqs(config)) is not None:
        plan.append(_OutTensor(None, "rope_freqs.weight", tuple(freqs.shape), QType.F32))
    return plan


def _tensor_order(entry: _OutTensor) -> tuple[int, str]:
    parts = entry.gguf_name.split(".")
    if parts[0] == "blk":
        return int(parts[1]), entry.gguf_name
    return (-1 if parts[0] == "token_embd" else 1 << 30), entry.gguf_name


def _pick_type(shape: tuple[int, ...], outtype: QType) -> QType:
    if len(shape) < 2:
        return QType.F32  # norms and biases stay exact, as llama.cpp expects
    block, _ = gguf.GGML_QUANT_SIZES[outtype]
    if shape[-1] % block:
        logger.warning("rows of %d are not whole %s blocks; writing F16", shape[-1], outtype.name)
        return QType.F16
    return outtype


def _encode(values: np.ndarray, qtype: QType) -> np.ndarray:
    if qtype == QType.F32:
        return values.astype(np.float32, copy=False)
    if qtype == QType.F16:
        return values.astype(np.float16)
    return gguf.quants.quantize(values, qtype)


def _write_tensors(
    writer: gguf.GGUFWriter, config: Any, arch: str, sources: dict[str, Path], outtype: QType
) -> None:
    """Tensor table first, then the data one tensor at a time (peak memory: one tensor)."""
    plan = _tensor_plan(config, arch, sources, outtype)
    for entry in plan:
        block, type_size = gguf.GGML_QUANT_SIZES[entry.qtype]
        nbytes = math.prod(entry.shape) // block * type_size
        writer.add_tensor_info(
            entry.gguf_name, entry.shape, np.dtype(np.float32), nbytes, entry.qtype
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    permuted = arch in _PERMUTED_ARCHS
    for entry in plan:
        values = _source_values(entry, sources, config)
        heads = _head_count_for(entry.gguf_name, config) if permuted else None
        if heads is not None:
            values = permute_qk(values, heads)
        writer.write_tensor_data(_encode(values, entry.qtype))


def _source_values(entry: _OutTensor, sources: dict[str, Path], config: Any) -> np.ndarray:
    """One tensor as float32, read from its safetensors file (or computed, for rope_freqs)."""
    from safetensors import safe_open

    if entry.hf_name is None:
        freqs = _rope_freqs(config)
        if freqs is None:
            raise GGUFError(f"no values for computed tensor {entry.gguf_name}")
        return freqs.numpy()
    with safe_open(sources[entry.hf_name], framework="pt") as handle:
        return handle.get_tensor(entry.hf_name).float().numpy()


# ----------------------------------------------------------------------------------------------
# Info and command line
# ----------------------------------------------------------------------------------------------


def gguf_info(path: str | Path) -> dict[str, Any]:
    """A quick look at a GGUF file (from the bounded header parse alone; no tensor is read).

    Returns:
        architecture, whether EvoMerge can import it, parameter count, tensor types (counts),
        layer/width/head figures, tied embeddings, tokenizer kind and size, and more.

    Raises:
        GGUFError: the file is missing or malformed.
    """
    header = read_header(path)
    meta, arch = header.metadata, header.architecture or "?"
    names = {t.name for t in header.tensors}
    return {
        "path": str(header.path),
        "file_size": header.path.stat().st_size,
        "gguf_version": header.version,
        "architecture": arch,
        "supported": arch in SUPPORTED_ARCHITECTURES,
        "name": meta.get("general.name"),
        "file_type": meta.get("general.file_type"),
        "parameter_count": sum(math.prod(t.shape) for t in header.tensors),
        "tensor_count": len(header.tensors),
        "tensor_types": dict(Counter(t.qtype.name for t in header.tensors).most_common()),
        "block_count": meta.get(f"{arch}.block_count"),
        "embedding_length": meta.get(f"{arch}.embedding_length"),
        "head_count": meta.get(f"{arch}.attention.head_count"),
        "head_count_kv": meta.get(f"{arch}.attention.head_count_kv"),
        "context_length": meta.get(f"{arch}.context_length"),
        "tied_embeddings": "output.weight" not in names,
        "tokenizer": {
            "model": meta.get("tokenizer.ggml.model"),
            "pre": meta.get("tokenizer.ggml.pre"),
            "size": header.length_of("tokenizer.ggml.tokens"),
            "merges": header.length_of("tokenizer.ggml.merges"),
            "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
            "chat_template": "tokenizer.chat_template" in meta,
        },
    }


def _format_info(info: dict[str, Any]) -> str:
    tok = info["tokenizer"]
    types = ", ".join(f"{name} x{count}" for name, count in info["tensor_types"].items())
    lines = [
        f"file:          {info['path']} "
        f"({info['file_size'] / 1e6:.1f} MB, GGUF v{info['gguf_version']})",
        f"architecture:  {info['architecture']}"
        + ("" if info["supported"] else " (not supported)"),
        f"name:          {info['name']}",
        f"parameters:    {info['parameter_count']:,} in {info['tensor_count']} tensors",
        f"tensor types:  {types}",
        f"layers:        {info['block_count']}, hidden {info['embedding_length']}, "
        f"heads {info['head_count']}/{info['head_count_kv']} (q/kv), "
        f"context {info['context_length']}",
        f"embeddings:    {'tied' if info['tied_embeddings'] else 'untied'}",
        f"tokenizer:     {tok['model']} (pre {tok['pre']}), {tok['size']} tokens, "
        f"{tok['merges']} merges, "
        f"bos {tok['bos_token_id']}, eos {tok['eos_token_id']}, "
        f"chat template {'yes' if tok['chat_template'] else 'no'}",
    ]
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m agent_forge.evomerge.gguf_utils", description=__doc__.split("\n")[0]
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    export = commands.add_parser("export", help="write a Hugging Face model folder as GGUF")
    export.add_argument("model_dir")
    export.add_argument("out_path")
    export.add_argument("--outtype", choices=sorted(OUTTYPES), default="f16")
    info = commands.add_parser("info", help="show what a GGUF file holds")
    info.add_argument("path")
    info.add_argument("--json", action="store_true", help="print JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``export MODEL_DIR OUT.gguf [--outtype ...]`` or ``info FILE [--json]``."""
    args = _build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s"
    )
    try:
        if args.command == "export":
            out = export_gguf(args.model_dir, args.out_path, args.outtype)
            print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {args.outtype})")
        else:
            info = gguf_info(args.path)
            print(json.dumps(info, indent=2) if args.json else _format_info(info))
    except GGUFError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
