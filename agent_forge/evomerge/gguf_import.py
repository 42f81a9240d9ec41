"""GGUF in: a GGUF file becomes an ordinary Hugging Face model folder in a content-keyed cache.

After the bounded header parse (``gguf_header``), tensors are dequantised with ``gguf.quants``,
renamed to Hugging Face names and brought back to Hugging Face's layout
(``gguf_layout.convert_layout``; MoE experts unstacked); the config comes from transformers'
GGUF key table (plus what it leaves out: head sizes, soft-capping, expert widths, GPT-NeoX),
the tokenizer from transformers' GGUF tokenizer conversion. The folder
(``$EVOMERGE_CACHE/gguf``, else ``~/.cache/evomerge/gguf``) is written atomically, keyed by the
file's SHA-256 and the conversion's version, and reused next time.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, cast

import gguf
import numpy as np
import torch

from .exceptions import GGUFError
from .gguf_header import GGUFArray, GGUFHeader, TensorEntry, read_header
from .gguf_layout import (
    FAMILIES,
    MOE_LAYOUTS,
    convert_layout,
    gguf_tensor_name,
    stacked_expert_name,
    tensor_name_map,
)
from .storage import cache_root, file_sha256

logger = logging.getLogger(__name__)

_IMPORT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_MAX_SHARD_BYTES = 1 << 30
_IGNORED_GGUF_TENSORS = {"rope_freqs.weight"}  # rope frequency factors: derived, not learned
#: Part of each cached folder's name: raised when a conversion changes (2: the smollm
#: pre-tokenizer restored), so folders converted before are not reused.
CONVERSION_VERSION = 2


def default_cache_dir() -> Path:
    """``$EVOMERGE_CACHE/gguf``, else ``~/.cache/evomerge/gguf``."""
    return cache_root() / "gguf"


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
    digest = file_sha256(path, cache / ".hash-memo")[:32]
    target = cache / f"{digest}-{dtype}-v{CONVERSION_VERSION}"
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
    if architecture not in FAMILIES:
        families = "; ".join(f"{name} ({f.name})" for name, f in FAMILIES.items())
        raise GGUFError(
            f"{path.name}: GGUF architecture {architecture!r} is not supported; EvoMerge reads "
            f"{families} -- for other models pass the original Hugging Face folder instead"
        )


def _convert_gguf(header: GGUFHeader, out: Path, dtype: torch.dtype) -> None:
    """Write config, tokenizer, generation config and weights of the file into ``out``."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    config = _config_from_header(header)
    tokenizer = _tokenizer_from_file(header.path)
    _restore_pre_tokenizer(tokenizer, header.metadata.get("tokenizer.ggml.pre"))
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    config.architectures = [type(skeleton).__name__]
    config.dtype = dtype
    names = _gguf_to_hf_names(skeleton, str(header.architecture), config.num_hidden_layers)
    if config.model_type in MOE_LAYOUTS:  # written as Hugging Face's files hold it, by expert
        names.update(_expert_names(config))
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
        "license": header.metadata.get("general.license"),
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
        # the table is keyed by GGUF architecture or model type (qwen2moe: qwen2_moe); one it
        # lacks (olmo2) uses the common keys (llama's)
        model_type = FAMILIES[arch].model_types[0] if section == arch else section
        keys = table.get(section) or table.get(model_type) or table["llama"]
        for key, hf_key in keys.items():
            value = header.metadata.get(f"{section}.{key}")
            if hf_key is not None and value is not None and not isinstance(value, GGUFArray):
                values[hf_key] = value
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):  # Gemma 2: not in the table
        if isinstance(header.metadata.get(f"{arch}.{key}"), float):
            values[key] = header.metadata[f"{arch}.{key}"]
    key_length = header.metadata.get(f"{arch}.attention.key_length")
    if isinstance(key_length, int) and "head_dim" not in values:  # transformers' table lacks it
        values["head_dim"] = key_length  # for qwen3, whose default head_dim is 128, not h / n
    tensors = {t.name: t for t in header.tensors}
    if "token_embd.weight" not in tensors:
        raise GGUFError(f"{header.path.name}: no token_embd.weight tensor; not a complete model")
    values.setdefault("vocab_size", tensors["token_embd.weight"].shape[0])
    if FAMILIES[arch].conv1d:  # GPT-2: transformers' table names keys GPT2Config does not read
        values["n_positions"] = tensors["position_embd.weight"].shape[0]
        values["n_inner"] = values.pop("feed_forward_length", None)
        values.pop("n_ctx", None)
    _check_sizes(header.path.name, values, tensors)
    values["tie_word_embeddings"] = "output.weight" not in tensors
    rope = _rope_scaling_from(header.metadata, arch)
    if rope:
        values["rope_scaling"] = rope
    model_type = FAMILIES[arch].model_types[0]
    experts = header.metadata.get(f"{arch}.expert_count")
    if arch == "llama" and isinstance(experts, int) and experts > 0:  # Mixtral
        model_type = "mixtral"
        values["num_local_experts"] = experts
        values["num_experts_per_tok"] = int(header.metadata[f"{arch}.expert_used_count"])
    if FAMILIES[arch].neox:  # transformers has no GPT-NeoX table: its own keys
        meta = header.metadata
        values["layer_norm_eps"] = float(meta[f"{arch}.attention.layer_norm_epsilon"])
        values["use_parallel_residual"] = bool(meta.get(f"{arch}.use_parallel_residual", True))
        head_dim = values["hidden_size"] // values["num_attention_heads"]
        rotary = meta.get(f"{arch}.rope.dimension_count", head_dim) / head_dim
        values["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": float(values.pop("rope_theta", 10000.0)),
            "partial_rotary_factor": rotary,
        }
        values.pop("num_key_value_heads", None)
        values.pop("head_dim", None)  # llama's table reads the rope width as the head size
    for key, field in (  # Qwen-MoE's widths, which transformers' table leaves out
        ("expert_feed_forward_length", "moe_intermediate_size"),
        ("expert_shared_feed_forward_length", "shared_expert_intermediate_size"),
    ):
        if isinstance(header.metadata.get(f"{arch}.{key}"), int):
            values[field] = header.metadata[f"{arch}.{key}"]
    try:
        return AutoConfig.for_model(model_type, **values)
    except (ValueError, TypeError) as err:
        raise GGUFError(f"{header.path.name}: metadata do not make a valid config: {err}") from err


