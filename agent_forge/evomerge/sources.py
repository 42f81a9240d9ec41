"""Model sources: find a model (folder, Hugging Face id, GGUF file) and read its tensors lazily.

A :class:`ModelSource` holds a model's config and the map from tensor name to safetensors
file; opening three 1 GB models reads their headers only. Tensor bytes are read with plain
positioned reads straight into the caller's buffer (:meth:`ModelSource.read_into`): no memory
map stays behind to count in the process's resident memory, and no intermediate copy is made.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import struct
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .exceptions import IncompatibleModelsError, MergeError, ModelLoadError
from .storage import files_sha256

logger = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
_WEIGHT_PATTERNS = [
    "*.safetensors",
    "*.safetensors.index.json",
    "*.json",
    "*.model",
    "*.txt",
    "*.tiktoken",
]
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
#: Largest single read (some systems cap one read call near 2 GiB).
_READ_CHUNK = 1 << 30


def resolve_model_path(
    path: str, *, allow_pickle: bool = False, cache_dir: str | Path | None = None
) -> Path:
    """Turn a local folder, a ``.gguf`` file or a Hugging Face id into a local model folder.

    Raises:
        ModelLoadError: the path does not exist, or the hub id is not cached and the hub is
            unreachable (fails in seconds, with how to pre-download it).
    """
    candidate = Path(path).expanduser()
    if candidate.is_dir():
        return candidate.resolve()
    if candidate.suffix.lower() == ".gguf":
        if not candidate.is_file():
            raise ModelLoadError(f"GGUF file {candidate} does not exist; check the path")
        from .gguf_utils import gguf_to_hf

        return Path(gguf_to_hf(candidate))
    if candidate.exists():
        raise ModelLoadError(
            f"{candidate} is a file, not a model folder; pass a folder with config.json and "
            "safetensors weights, a .gguf file, or a Hugging Face id"
        )
    looks_local = path.startswith((".", "/", "~")) or os.sep in path.rstrip("/").split("/", 1)[-1]
    if looks_local or not _HUB_ID.match(path) or path.count("/") > 1:
        raise ModelLoadError(
            f"model path {path} does not exist; "
            "pass an existing folder, a .gguf file, or a Hugging Face id"
        )
    return _resolve_hub_id(path, allow_pickle=allow_pickle, cache_dir=cache_dir)


def _resolve_hub_id(repo_id: str, *, allow_pickle: bool, cache_dir: str | Path | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = _WEIGHT_PATTERNS + (["*.bin", "*.bin.index.json"] if allow_pickle else [])
    try:
        return Path(
            snapshot_download(
                repo_id, cache_dir=cache_dir, local_files_only=True, allow_patterns=patterns
            )
        )
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    how = (
        f"download it where the hub is reachable (`huggingface-cli download {repo_id}`) and copy "
        "the Hugging Face cache here, or pass a local folder"
    )
    if offline:
        raise ModelLoadError(
            f"model {repo_id} is not available offline (not in the Hugging Face cache); {how}"
        )
    try:
        logger.info("%s is not in the local Hugging Face cache; trying the hub", repo_id)
        return Path(
            snapshot_download(repo_id, cache_dir=cache_dir, allow_patterns=patterns, etag_timeout=5)
        )
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0][:160]
        raise ModelLoadError(
            f"model {repo_id} is not available offline "
            f"(not cached, and the hub is unreachable: {reason}); {how}"
        ) from None


def find_weight_files(folder: Path, *, allow_pickle: bool = False) -> tuple[dict[str, Path], str]:
    """Map each tensor name to its file. Returns the map and the format ("safetensors"/"pickle").

    Raises:
        ModelLoadError: no weights, or only pickled ``.bin`` weights without ``allow_pickle``.
    """
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}, "safetensors"
    files = sorted(folder.glob("*.safetensors"))
    if files:
        mapping: dict[str, Path] = {}
        for file in files:
            with open_safetensors(file) as handle:
                for name in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                    mapping[name] = file
        return mapping, "safetensors"
    pickled = (
        sorted(folder.glob("*.bin")) + sorted(folder.glob("*.pt")) + sorted(folder.glob("*.pth"))
    )
    if pickled:
        if not allow_pickle:
            raise ModelLoadError(
                f"{folder} has only pickled weights ({pickled[0].name}); pickle can run code when "
                "loaded. Convert the model to safetensors, "
                "or opt in with merge_settings.allow_pickle = true"
            )
        return {name: file for file in pickled for name in _pickle_state(file)}, "pickle"
    raise ModelLoadError(
        f"{folder} holds no model weights (*.safetensors); pass a Hugging Face model folder"
    )


def open_safetensors(file: Path) -> Any:
    """``safe_open`` with a damaged or missing file reported as ModelLoadError."""
    try:
        return safe_open(str(file), framework="pt")
    except Exception as exc:  # safetensors raises its own SafetensorError / OSError
        raise ModelLoadError(
            f"cannot read {file}: {str(exc).splitlines()[0]}; the file is damaged or incomplete "
            "(re-download or re-save the model)"
        ) from None


_pickle_cache: dict[Path, dict[str, torch.Tensor]] = {}


def _pickle_state(file: Path) -> dict[str, torch.Tensor]:
    if file not in _pickle_cache:
        logger.warning("loading pickled weights from %s (allowed by configuration)", file)
        _pickle_cache[file] = torch.load(file, map_location="cpu", weights_only=True)
    return _pickle_cache[file]


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class _Entry:
    """Where one tensor's bytes lie in its safetensors file."""

    info: TensorInfo
    start: int
    stop: int


