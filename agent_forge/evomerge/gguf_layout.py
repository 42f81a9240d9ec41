"""How GGUF lays out a Hugging Face model: supported architectures, tensor names, Q/K row order.

Shared by the import (``gguf_import``) and the export (``gguf_export``), which walk the same
correspondence in opposite directions.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GGUFFamily:
    """One GGUF architecture as EvoMerge reads and writes it.

    ``model_types``: the transformers model types written as it (the first is what a file of it
    becomes). ``permuted``: llama.cpp keeps Q/K rows interleaved for its rope kernel (Llama
    only). ``norm_offset``: the file stores RMSNorm weights as 1 + w, since Gemma's norms scale
    by (1 + w) and llama.cpp's by w. ``sliding_window``: the metadata carry the window size.
    ``conv1d``: GPT-2's projections, stored (in, out) by Hugging Face and (out, in) by GGUF;
    such a family also has learned positions and LayerNorm (not RMSNorm) and no rope.
    """

    arch: gguf.MODEL_ARCH
    model_types: tuple[str, ...]
    name: str
    permuted: bool = False
    norm_offset: bool = False
    sliding_window: bool = False
    conv1d: tuple[str, ...] = ()

    def transposed(self, gguf_name: str) -> bool:
        """Whether tensor ``gguf_name`` is stored transposed relative to Hugging Face's."""
        return gguf_name.endswith(".weight") and any(f".{m}." in gguf_name for m in self.conv1d)


FAMILIES = {
    "llama": GGUFFamily(
        gguf.MODEL_ARCH.LLAMA,
        ("llama", "mistral", "mixtral"),
        "Llama, Mistral, SmolLM, Mixtral",
        permuted=True,
    ),
    "qwen2": GGUFFamily(gguf.MODEL_ARCH.QWEN2, ("qwen2",), "Qwen2"),
    "qwen3": GGUFFamily(gguf.MODEL_ARCH.QWEN3, ("qwen3",), "Qwen3"),
    "phi3": GGUFFamily(gguf.MODEL_ARCH.PHI3, ("phi3",), "Phi-3"),
    "olmo2": GGUFFamily(gguf.MODEL_ARCH.OLMO2, ("olmo2",), "OLMo 2"),
    "gpt2": GGUFFamily(
        gguf.MODEL_ARCH.GPT2, ("gpt2",), "GPT-2",
        conv1d=("attn_qkv", "attn_output", "ffn_up", "ffn_down"),
    ),
    "gemma2": GGUFFamily(
        gguf.MODEL_ARCH.GEMMA2, ("gemma2",), "Gemma 2", norm_offset=True, sliding_window=True
    ),
    "gemma3": GGUFFamily(
        gguf.MODEL_ARCH.GEMMA3, ("gemma3_text",), "Gemma 3 (text)", norm_offset=True,
        sliding_window=True,
    ),
}  # fmt: skip
SUPPORTED_ARCHITECTURES = {name: family.arch for name, family in FAMILIES.items()}
#: transformers model type → GGUF architecture name.
ARCH_OF_MODEL_TYPE = {t: name for name, family in FAMILIES.items() for t in family.model_types}


#: A Mixtral expert's projection in Hugging Face's files; GGUF stacks each kind over the experts.
HF_EXPERT = re.compile(
    r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$"
)
#: A stacked expert tensor in a GGUF file (w1: gate, w2: down, w3: up).
GGUF_EXPERTS = re.compile(r"^blk\.(\d+)\.ffn_(gate|down|up)_exps\.weight$")
EXPERT_KINDS = {"gate": "w1", "down": "w2", "up": "w3"}


def stacked_expert_name(layer: int, kind: str) -> str:
    """The GGUF name of layer ``layer``'s stacked Mixtral experts of ``kind`` (w1, w2, w3)."""
    stem = {"w1": "gate", "w2": "down", "w3": "up"}[kind]
    return f"blk.{layer}.ffn_{stem}_exps.weight"


def tensor_name_map(architecture: str, n_layers: int) -> gguf.TensorNameMap:
    """gguf-py's HF <-> GGUF name table for a supported architecture with ``n_layers`` blocks."""
    return gguf.get_tensor_name_map(SUPPORTED_ARCHITECTURES[architecture], n_layers)


def is_norm(gguf_name: str) -> bool:
    """Whether GGUF tensor ``gguf_name`` is an RMSNorm weight (``…norm.weight``)."""
    return gguf_name.endswith("norm.weight")


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