def _check_sizes(file_name: str, values: dict[str, Any], tensors: dict[str, TensorEntry]) -> None:
    """The metadata's layer count and width must match the tensors (bounds what gets built)."""
    blocks = {n.split(".")[1] for n in tensors if n.startswith("blk.")}
    layers = 1 + max((int(b) for b in blocks if b.isdigit()), default=-1)
    declared = values.get("num_hidden_layers", values.get("n_layer"))
    if declared != layers:
        raise GGUFError(
            f"{file_name}: metadata say {declared} layers but the file "
            f"holds tensors for {layers}; the file is inconsistent"
        )
    width = values.get("hidden_size", values.get("n_embd"))
    if width != tensors["token_embd.weight"].shape[1]:
        raise GGUFError(
            f"{file_name}: metadata say hidden size {width} but "
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


def _restore_pre_tokenizer(tokenizer: Any, pre: Any) -> None:
    """Give the tokenizer the pre-tokenizer the file names where transformers' conversion
    drops it: ``smollm`` (SmolLM's: every digit its own piece, then byte-level splitting), which
    it turns into plain byte-level splitting, so ``12345`` would be one piece, not five."""
    if pre == "smollm":
        from tokenizers import pre_tokenizers

        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )


def _gguf_to_hf_names(
    skeleton: torch.nn.Module, architecture: str, n_layers: int
) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{gguf tensor name: (HF parameter name, shape)}`` from the model's own parameters."""
    name_map = tensor_name_map(architecture, n_layers)
    mapping: dict[str, tuple[str, tuple[int, ...]]] = {}
    for hf_name, value in skeleton.state_dict().items():
        gguf_name = gguf_tensor_name(name_map, hf_name)
        if gguf_name is not None:
            mapping[gguf_name] = (hf_name, tuple(value.shape))
    return mapping


def _expert_names(config: Any) -> dict[str, tuple[str, tuple[int, ...]]]:
    """An MoE model's router and stacked experts: GGUF name → (HF name, shape); a stacked
    tensor's HF name holds ``{e}`` for the expert index (its shape is the stack's)."""
    moe = MOE_LAYOUTS[config.model_type]
    count, hidden, width = (
        getattr(config, moe.count),
        config.hidden_size,
        getattr(config, moe.width),
    )
    names: dict[str, tuple[str, tuple[int, ...]]] = {}
    shapes = {"gate": (width, hidden), "down": (hidden, width), "up": (width, hidden)}
    for layer in range(config.num_hidden_layers):
        names[f"blk.{layer}.ffn_gate_inp.weight"] = (moe.router_name(layer), (count, hidden))
        for kind, shape in shapes.items():
            names[stacked_expert_name(layer, kind)] = (
                moe.expert_name(layer, kind, "{e}"),
                (count, *shape),
            )
    return names


def _expected_keys(skeleton: torch.nn.Module, config: Any) -> set[str]:
    keys = set(skeleton.state_dict())
    moe = MOE_LAYOUTS.get(config.model_type)
    if moe is not None:  # the files' per-expert names, not the fused parameters
        count = getattr(config, moe.count)
        keys = {k for k in keys if ".experts." not in k and not k.endswith(".mlp.gate.weight")}
        for layer in range(config.num_hidden_layers):
            keys.add(moe.router_name(layer))
            keys |= {moe.expert_name(layer, kind, e) for e in range(count) for kind in moe.kinds}
    if getattr(config, "tie_word_embeddings", False):
        keys.discard("lm_head.weight")
    return keys


def _hf_tensors(
    header: GGUFHeader,
    config: Any,
    names: dict[str, tuple[str, tuple[int, ...]]],
    dtype: torch.dtype,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Dequantised tensors under HF names, one at a time, read from a memory map of the file."""
    blob = np.memmap(header.path, mode="r", dtype=np.uint8)
    family = FAMILIES[str(header.architecture)]
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
        if family.transposed(entry.name):
            shape = shape[::-1]
        if entry.shape != shape:
            raise GGUFError(
                f"{header.path.name}: tensor {entry.name} has shape {list(entry.shape)} but the "
                f"metadata imply {list(shape)}; the file is inconsistent"
            )
        start = header.data_start + entry.offset
        rows = math.prod(entry.shape[:-1])  # (rows, bytes per row), as gguf.quants expects
        raw = blob[start : start + entry.nbytes].reshape(rows, -1)
        values = gguf.quants.dequantize(raw, entry.qtype).reshape(entry.shape)
        values = convert_layout(family, entry.name, values, config, to_gguf=False)
        if "{e}" in hf_name:  # stacked experts, one tensor each
            for index, expert in enumerate(values):
                array = np.require(expert, np.float32, ["C", "W"])
                yield hf_name.format(e=index), torch.from_numpy(array).to(dtype)
            continue
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