@dataclass
class ModelSource:
    """One input model: its folder, config, and lazily read tensors."""

    name: str
    path: str
    folder: Path
    config: dict[str, Any]
    weight_files: dict[str, Path]
    weight_format: str = "safetensors"
    _entries: dict[str, _Entry] = field(default_factory=dict, repr=False)
    _handles: dict[Path, Any] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def tensor_names(self) -> list[str]:
        return list(self.weight_files)

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", "unknown"))

    def info(self, name: str) -> TensorInfo:
        """Shape and dtype of one tensor, from the file header (no tensor data read)."""
        return self._entry(name).info

    def _entry(self, name: str) -> _Entry:
        if not self._entries:
            self._read_entries()
        try:
            return self._entries[name]
        except KeyError:
            raise ModelLoadError(f"model {self.name} has no tensor {name}") from None

    def _read_entries(self) -> None:
        if self.weight_format == "pickle":
            for name, file in self.weight_files.items():
                tensor = _pickle_state(file)[name]
                info = TensorInfo(tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."))
                self._entries[name] = _Entry(info, 0, 0)
            return
        for file in sorted(set(self.weight_files.values())):
            for name, entry in read_safetensors_header(file).items():
                if name in self.weight_files:
                    self._entries[name] = entry

    def get_tensor(self, name: str) -> torch.Tensor:
        """Read one tensor into new memory, in its stored dtype."""
        if self.weight_format == "pickle":
            return self._pickled(name)
        info = self.info(name)
        tensor = torch.empty(info.shape, dtype=getattr(torch, info.dtype))
        self._read_raw(name, tensor)
        return tensor

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """Read one tensor into ``out`` (contiguous, same number of elements), converting its dtype.

        A tensor stored in ``out``'s dtype goes from the file straight into ``out``.
        """
        info = self.info(name)
        if out.numel() != math.prod(info.shape) or not out.is_contiguous():
            raise MergeError(
                f"tensor {name} of model {self.name} is {list(info.shape)}; cannot read it into "
                f"{list(out.shape)}"
            )
        if self.weight_format == "pickle":
            return out.copy_(self._pickled(name).reshape(out.shape))
        if getattr(torch, info.dtype) == out.dtype and out.device.type == "cpu":
            return self._read_raw(name, out)
        return out.copy_(self.get_tensor(name).reshape(out.shape))

    def _pickled(self, name: str) -> torch.Tensor:
        file = self.weight_files.get(name)
        if file is None:
            raise ModelLoadError(f"model {self.name} has no tensor {name}")
        return _pickle_state(file)[name]

    def _read_raw(self, name: str, out: torch.Tensor) -> torch.Tensor:
        entry, file = self._entry(name), self.weight_files[name]
        view = out.view(-1).view(torch.uint8).numpy().data  # a memoryview of out's bytes
        if len(view) != entry.stop - entry.start:
            raise ModelLoadError(
                f"tensor {name} of model {self.name} in {file} has {entry.stop - entry.start} "
                f"bytes for shape {list(entry.info.shape)}; the file is damaged or incomplete"
            )
        with self._lock:  # one handle per file, shared by the threads that read this source
            handle = self._handles.get(file)
            if handle is None:
                handle = self._handles[file] = open(file, "rb", buffering=0)  # noqa: SIM115 - see close()
            handle.seek(entry.start)
            done = 0
            while done < len(view):
                got = handle.readinto(view[done : done + _READ_CHUNK])
                if not got:
                    raise ModelLoadError(
                        f"cannot read tensor {name} of model {self.name} from {file}: the "
                        "file ends early; it is damaged or incomplete (re-download or re-save "
                        "the model)"
                    )
                done += got
        return out

    def close(self) -> None:
        with self._lock:
            for handle in self._handles.values():
                handle.close()
            self._handles.clear()

    def tokenizer_files(self) -> list[Path]:
        return [self.folder / f for f in TOKENIZER_FILES if (self.folder / f).is_file()]

    def content_hash(self) -> str:
        """SHA-256 over the weight files (their names and bytes; memoised per file)."""
        return files_sha256(sorted(set(self.weight_files.values())))

    def hub_id(self) -> str | None:
        """The Hugging Face repository this model is (the id it was given as, else the
        ``_name_or_path`` its config records), or None for a model known only locally."""
        recorded = str(self.config.get("_name_or_path") or "")
        for candidate in (self.path, recorded if "/" in recorded else ""):  # owner/name there
            if candidate and _HUB_ID.match(candidate) and not Path(candidate).expanduser().exists():
                return candidate
        return None

    def license(self) -> str | None:
        """The license the model's card (README.md front matter) or GGUF metadata states."""
        card = self.folder / "README.md"
        if card.is_file():
            text = card.read_text(encoding="utf-8", errors="replace")
            if text.startswith("---"):
                import yaml

                try:
                    front = yaml.safe_load(text.split("---", 2)[1]) or {}
                except yaml.YAMLError:
                    front = {}
                if isinstance(front, dict) and front.get("license"):
                    return str(front["license"])
        origin = self.folder / "gguf_source.json"
        if origin.is_file():
            value = json.loads(origin.read_text()).get("license")
            return str(value) if value else None
        return None


def read_safetensors_header(file: Path) -> dict[str, _Entry]:
    """Every tensor's shape, dtype and absolute byte range, from the file's JSON header.

    Raises:
        ModelLoadError: the header is unreadable or points past the end of the file.
    """
    damaged = (
        f"cannot read {file}: %s; "
        "the file is damaged or incomplete (re-download or re-save the model)"
    )
    try:
        size = file.stat().st_size
        with open(file, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > size - 8:
                raise ModelLoadError(damaged % "the header runs past the end of the file")
            header = json.loads(handle.read(length))
    except (OSError, struct.error, ValueError) as exc:
        raise ModelLoadError(damaged % str(exc).splitlines()[0]) from None
    entries = {}
    for name, item in header.items():
        if name == "__metadata__":
            continue
        start, stop = (8 + length + offset for offset in item["data_offsets"])
        if stop > size:
            raise ModelLoadError(damaged % f"tensor {name} runs past the end of the file")
        info = TensorInfo(tuple(item["shape"]), _st_dtype_name(item["dtype"]))
        entries[name] = _Entry(info, start, stop)
    return entries


_ST_DTYPE_NAMES = {
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F64": "float64",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


def _st_dtype_name(code: str) -> str:
    return _ST_DTYPE_NAMES.get(code, code.lower())


def open_source(
    name: str,
    path: str,
    *,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    cache_dir: str | Path | None = None,
) -> ModelSource:
    """Resolve ``path`` and open the model lazily (headers and config only)."""
    folder = resolve_model_path(path, allow_pickle=allow_pickle, cache_dir=cache_dir)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{folder} has no config.json; pass a Hugging Face model folder")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{config_file} is not valid JSON: {exc}") from None
    if config.get("auto_map") and not trust_remote_code:
        raise ModelLoadError(
            f"model {name} ({path}) needs custom code from its repository "
            "(auto_map in config.json); "
            "review it, then opt in with merge_settings.trust_remote_code = true"
        )
    weight_files, weight_format = find_weight_files(folder, allow_pickle=allow_pickle)
    logger.debug("opened %s from %s: %d tensors", name, folder, len(weight_files))
    return ModelSource(name, path, folder, config, weight_files, weight_format)


# -- compatibility -------------------------------------------------------------------------------

#: Config keys that must agree for a weight-by-weight merge (besides the tensors themselves).
_ARCH_KEYS = (
    "model_type",
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "vocab_size",
    "tie_word_embeddings",
    "hidden_act",
)


def compatibility_problems(
    sources: Sequence[ModelSource], *, layer_stacking: bool = False
) -> list[str]:
    """Every reason the sources cannot be merged weight by weight (empty when they can).

    With ``layer_stacking`` the layer count may differ (DFS merges combine layers).
    """
    if len(sources) < 2:
        return []
    first = sources[0]
    problems: list[str] = []
    for other in sources[1:]:
        pair = f"{first.name} and {other.name} cannot be merged weight-by-weight"
        for key in _ARCH_KEYS:
            a, b = first.config.get(key), other.config.get(key)
            if a != b and not (key == "head_dim" and (a is None or b is None)):
                problems.append(f"{pair}: config {key} is {a!r} vs {b!r}")
        problems.extend(_tensor_problems(first, other, pair, layer_stacking))
        problems.extend(_vocab_problems(first, other, pair))
    return problems


def _tensor_problems(a: ModelSource, b: ModelSource, pair: str, layer_stacking: bool) -> list[str]:
    names_a, names_b = set(a.tensor_names), set(b.tensor_names)
    if layer_stacking:
        names_a, names_b = {_layer_free(n) for n in names_a}, {_layer_free(n) for n in names_b}
    only_a, only_b = sorted(names_a - names_b), sorted(names_b - names_a)
    problems = []
    if only_a:
        problems.append(f"{pair}: {len(only_a)} tensors only in {a.name} (e.g. {only_a[0]})")
    if only_b:
        problems.append(f"{pair}: {len(only_b)} tensors only in {b.name} (e.g. {only_b[0]})")
    for name in sorted(set(a.tensor_names) & set(b.tensor_names)):
        sa, sb = a.info(name).shape, b.info(name).shape
        if sa != sb:
            problems.append(f"{pair}: {name} is {list(sa)} vs {list(sb)}")
    return problems


def dtype_differences(sources: Sequence[ModelSource]) -> list[str]:
    """Tensors stored in different dtypes (merged in float32, so a note, not an error)."""
    first, notes = sources[0], []
    for other in sources[1:]:
        for name in sorted(set(first.tensor_names) & set(other.tensor_names)):
            da, db = first.info(name).dtype, other.info(name).dtype
            if da != db:
                notes.append(f"{first.name} and {other.name}: {name} is {da} vs {db}")
    return notes


_LAYER_RE = re.compile(
    r"^(?P<prefix>.*?\b(?:layers|h|blocks|layer))\.(?P<index>\d+)\.(?P<rest>.+)$"
)


def _layer_free(name: str) -> str:
    match = _LAYER_RE.match(name)
    return f"{match['prefix']}.*.{match['rest']}" if match else name


def _vocab_problems(a: ModelSource, b: ModelSource, pair: str) -> list[str]:
    vocab_a, vocab_b = _vocab(a), _vocab(b)
    if vocab_a is None or vocab_b is None or vocab_a == vocab_b:
        return []
    if len(vocab_a) != len(vocab_b):
        return [
            f"{pair}: tokenizer vocabularies differ in size "
            f"({len(vocab_a)} vs {len(vocab_b)} tokens)"
        ]
    differing = sorted(tok for tok in vocab_a if vocab_a.get(tok) != vocab_b.get(tok))
    example = differing[0] if differing else "?"
    return [
        f"{pair}: tokenizer vocabularies differ ({len(differing)} tokens map to other ids, e.g. "
        f"{example!r} is {vocab_a.get(example)} vs {vocab_b.get(example)})"
    ]


def _vocab(source: ModelSource) -> dict[str, int] | None:
    """The token → id map from tokenizer.json or vocab.json (None when the model ships neither)."""
    tokenizer_json = source.folder / "tokenizer.json"
    if tokenizer_json.is_file():
        data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
        vocab = data.get("model", {}).get("vocab")
        if isinstance(vocab, list):  # unigram: [[piece, score], ...]
            vocab = {piece: i for i, (piece, _score) in enumerate(vocab)}
        vocab = dict(vocab or {})
        for added in data.get("added_tokens", []):
            vocab[added["content"]] = added["id"]
        return vocab
    vocab_json = source.folder / "vocab.json"
    if vocab_json.is_file():
        return json.loads(vocab_json.read_text(encoding="utf-8"))
    return None


def check_compatible(sources: Sequence[ModelSource], *, layer_stacking: bool = False) -> None:
    """Raise IncompatibleModelsError listing every mismatch; log dtype differences."""
    problems = compatibility_problems(sources, layer_stacking=layer_stacking)
    if problems:
        shown = problems[:8]
        more = f" (and {len(problems) - len(shown)} more)" if len(problems) > len(shown) else ""
        raise IncompatibleModelsError("; ".join(shown) + more)
    for note in dtype_differences(sources)[:5]:
        logger.warning("dtype differs (merged in float32): %s", note)


def close_all(sources: Iterable[ModelSource]) -> None:
    for source in sources:
        source.close()
