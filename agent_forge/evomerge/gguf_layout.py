"""How GGUF lays out a Hugging Face model: supported architectures, tensor names, Q/K row order.

Shared by the import (``gguf_import``) and the export (``gguf_export``), which walk the same
correspondence in opposite directions.
"""

from __future__ import annotations

import logging
from typing import Any

import gguf
import numpy as np

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}
PERMUTED_ARCHS = {"llama"}  # llama.cpp keeps llama's Q/K rows interleaved for its rope kernel


def tensor_name_map(architecture: str, n_layers: int) -> gguf.TensorNameMap:
    """gguf-py's HF <-> GGUF name table for a supported architecture with ``n_layers`` blocks."""
    return gguf.get_tensor_name_map(SUPPORTED_ARCHITECTURES[architecture], n_layers)


def gguf_tensor_name(name_map: gguf.TensorNameMap, hf_name: str) -> str | None:
    """The GGUF name of HF parameter ``hf_name`` (``None`` when GGUF has no counterpart)."""
    stem, _, suffix = hf_name.rpartition(".")
    gguf_stem = name_map.get_name(stem)
    return None if gguf_stem is None else f"{gguf_stem}.{suffix}"


def permute_qk(weight: np.ndarray, n_head: int, *, inverse: bool = False) -> np.ndarray:
    """Reorder Q/K rows between HF's rotate-half layout and llama.cpp's interleaved pairs.

    Each head's rows ``[x_0..x_{d/2-1}, y_0..y_{d/2-1}]`` become ``[x_0, y_0, x_1, y_1, ...]``
    (``inverse`` undoes it). Works for weights ``(n_head*d, in)`` and biases ``(n_head*d,)``.
    """
    rest = weight.shape[1:]
    half = weight.shape[0] // n_head // 2
    split = (n_head, half, 2) if inverse else (n_head, 2, half)
    return weight.reshape(*split, *rest).swapaxes(1, 2).reshape(weight.shape)


def head_count_for(name: str, config: Any) -> int | None:
    """Heads to permute GGUF tensor ``name`` by: Q's or K/V's head count, else ``None``."""
    if ".attn_q." in name:
        return config.num_attention_heads
    if ".attn_k." in name:
        return config.num_key_value_heads
    return None
