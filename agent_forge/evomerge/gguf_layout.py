"""How GGUF lays out a Hugging Face model: the supported families (``FAMILIES``), tensor names,
and the layouts that differ from Hugging Face's (Llama's Q/K row order, Gemma's 1 + w norms,
GPT-2's transposed Conv1D, GPT-NeoX's QKV grouping, MoE experts stacked per kind).

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
    #: GPT-NeoX: its fused QKV rows go head by head (q, k, v of head 0, then head 1, …) where
    #: GGUF keeps all q rows, then all k, then all v; also LayerNorm and partial rope.
    neox: bool = False

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
    "qwen2moe": GGUFFamily(gguf.MODEL_ARCH.QWEN2MOE, ("qwen2_moe",), "Qwen2-MoE"),
    "olmo2": GGUFFamily(gguf.MODEL_ARCH.OLMO2, ("olmo2",), "OLMo 2"),
    "gptneox": GGUFFamily(gguf.MODEL_ARCH.GPTNEOX, ("gpt_neox",), "GPT-NeoX, Pythia", neox=True),
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


@dataclass(frozen=True)
class ExpertLayout:
    """Where a mixture-of-experts model keeps its experts in Hugging Face's files (one tensor
    per expert and projection); GGUF stacks each projection over the experts."""

    stem: str  # the MoE block under each layer
    kinds: dict[str, str]  # GGUF's gate / down / up → the projection's name
    count: str  # the config field with the expert count
    width: str  # the config field with an expert's inner width

    def expert_name(self, layer: int, kind: str, expert: int | str) -> str:
        return f"model.layers.{layer}.{self.stem}.experts.{expert}.{self.kinds[kind]}.weight"

    def router_name(self, layer: int) -> str:
        return f"model.layers.{layer}.{self.stem}.gate.weight"

    def match(self, hf_name: str) -> tuple[int, int, str] | None:
        """(layer, expert, GGUF kind) of an expert tensor, else None."""
        found = re.match(
            rf"^model\.layers\.(\d+)\.{self.stem}\.experts\.(\d+)\.(\w+)\.weight$", hf_name
        )
        kind = {v: k for k, v in self.kinds.items()}.get(found[3]) if found else None
        return (int(found[1]), int(found[2]), kind) if found and kind else None


#: transformers model type → its experts' layout (Mixtral, Qwen2-MoE).
MOE_LAYOUTS = {
    "mixtral": ExpertLayout(
        "block_sparse_moe", {"gate": "w1", "down": "w2", "up": "w3"}, "num_local_experts",
        "intermediate_size",
    ),
    "qwen2_moe": ExpertLayout(
        "mlp", {"gate": "gate_proj", "down": "down_proj", "up": "up_proj"}, "num_experts",
        "moe_intermediate_size",
    ),
}  # fmt: skip


def regroup_qkv(values: np.ndarray, n_head: int, *, inverse: bool = False) -> np.ndarray:
    """GPT-NeoX's fused QKV (weight or bias rows) from head-by-head (q, k, v per head) to GGUF's
    all-q, all-k, all-v order (``inverse``: back)."""
    rest = values.shape[1:]
    per_head = values.shape[0] // (3 * n_head)
    split = (3, n_head, per_head) if inverse else (n_head, 3, per_head)
    return np.ascontiguousarray(values.reshape(*split, *rest).swapaxes(0, 1).reshape(values.shape))


def stacked_expert_name(layer: int, kind: str) -> str:
    """The GGUF name of layer ``layer``'s stacked experts of ``kind`` (gate, down, up)."""
    return f"blk.{layer}.ffn_{kind}_exps.weight"


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


def convert_layout(
    family: GGUFFamily, gguf_name: str, values: np.ndarray, config: Any, *, to_gguf: bool
) -> np.ndarray:
    """Tensor ``gguf_name`` from Hugging Face's layout to GGUF's (``to_gguf``) or back, for
    ``family``: Llama's Q/K rows, Gemma's 1 + w norms, GPT-2's transposed Conv1D, GPT-NeoX's QKV
    grouping. Each step touches its own tensors, so their order does not matter."""
    heads = head_count_for(gguf_name, config) if family.permuted else None
    if heads is not None:
        values = permute_qk(values, heads, inverse=not to_gguf)
    if family.norm_offset and is_norm(gguf_name):
        values = values + 1.0 if to_gguf else values - 1.0
    if family.transposed(gguf_name):
        values = np.ascontiguousarray(values.T)
    if family.neox and ".attn_qkv." in gguf_name:
        values = regroup_qkv(values, config.num_attention_heads, inverse=not to_gguf)
    return values
