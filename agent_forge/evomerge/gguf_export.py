"""GGUF out: a Hugging Face model folder (a family of ``gguf_layout.FAMILIES``) written as one
GGUF file.

Architecture metadata come from the HF config (rope scaling included; Llama 3.1-style rope as the
``rope_freqs`` tensor), the tokenizer from ``gguf_tokenizer``, and the tensors under GGUF names
and layout (``gguf_layout.convert_layout``; MoE experts stacked per kind) as f32, f16, bf16 or
q8_0 (1-D tensors stay F32), read from safetensors and written by ``gguf.GGUFWriter`` one at a
time into a temp file that is renamed when complete. A config GGUF cannot express (Gemma
layer types off llama.cpp's fixed pattern) is refused.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QType

from .exceptions import GGUFError
from .gguf_layout import (
    ARCH_OF_MODEL_TYPE,
    FAMILIES,
    MOE_LAYOUTS,
    convert_layout,
    gguf_tensor_name,
    stacked_expert_name,
    tensor_name_map,
)
from .gguf_tokenizer import add_tokenizer

logger = logging.getLogger(__name__)

OUTTYPES = {"f32": QType.F32, "f16": QType.F16, "bf16": QType.BF16, "q8_0": QType.Q8_0}
_FILE_TYPES = {
    QType.F32: gguf.LlamaFileType.ALL_F32,
    QType.F16: gguf.LlamaFileType.MOSTLY_F16,
    QType.BF16: gguf.LlamaFileType.MOSTLY_BF16,
    QType.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
}


def export_gguf(model_dir: str | Path, out_path: str | Path, outtype: str = "f16") -> Path:
    """Write the HF model in ``model_dir`` (a model type of ``gguf_layout.FAMILIES``) as a GGUF
    file.

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
    arch = ARCH_OF_MODEL_TYPE[config.model_type]
    _check_expressible(config)
    sources = _safetensors_files(model_dir)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    temp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    try:
        writer = gguf.GGUFWriter(temp, arch)
        _add_model_metadata(writer, config, model_dir, OUTTYPES[outtype])
        add_tokenizer(writer, model_dir, config)
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
    if config.model_type not in ARCH_OF_MODEL_TYPE:
        raise GGUFError(
            f"model type {config.model_type!r} cannot be exported to GGUF; supported: "
            f"{', '.join(sorted(ARCH_OF_MODEL_TYPE))}"
        )
    return config


#: llama.cpp's Gemma: every n-th layer attends globally, the others in a sliding window.
GLOBAL_LAYER_EVERY = {"gemma2": 2, "gemma3_text": 6}


