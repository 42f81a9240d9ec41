"""Model families other than Llama, end to end through the CLI with tiny random models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import save_perturbed_family

QUICK = ["--generations", "1", "--population", "4", "--fitness-sample-size", "8", "--quiet"]


def save_gpt2_family(root: Path, tokenizer) -> dict[str, Path]:
    """A tiny GPT-2 (``n_layer``, ``h.N`` blocks, Conv1D weights, tied head) and three seeded
    perturbations of it."""
    from transformers import GPT2Config

    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=64,
        n_embd=32,
        n_layer=3,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
    )
    return save_perturbed_family(root, tokenizer, config)


def test_gpt2_runs_ps_dfs_and_reloads(tmp_path, tiny_tokenizer):
    """GPT-2 names its layer count ``n_layer`` (``num_hidden_layers`` is only an alias): the
    search reads it (3 layers, 5 PS groups), and the best model reloads with transformers."""
    from transformers import AutoModelForCausalLM

    folders = save_gpt2_family(tmp_path / "models", tiny_tokenizer)
    out = tmp_path / "run"
    models = [f"--model{i}={folders[f'm{i}']}" for i in (1, 2, 3)]
    result = subprocess.run(
        [sys.executable, "-m", "agent_forge.evomerge.cli", "--run", "--method", "ps_dfs",
         *models, "--base", str(folders["base"]), *QUICK, "--output", str(out)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (out / "evaluations.jsonl").read_text().splitlines()]
    ps = [r["recipe"] for r in records if r["stage"] == "ps"]
    per_layer = [w for r in ps for w in r["params"].get("weight", []) if isinstance(w, list)]
    assert per_layer and all(len(w) == 3 + 2 for w in per_layer)
    assert any(r["stage"] == "dfs" for r in records)
    best = AutoModelForCausalLM.from_pretrained(out / "best")
    saved = json.loads((out / "best" / "config.json").read_text())
    assert best.config.n_layer == saved["n_layer"] == len(best.transformer.h)
    ids = torch.tensor([[2, 3, 4, 5]])
    assert torch.isfinite(best(ids).logits).all()


@pytest.mark.parametrize("key", ["n_layer", "num_layers"])
def test_layer_count_is_read_from_the_key_the_config_uses(key):
    from agent_forge.evomerge.exceptions import ConfigurationError
    from agent_forge.evomerge.layout import source_layers

    assert source_layers({key: 7, "vocab_size": 10}) == 7
    with pytest.raises(ConfigurationError, match="no layer count"):
        source_layers({"vocab_size": 10})


# -- every family: merge, per-layer values, layer stacks, reload; the DFS scale by hand ----------

#: model type → the config fields of a tiny model of it (3 layers, hidden 32, 4 heads).
FAMILIES = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": {"head_dim": 8},
    "phi3": {"pad_token_id": 1},
    "gemma2": {"head_dim": 8, "query_pre_attn_scalar": 8},
    "gemma3_text": {"head_dim": 8, "query_pre_attn_scalar": 8, "sliding_window": 4},
    "olmo2": {},
    "gpt2": {"n_embd": 32, "n_layer": 3, "n_head": 4, "n_positions": 64},
    "gpt_neox": {"num_key_value_heads": None},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 32,
    },
}
#: model type → the modules of a layer whose outputs are what enters the residual stream.
BRANCH_OUTPUTS = {
    "gemma2": ("post_attention_layernorm", "post_feedforward_layernorm"),
    "gemma3_text": ("post_attention_layernorm", "post_feedforward_layernorm"),
    "olmo2": ("post_attention_layernorm", "post_feedforward_layernorm"),
    "gpt2": ("attn", "mlp"),
    "gpt_neox": ("attention", "mlp"),
}


def tiny_config(model_type: str, vocab_size: int):
    from transformers import AutoConfig

    fields = dict(FAMILIES[model_type])
    if model_type != "gpt2":
        fields = {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 64,
            **fields,
        }
        fields = {k: v for k, v in fields.items() if v is not None}
    return AutoConfig.for_model(
        model_type, vocab_size=vocab_size, bos_token_id=0, eos_token_id=0, **fields
    )


@pytest.fixture(scope="module")
def family_folders(tmp_path_factory, tiny_tokenizer) -> dict[str, dict[str, Path]]:
    """Per family: a base and three perturbed models (norms perturbed too, so a wrong gain
    offset shows)."""
    root = tmp_path_factory.mktemp("families")
    return {
        t: save_perturbed_family(root / t, tiny_tokenizer, tiny_config(t, len(tiny_tokenizer)))
        for t in FAMILIES
    }


def _layers(model):
    if hasattr(model, "transformer"):
        return model.transformer.h
    return model.gpt_neox.layers if hasattr(model, "gpt_neox") else model.model.layers


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_a_dfs_slot_scale_multiplies_that_layers_branch_outputs(
    model_type, family_folders, tmp_path
):
    """The stacked model's logits equal the source's with layer 1's attention and MLP outputs
    (after Gemma's and OLMo 2's post-norms) multiplied by the slot's scale, by forward hooks:
    the scale acts in every family (on Gemma a scaled o_proj would cancel in its norm)."""
    from transformers import AutoModelForCausalLM

    from agent_forge.evomerge.merger import AdvancedModelMerger
    from agent_forge.evomerge.recipe import LayerSlot, LayerStack, Source
    from agent_forge.evomerge.sources import open_source

    folder = family_folders[model_type]["m1"]
    merger = AdvancedModelMerger(sources={"m": open_source("m", str(folder))})
    stack = LayerStack((Source("m"),), (LayerSlot(0, 0), LayerSlot(0, 1, 0.5), LayerSlot(0, 2)))
    stacked = AutoModelForCausalLM.from_pretrained(merger.merge(stack, tmp_path / "dfs")).eval()
    source = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor([[5, 17, 42, 9, 100, 3, 8, 11]])
    with torch.no_grad():
        unscaled = source(ids).logits

        def halve(module, args, output):
            return (output[0] * 0.5, *output[1:]) if isinstance(output, tuple) else output * 0.5

        layer = _layers(source)[1]
        names = BRANCH_OUTPUTS.get(model_type, ("self_attn", "mlp"))
        hooks = [getattr(layer, name).register_forward_hook(halve) for name in names]
        expected = source(ids).logits
        for hook in hooks:
            hook.remove()
        actual = stacked(ids).logits
    assert (expected - unscaled).abs().max() > 1e-3  # the scale changes the output
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_every_family_merges_per_layer_and_stacked_and_reloads(
    model_type, family_folders, tmp_path
):
    """TIES with per-layer weights, and a stack of two models' layers, written and reloaded
    with transformers; the TIES tensors match the formula's shape of things (finite, the
    right layer count)."""
    from transformers import AutoModelForCausalLM

    from agent_forge.evomerge.merger import AdvancedModelMerger
    from agent_forge.evomerge.recipe import LayerSlot, LayerStack, Merge, Source
    from agent_forge.evomerge.sources import open_source

    folders = family_folders[model_type]
    sources = {name: open_source(name, str(path)) for name, path in folders.items()}
    merger = AdvancedModelMerger(sources=sources, base="base")
    inputs = [Source("m1"), Source("m2"), Source("m3")]
    per_layer = [[0.2, 0.5, 0.8, 1.0, 0.4]] * 3  # embeddings, 3 layers, head
    ties = Merge("ties", inputs, {"weight": per_layer, "density": 0.5}, Source("base"))
    stack = LayerStack(
        (ties, Source("m2")), (LayerSlot(0, 0), LayerSlot(1, 0), LayerSlot(1, 2), LayerSlot(0, 2))
    )
    ids = torch.tensor([[5, 17, 42, 9]])
    for recipe, layers in ((ties, 3), (stack, 4)):
        model = AutoModelForCausalLM.from_pretrained(
            merger.merge(recipe, tmp_path / recipe.short_hash)
        )
        assert len(_layers(model)) == layers
        with torch.no_grad():
            assert torch.isfinite(model(ids).logits).all()


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
def test_moe_experts_router_and_shared_experts_are_components(model_type, family_folders, tmp_path):
    """A linear merge taking the experts from m1 and everything else (router, shared expert,
    attention) from m2: each tensor is the one model's, expert by expert."""
    from safetensors.torch import load_file

    from agent_forge.evomerge.merger import AdvancedModelMerger
    from agent_forge.evomerge.recipe import Merge, Source
    from agent_forge.evomerge.sources import open_source

    folders = family_folders[model_type]
    sources = {n: open_source(n, str(folders[n])) for n in ("m1", "m2")}
    weights = [{"experts": 1.0, "default": 0.0}, {"experts": 0.0, "default": 1.0}]
    recipe = Merge("linear", [Source("m1"), Source("m2")], {"weight": weights})
    merged = load_file(
        AdvancedModelMerger(sources=sources).merge(recipe, tmp_path / "out") / "model.safetensors"
    )
    m1, m2 = (load_file(folders[n] / "model.safetensors") for n in ("m1", "m2"))
    kinds = {"experts": 0, "router": 0, "other": 0}
    for name, tensor in merged.items():
        expert = ".experts." in name
        kind = (
            "experts"
            if expert
            else "router"
            if name.endswith(("mlp.gate.weight", "moe.gate.weight"))
            else "other"
        )
        kinds[kind] += 1
        assert torch.equal(tensor, (m1 if expert else m2)[name]), name
    assert all(kinds.values()), kinds


def test_an_moe_part_a_mapping_does_not_name_takes_the_mlp_value():
    from agent_forge.evomerge.techniques import TensorLocation, resolve_value

    router = TensorLocation("router", position=1, layers=2, name="model.layers.0.mlp.gate.weight")
    assert resolve_value({"mlp": 0.3, "default": 0.9}, router) == 0.3
    assert resolve_value({"mlp": 0.3, "router": 0.1, "default": 0.9}, router) == 0.1
    assert resolve_value({"attention": 0.3, "default": 0.9}, router) == 0.9
