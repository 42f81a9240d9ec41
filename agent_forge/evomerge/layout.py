"""Where a tensor sits in a transformer: its layer, its component, and which tensors set the
size of a layer's residual-branch output (the ones a DFS slot scale multiplies: the output
projections, or in Gemma 2/3 and OLMo 2 the norms after them).

Covers the decoder families EvoMerge merges (Llama, Mistral, Qwen2, SmolLM, Gemma, Phi-3,
GPT-2-style ``h.N`` blocks); names are matched by pattern, not by a per-architecture table
of full names.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .exceptions import ConfigurationError
from .techniques import TensorLocation

_LAYER = re.compile(
    r"^(?P<prefix>(?:.*\.)?(?:layers|h|blocks|layer))\.(?P<index>\d+)\.(?P<rest>.+)$"
)

#: Suffixes of the projections that write a layer's branch output into the residual stream.
RESIDUAL_OUTPUTS = (
    "self_attn.o_proj",
    "mlp.down_proj",
    "attn.c_proj",
    "mlp.c_proj",
    "self_attention.dense",
    "mlp.dense_4h_to_h",
    "attention.o_proj",
    "attention.dense",  # GPT-NeoX
    "feed_forward.w2",
    "mlp.shared_expert.down_proj",  # Qwen-MoE's shared expert
)
#: Each expert's output projection (Mixtral's ``block_sparse_moe.experts.N.w2``, Qwen-MoE's
#: ``mlp.experts.N.down_proj``), and transformers 5's fused ``mlp.experts.down_proj`` of all.
_EXPERT_OUTPUT = re.compile(r"experts(?:\.\d+)?\.(?:w2|down_proj)(?:\.weight|\.bias)?$")


@dataclass(frozen=True)
class LayerName:
    prefix: str
    index: int
    rest: str

    def with_index(self, index: int) -> str:
        return f"{self.prefix}.{index}.{self.rest}"


def parse_layer(name: str) -> LayerName | None:
    """``model.layers.3.mlp.up_proj.weight`` → (``model.layers``, 3, ``mlp.up_proj.weight``)."""
    match = _LAYER.match(name)
    if match is None:
        return None
    return LayerName(match["prefix"], int(match["index"]), match["rest"])


def is_residual_output(rest: str) -> bool:
    """Whether a layer tensor (name after the layer index) is a residual-branch output
    projection."""
    if _EXPERT_OUTPUT.search(rest):
        return True
    return rest.rsplit(".", 1)[0] in RESIDUAL_OUTPUTS


#: Mixture-of-experts parts: the experts, the router that weighs them, the shared expert(s).
_EXPERTS = re.compile(r"\.experts(\.|$)")
_ROUTER = re.compile(r"(mlp|block_sparse_moe|moe)\.(gate|router)\.(weight|bias)$")
_SHARED_EXPERT = re.compile(r"\.shared_experts?(_gate)?\.")


def component_of(name: str) -> str:
    """``embeddings``, ``attention``, ``mlp``, ``experts``, ``router``, ``shared_experts``,
    ``norms``, ``head`` or ``default``."""
    lowered = name.lower()
    if lowered.startswith(("lm_head", "output.", "embed_out.")) or ".lm_head." in lowered:
        return "head"  # embed_out: GPT-NeoX's head
    if "embed" in lowered or lowered.endswith(("wte.weight", "wpe.weight")):
        return "embeddings"
    if "norm" in lowered or ".ln_" in lowered or lowered.startswith("ln_"):
        return "norms"
    if "attn" in lowered or "attention" in lowered:
        return "attention"
    if _SHARED_EXPERT.search(lowered):
        return "shared_experts"
    if _EXPERTS.search(lowered):
        return "experts"
    if _ROUTER.search(lowered):
        return "router"
    if "mlp" in lowered or "feed_forward" in lowered or "moe" in lowered:
        return "mlp"
    return "default"


#: Families whose sub-layers' outputs are normalised before the residual add (Gemma 2 and 3,
#: OLMo 2): a scale on the output projection cancels in that norm, so a DFS slot scale goes to
#: the norm's gain. Values: those norms, and the offset of the gain (Gemma's RMSNorm multiplies
#: by 1 + w, so scaling the branch by s makes w' = s·(1 + w) − 1).
POST_NORM_FAMILIES: dict[str, tuple[tuple[str, ...], float]] = {
    "gemma2": (("post_attention_layernorm", "post_feedforward_layernorm"), 1.0),
    "gemma3_text": (("post_attention_layernorm", "post_feedforward_layernorm"), 1.0),
    "olmo2": (("post_attention_layernorm", "post_feedforward_layernorm"), 0.0),
}


def branch_gain_offset(rest: str, model_type: str | None) -> float | None:
    """For a layer tensor (name after the layer index) that sets the size of its branch's
    output in the residual stream — what a DFS slot scale multiplies — the offset of that gain
    (0: the tensor itself scales; 1: Gemma's 1 + w); None for any other tensor."""
    family = POST_NORM_FAMILIES.get(model_type or "")
    if family is None:
        return 0.0 if is_residual_output(rest) else None
    norms, offset = family
    module, _, kind = rest.rpartition(".")
    return offset if module in norms and kind == "weight" else None


def tensor_locations(names: Sequence[str], layers: int) -> dict[str, TensorLocation]:
    """Locations for a model's tensor names in file order (non-layer tensors before the first
    layer tensor count as embeddings-side, after it as head-side)."""
    seen_layer = False
    out = {}
    for name in names:
        parsed = parse_layer(name)
        if parsed is not None:
            seen_layer = True
            out[name] = TensorLocation(component_of(name), parsed.index + 1, layers, name)
        elif component_of(name) == "embeddings" or not seen_layer and component_of(name) != "head":
            out[name] = TensorLocation(component_of(name), 0, layers, name)
        else:
            out[name] = TensorLocation(component_of(name), layers + 1, layers, name)
    return out


def order_names(names: Sequence[str]) -> list[str]:
    """Hugging Face order: pre-layer tensors, layers by index, then the rest (norm, head)."""

    def key(name: str) -> tuple[int, int, str]:
        parsed = parse_layer(name)
        if parsed is not None:
            return (1, parsed.index, parsed.rest)
        return (0 if component_of(name) == "embeddings" else 2, 0, name)

    return sorted(names, key=key)


def source_layers(config: Mapping[str, Any]) -> int:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(config.get(key), int):
            return int(config[key])
    raise ConfigurationError(
        "model config names no layer count (num_hidden_layers); cannot merge by layer"
    )


def _per_layer_list(key: str, value: Any, layers: int) -> bool:
    """Whether config entry ``key`` holds one value per layer (``layer_types``,
    ``no_rope_layers`` …): a list as long as the layer count under a name that says "layer" —
    so a list that only happens to have that length (``eos_token_id: [0, 1]``) stays as it is."""
    return isinstance(value, list) and len(value) == layers and "layer" in key


def remap_layer_config(
    config: dict[str, Any], slots: Sequence[tuple[Mapping[str, Any], int, int]]
) -> dict[str, Any]:
    """The config of a layer stack built from ``config`` (the embeddings' model): slot k is
    layer ``slots[k][1]`` of a model with config ``slots[k][0]`` and ``slots[k][2]`` layers.

    Sets the layer count, and re-maps every per-layer list (see :func:`_per_layer_list`):
    entry k is the slot's own model's entry for its layer.
    """
    own_layers = source_layers(config)
    out = dict(config)
    for key, value in config.items():
        if not _per_layer_list(key, value, own_layers):
            continue
        remapped = []
        for k, (slot_config, layer, layers) in enumerate(slots):
            entries = slot_config.get(key)
            if not isinstance(entries, list) or len(entries) != layers:
                raise ConfigurationError(
                    f"layer slot {k} comes from a model whose config has no per-layer {key!r} "
                    f"list of {layers} entries; stack layers of models of one architecture"
                )
            remapped.append(entries[layer])
        out[key] = remapped
    out["num_hidden_layers"] = len(slots)
    if "n_layer" in out:
        out["n_layer"] = len(slots)
    return out