def _check_expressible(config: Any) -> None:
    """Refuse a config whose model a GGUF reader would rebuild differently (GGUF has no key for
    it), rather than write a file that computes another model."""
    every = GLOBAL_LAYER_EVERY.get(config.model_type)
    if every is None:
        return
    layers = config.num_hidden_layers
    pattern = [
        "full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(layers)
    ]
    if list(getattr(config, "layer_types", None) or pattern) != pattern:
        raise GGUFError(
            "this Gemma model's layer_types do not follow llama.cpp's fixed pattern (every "
            f"{every}th layer global), which GGUF cannot override (a layer-stacking "
            "merge moves them); use the Hugging Face folder"
        )
    head_dim = config.head_dim
    if config.query_pre_attn_scalar not in (
        head_dim,
        config.hidden_size // config.num_attention_heads,
    ):
        raise GGUFError(
            f"this Gemma model scales queries by query_pre_attn_scalar = "
            f"{config.query_pre_attn_scalar}; GGUF readers assume head_dim ({head_dim}); "
            "use the Hugging Face folder"
        )


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
    """(theta, scaling parameters) from a transformers 4 or 5 config (for models with sliding
    and full attention layers, the full attention's: GGUF's ``rope.freq_base``)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if "full_attention" in params:
        params = dict(params["full_attention"])
    scaling = getattr(config, "rope_scaling", None) or {}
    params = {**scaling, **params}
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    return float(theta), params


def _add_model_metadata(
    writer: gguf.GGUFWriter, config: Any, model_dir: Path, qtype: QType
) -> None:
    writer.add_type("model")
    writer.add_name(Path(getattr(config, "_name_or_path", "") or model_dir.name).name or "model")
    writer.add_file_type(_FILE_TYPES[qtype])
    family = FAMILIES[ARCH_OF_MODEL_TYPE[config.model_type]]
    if family.conv1d:
        _add_gpt2_metadata(writer, config)
        return
    if family.neox:
        _add_neox_metadata(writer, config)
        return
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    if (
        getattr(config, "head_dim", None)
        or head_dim * config.num_attention_heads != config.hidden_size
    ):
        writer.add_key_length(head_dim)  # Qwen3's and Gemma's head_dim is not hidden / heads
        writer.add_value_length(head_dim)
    theta, params = _rope(config)
    writer.add_rope_freq_base(theta)
    _add_rope_scaling(writer, params)
    moe = MOE_LAYOUTS.get(config.model_type)
    if moe is not None:
        writer.add_expert_count(getattr(config, moe.count))
        writer.add_expert_used_count(config.num_experts_per_tok)
        if moe.width != "intermediate_size":  # Qwen-MoE: experts narrower than the dense MLP
            writer.add_expert_feed_forward_length(getattr(config, moe.width))
        shared = getattr(config, "shared_expert_intermediate_size", None)
        if shared:
            writer.add_expert_shared_feed_forward_length(shared)
    local = (getattr(config, "rope_parameters", None) or {}).get("sliding_attention")
    if local is not None:
        writer.add_rope_freq_base_swa(float(local["rope_theta"]))
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):  # Gemma 2
        if getattr(config, key, None) is not None:
            getattr(writer, f"add_{key}")(float(getattr(config, key)))
    window = getattr(config, "sliding_window", None)
    if family.sliding_window and window:
        writer.add_sliding_window(int(window))


def _add_gpt2_metadata(writer: gguf.GGUFWriter, config: Any) -> None:
    """GPT-2's hyper-parameters: learned positions, LayerNorm, no rope."""
    writer.add_context_length(config.n_positions)
    writer.add_embedding_length(config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
    writer.add_head_count(config.n_head)
    writer.add_layer_norm_eps(config.layer_norm_epsilon)
    writer.add_vocab_size(config.vocab_size)


def _add_neox_metadata(writer: gguf.GGUFWriter, config: Any) -> None:
    """GPT-NeoX's hyper-parameters: LayerNorm, rope over part of each head, parallel residual."""
    theta, params = _rope(config)
    if params.get("rope_type", "default") not in ("default", None):
        raise GGUFError(f"rope scaling {params['rope_type']!r} of GPT-NeoX cannot be exported")
    head_dim = config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_rope_dimension_count(int(params.get("partial_rotary_factor", 1.0) * head_dim))
    writer.add_rope_freq_base(theta)
    writer.add_head_count(config.num_attention_heads)
    writer.add_parallel_residual(bool(config.use_parallel_residual))
    writer.add_layer_norm_eps(config.layer_norm_eps)
    writer.add_vocab_size(config.vocab_size)


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


# --- tensors -------------------------------------------------------------------------------------


@dataclass
class _OutTensor:
    hf_names: tuple[str, ...]  # () for tensors computed here (rope_freqs); several: stacked
    gguf_name: str
    shape: tuple[int, ...]
    qtype: QType


def _tensor_plan(
    config: Any, arch: str, sources: dict[str, Path], outtype: QType
) -> list[_OutTensor]:
    from safetensors import safe_open

    name_map = tensor_name_map(arch, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    plan: list[_OutTensor] = []
    experts: dict[tuple[int, str], dict[int, tuple[str, tuple[int, ...]]]] = {}
    moe = MOE_LAYOUTS.get(config.model_type)
    for file in sorted(set(sources.values())):
        with safe_open(file, framework="pt") as handle:
            for hf_name in handle.keys():
                if hf_name.endswith("rotary_emb.inv_freq"):
                    continue
                if moe is not None and (expert := moe.match(hf_name)):  # stacked below, per kind
                    layer, index, kind = expert
                    shape = tuple(handle.get_slice(hf_name).get_shape())
                    experts.setdefault((layer, kind), {})[index] = (hf_name, shape)
                    continue
                gguf_name = gguf_tensor_name(name_map, hf_name)
                if gguf_name is None:
                    raise GGUFError(f"tensor {hf_name!r} has no GGUF name for architecture {arch}")
                if tied and gguf_name == "output.weight":  # the head is the embedding
                    continue
                shape = tuple(handle.get_slice(hf_name).get_shape())
                if FAMILIES[arch].transposed(gguf_name):
                    shape = shape[::-1]
                plan.append(_OutTensor((hf_name,), gguf_name, shape, _pick_type(shape, outtype)))
    for (layer, kind), members in sorted(experts.items()):
        names = tuple(members[i][0] for i in sorted(members))
        shape = (len(names), *members[0][1])
        name = stacked_expert_name(layer, kind)
        plan.append(_OutTensor(names, name, shape, _pick_type(shape, outtype)))
    if not tied and not any(entry.gguf_name == "output.weight" for entry in plan):
        raise GGUFError("config says embeddings are untied but the model has no head tensor")
    plan.sort(key=_tensor_order)
    if (freqs := _rope_freqs(config)) is not None:
        plan.append(_OutTensor((), "rope_freqs.weight", tuple(freqs.shape), QType.F32))
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
    family = FAMILIES[arch]
    for entry in plan:
        values = _source_values(entry, sources, config)
        values = convert_layout(family, entry.gguf_name, values, config, to_gguf=True)
        writer.write_tensor_data(_encode(values, entry.qtype))


def _source_values(entry: _OutTensor, sources: dict[str, Path], config: Any) -> np.ndarray:
    """One tensor as float32, read from its safetensors file (or computed, for rope_freqs)."""
    from safetensors import safe_open

    if not entry.hf_names:
        freqs = _rope_freqs(config)
        if freqs is None:
            raise GGUFError(f"no values for computed tensor {entry.gguf_name}")
        return freqs.numpy()
    values = []
    for name in entry.hf_names:
        with safe_open(sources[name], framework="pt") as handle:
            values.append(handle.get_tensor(name).float().numpy())
    return values[0] if len(values) == 1 else np.stack(values)
