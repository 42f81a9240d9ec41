"""The merge engine on tiny real Llama models: every technique loads and generates, every output
tensor matches the formula, streaming equals in-memory, bytes are deterministic, DFS is exact."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from agent_forge.evomerge.exceptions import (
    ConfigurationError,
    EvoMergeException,
    ModelLoadError,
)
from agent_forge.evomerge.merger import RECIPE_FILE, AdvancedModelMerger
from agent_forge.evomerge.recipe import LayerSlot, LayerStack, Merge, Source
from agent_forge.evomerge.recipe_files import load_recipe_file
from agent_forge.evomerge.sources import open_source
from agent_forge.evomerge.techniques import MERGE_TECHNIQUES


def states(family):
    return {name: load_file(Path(path) / "model.safetensors") for name, path in family.items()}


@pytest.fixture()
def merger(tiny_family):
    sources = {n: open_source(n, str(p)) for n, p in tiny_family.items()}
    return AdvancedModelMerger(sources=sources, base="base")


@pytest.fixture(scope="module")
def resident(tiny_family):
    sources = {n: open_source(n, str(p)) for n, p in tiny_family.items()}
    return AdvancedModelMerger(sources=sources, base="base", resident=True)


def recipe_for(technique: str) -> Merge:
    tech = MERGE_TECHNIQUES[technique]
    inputs = [Source("m1"), Source("m2"), Source("m3")][: tech.max_inputs or 3]
    return Merge(technique, inputs, {}, Source("base") if tech.needs_base else None, seed=5)


@pytest.mark.parametrize("technique", sorted(MERGE_TECHNIQUES))
def test_each_technique_merges_to_a_loadable_model_that_generates(
    technique, merger, resident, tmp_path
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = recipe_for(technique)
    out = merger.merge(recipe, tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("the quick", return_tensors="pt")
    generated = model.generate(
        **ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    assert generated.shape[1] == ids["input_ids"].shape[1] + 4
    document = json.loads((out / RECIPE_FILE).read_text())
    assert document["hash"] == recipe.hash and document["recipe"] == recipe.to_dict()
    # streamed and in-memory materialisation agree bit for bit
    streamed = load_file(out / "model.safetensors")
    params = dict(resident.materialize(recipe).named_parameters())
    assert set(streamed) == set(params)
    for name, tensor in streamed.items():
        assert torch.equal(tensor, params[name].detach()), name


def test_linear_task_arithmetic_and_ties_match_the_formula_tensor_by_tensor(
    merger, tiny_family, tmp_path
):
    sd = states(tiny_family)
    weights = [0.5, 0.3, 0.2]
    out = merger.merge(
        Merge("linear", [Source("m1"), Source("m2"), Source("m3")], {"weight": weights}),
        tmp_path / "linear",
    )
    merged = load_file(out / "model.safetensors")
    for name in sd["base"]:
        expected = sum(
            w * sd[m][name] for w, m in zip(weights, ["m1", "m2", "m3"], strict=True)
        ) / sum(weights)
        assert torch.allclose(merged[name], expected, atol=1e-6), name

    out = merger.merge(
        Merge(
            "task_arithmetic",
            [Source("m1"), Source("m2")],
            {"weight": [1.0, 0.5], "lambda": 0.7},
            Source("base"),
        ),
        tmp_path / "ta",
    )
    merged = load_file(out / "model.safetensors")
    for name, base in sd["base"].items():
        expected = base + 0.7 * ((sd["m1"][name] - base) + 0.5 * (sd["m2"][name] - base))
        assert torch.allclose(merged[name], expected, atol=1e-6), name

    out = merger.merge(
        Merge("ties", [Source("m1"), Source("m2"), Source("m3")], {"density": 0.3}, Source("base")),
        tmp_path / "ties",
    )
    merged = load_file(out / "model.safetensors")
    for name, base in sd["base"].items():
        assert torch.allclose(
            merged[name],
            base + reference_ties([sd[m][name] - base for m in ("m1", "m2", "m3")], 0.3),
            atol=1e-6,
        ), name


def reference_ties(deltas, density):
    """TIES written out entry by entry, straight from the paper's three steps.

    ``density`` is one value for every task vector or a list of one per task vector; a task
    vector of n entries keeps its ``max(1, int(density·n))`` largest magnitudes (none at
    density 0, all at density 1).
    """
    flat = [d.flatten().tolist() for d in deltas]
    n = len(flat[0])
    densities = density if isinstance(density, list) else [density] * len(flat)
    trimmed = []
    for values, d in zip(flat, densities, strict=True):
        keep = n if d >= 1 else 0 if d <= 0 else max(1, int(d * n))
        threshold_order = sorted(range(n), key=lambda i: -abs(values[i]))[:keep]
        kept = set(threshold_order)
        trimmed.append([v if i in kept else 0.0 for i, v in enumerate(values)])
    out = []
    for i in range(n):
        column = [t[i] for t in trimmed]
        sign = 1.0 if sum(column) >= 0 else -1.0
        agreeing = [v for v in column if v != 0 and (v > 0) == (sign > 0)]
        out.append(sum(agreeing) / len(agreeing) if agreeing else 0.0)
    return torch.tensor(out).reshape(deltas[0].shape)


def test_per_layer_group_weights_apply_to_the_right_layers(merger, tiny_family, tmp_path):
    """A PS merge with one weight per position (embeddings, layer 0, layer 1, head)."""
    sd = states(tiny_family)
    w1 = [0.1, 0.9, 0.5, 0.3]
    recipe = merger._ps_merge(
        {"weight": [w1, 1.0, 1.0], "normalize": False}, technique="task_arithmetic"
    )
    merged = load_file(merger.merge(recipe, tmp_path / "ps") / "model.safetensors")
    expected_w = {
        "model.embed_tokens.weight": 0.1,
        "model.layers.0.mlp.up_proj.weight": 0.9,
        "model.layers.1.self_attn.q_proj.weight": 0.5,
        "model.norm.weight": 0.3,
        "lm_head.weight": 0.3,
    }
    for name, w in expected_w.items():
        base = sd["base"][name]
        expected = (
            base + w * (sd["m1"][name] - base) + (sd["m2"][name] - base) + (sd["m3"][name] - base)
        )
        assert torch.allclose(merged[name], expected, atol=1e-6), name


def test_component_weights_split_attention_and_mlp(merger, tiny_family, tmp_path):
    sd = states(tiny_family)
    recipe = Merge(
        "linear",
        [Source("m1"), Source("m2")],
        {
            "weight": [
                {"attention": 1.0, "mlp": 0.0, "default": 0.5},
                {"attention": 0.0, "mlp": 1.0, "default": 0.5},
            ]
        },
    )
    merged = load_file(merger.merge(recipe, tmp_path / "c") / "model.safetensors")
    assert torch.equal(
        merged["model.layers.0.self_attn.q_proj.weight"],
        sd["m1"]["model.layers.0.self_attn.q_proj.weight"],
    )
    assert torch.equal(
        merged["model.layers.1.mlp.down_proj.weight"],
        sd["m2"]["model.layers.1.mlp.down_proj.weight"],
    )
    norm = "model.layers.0.input_layernorm.weight"
    assert torch.allclose(merged[norm], (sd["m1"][norm] + sd["m2"][norm]) / 2)


def test_per_layer_group_densities_apply_to_the_right_layers(merger, tiny_family, tmp_path):
    """A PS TIES merge whose densities are lists over layer groups: with two layers there are four
    positions (embeddings, layer 0, layer 1, final norm and head); a list of n values splits
    them into n equal runs."""
    sd = states(tiny_family)
    recipe = merger._ps_merge(
        {"density": [[1.0, 0.3, 0.0, 0.6], 0.5, [0.2, 1.0]]}, technique="ties"
    )
    merged = load_file(merger.merge(recipe, tmp_path / "ps") / "model.safetensors")
    # m1: one density per position; m2: one for all; m3: positions 0–1, then 2–3
    expected_densities = {
        "model.embed_tokens.weight": [1.0, 0.5, 0.2],
        "model.layers.0.mlp.up_proj.weight": [0.3, 0.5, 0.2],
        "model.layers.0.input_layernorm.weight": [0.3, 0.5, 0.2],
        "model.layers.1.self_attn.q_proj.weight": [0.0, 0.5, 1.0],
        "model.layers.1.post_attention_layernorm.weight": [0.0, 0.5, 1.0],
        "model.norm.weight": [0.6, 0.5, 1.0],
        "lm_head.weight": [0.6, 0.5, 1.0],
    }
    for name, densities in expected_densities.items():
        base = sd["base"][name]
        deltas = [sd[m][name] - base for m in ("m1", "m2", "m3")]
        expected = base + reference_ties(deltas, densities)
        assert torch.allclose(merged[name], expected, atol=1e-6), name
        # the densities differ between positions, so a misplaced one would not match
        wrong = base + reference_ties(deltas, [0.5, 0.5, 0.5])
        assert not torch.allclose(merged[name], wrong, atol=1e-6), name


def keep_largest(delta, density):
    """``delta`` with all but its ``max(1, int(density·n))`` largest magnitudes zeroed (all at
    density 1, none at density 0)."""
    n = delta.numel()
    keep = n if density >= 1 else 0 if density <= 0 else max(1, int(density * n))
    flat = delta.flatten()
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.topk(flat.abs(), keep).indices] = True
    return torch.where(mask, flat, torch.zeros_like(flat)).view_as(delta)


def test_component_densities_trim_attention_mlp_embeddings_norms_and_head(
    merger, tiny_family, tmp_path
):
    """TIES of one task vector (weight 1) is the base plus the trimmed task vector, so each
    component's density shows directly: 1 keeps δ whole, 0 drops it, 0.1 keeps the top 10%."""
    sd = states(tiny_family)
    density = {"attention": 1.0, "mlp": 0.0, "embeddings": 0.1, "norms": 0.25, "default": 0.5}
    recipe = Merge("ties", [Source("m1")], {"density": density}, Source("base"))
    merged = load_file(merger.merge(recipe, tmp_path / "c") / "model.safetensors")
    base, m1 = sd["base"], sd["m1"]
    for layer in (0, 1):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            name = f"model.layers.{layer}.self_attn.{proj}.weight"
            assert torch.equal(merged[name], base[name] + (m1[name] - base[name])), name
        for proj in ("gate_proj", "up_proj", "down_proj"):
            name = f"model.layers.{layer}.mlp.{proj}.weight"
            assert torch.equal(merged[name], base[name]), name
    expected_density = {
        "model.embed_tokens.weight": 0.1,
        "model.layers.0.input_layernorm.weight": 0.25,
        "model.layers.1.post_attention_layernorm.weight": 0.25,
        "model.norm.weight": 0.25,
        "lm_head.weight": 0.5,  # "head" is not in the mapping: the default
    }
    for name, d in expected_density.items():
        delta = m1[name] - base[name]
        expected = base[name] + keep_largest(delta, d)
        assert torch.allclose(merged[name], expected, atol=1e-7), name
        kept = int(torch.count_nonzero(merged[name] != base[name]))
        assert kept == int(d * delta.numel()), (name, kept)


def test_component_weights_for_embeddings_norms_and_head(merger, tiny_family, tmp_path):
    sd = states(tiny_family)
    w1 = {"embeddings": 0.9, "norms": 0.2, "head": 0.6, "default": 0.5}
    w2 = {"embeddings": 0.3, "norms": 0.7, "head": 0.1, "default": 0.25}
    recipe = Merge("linear", [Source("m1"), Source("m2")], {"weight": [w1, w2]})
    merged = load_file(merger.merge(recipe, tmp_path / "c") / "model.safetensors")
    components = {
        "model.embed_tokens.weight": "embeddings",
        "model.layers.0.input_layernorm.weight": "norms",
        "model.layers.1.post_attention_layernorm.weight": "norms",
        "model.norm.weight": "norms",
        "lm_head.weight": "head",
        "model.layers.0.self_attn.q_proj.weight": "default",
        "model.layers.1.mlp.down_proj.weight": "default",
    }
    for name, component in components.items():
        a, b = w1[component], w2[component]
        expected = (a * sd["m1"][name] + b * sd["m2"][name]) / (a + b)
        assert torch.allclose(merged[name], expected, atol=1e-6), name


def test_same_recipe_gives_identical_bytes_twice_and_in_another_process(
    merger, tiny_family, tmp_path
):
    recipe = Merge(
        "della",
        [Source("m1"), Source("m2"), Source("m3")],
        {"density": 0.5, "epsilon": 0.1},
        Source("base"),
        seed=3,
    )
    first = merger.merge(recipe, tmp_path / "a")
    second = merger.merge(recipe, tmp_path / "b")
    digest = hashlib.sha256((first / "model.safetensors").read_bytes()).hexdigest()
    assert digest == hashlib.sha256((second / "model.safetensors").read_bytes()).hexdigest()
    recipe_file = tmp_path / "recipe.json"
    shutil.copy(first / RECIPE_FILE, recipe_file)
    script = (
        "import hashlib, sys\n"
        "from pathlib import Path\n"
        "from agent_forge.evomerge.recipe_files import load_recipe_file\n"
        "from agent_forge.evomerge.sources import open_source\n"
        "from agent_forge.evomerge.merger import AdvancedModelMerger\n"
        "doc = load_recipe_file(sys.argv[1])\n"
        "sources = {n: open_source(n, p) for n, p in doc.sources.items()}\n"
        "m = AdvancedModelMerger(sources=sources, base=doc.base)\n"
        "out = m.merge(doc.recipe, Path(sys.argv[2]))\n"
        "print(hashlib.sha256((out / 'model.safetensors').read_bytes()).hexdigest())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(recipe_file), str(tmp_path / "c")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == digest


def test_sharded_output_has_an_index_and_loads(merger, tmp_path):
    from transformers import AutoModelForCausalLM

    single = load_file(
        merger.merge(recipe_for("linear"), tmp_path / "single") / "model.safetensors"
    )
    merger.settings = merger.settings.model_copy(update={"max_shard_size": "20KB"})
    out = merger.merge(recipe_for("linear"), tmp_path / "sharded")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all((out / f).is_file() for f in files)
    sharded = {name: tensor for f in files for name, tensor in load_file(out / f).items()}
    assert set(sharded) == set(single) and all(torch.equal(sharded[n], single[n]) for n in single)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(model.model.embed_tokens.weight, single["model.embed_tokens.weight"])


def test_bf16_sources_merge_in_float32_and_keep_bf16(tiny_family, tiny_tokenizer, tmp_path):
    from conftest import save_tiny_llama
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(tiny_family["base"])
    paths = {
        "base": save_tiny_llama(
            tmp_path / "b", tiny_tokenizer, seed=0, from_model=base, dtype=torch.bfloat16
        ),
        "x": save_tiny_llama(
            tmp_path / "x",
            tiny_tokenizer,
            seed=1,
            from_model=base,
            noise=0.05,
            dtype=torch.bfloat16,
        ),
        "y": save_tiny_llama(
            tmp_path / "y",
            tiny_tokenizer,
            seed=2,
            from_model=base,
            noise=0.05,
            dtype=torch.bfloat16,
        ),
    }
    merger = AdvancedModelMerger(
        sources={n: open_source(n, str(p)) for n, p in paths.items()}, base="base"
    )
    out = merger.merge(Merge("linear", [Source("x"), Source("y")], {}), tmp_path / "out")
    merged = load_file(out / "model.safetensors")
    sd = states(paths)
    name = "model.layers.0.mlp.up_proj.weight"
    assert merged[name].dtype == torch.bfloat16
    expected = ((sd["x"][name].float() + sd["y"][name].float()) / 2).to(torch.bfloat16)
    assert torch.equal(merged[name], expected)


# -- DFS -------------------------------------------------------------------------------------------


def manual_forward(models, path, stream_scales, input_ids):
    """Run source layers in ``path`` order, scaling the hidden stream by ``stream_scales[k]`` before
    slot k."""
    embed_model = models[0]
    hidden = embed_model.model.embed_tokens(input_ids)
    positions = torch.arange(input_ids.shape[1]).unsqueeze(0)
    rotary = embed_model.model.rotary_emb(hidden, positions)
    for (model_index, layer), w in zip(path, stream_scales, strict=True):
        hidden = hidden * w
        layer_module = models[model_index].model.layers[layer]
        out = layer_module(
            hidden, position_embeddings=rotary, attention_mask=None, position_ids=positions
        )
        hidden = out[0] if isinstance(out, tuple) else out
    return embed_model.lm_head(embed_model.model.norm(hidden))


def test_dfs_layer_path_with_scales_equals_scaling_the_stream(merger, tiny_family, tmp_path):
    """Branch scales s_k = 1/Π_{j≤k} w_j equal scaling the stream by w_k before slot k
    (DESIGN.md)."""
    from transformers import AutoModelForCausalLM

    models = [AutoModelForCausalLM.from_pretrained(tiny_family[n]).eval() for n in ("m1", "m2")]
    path = [(0, 0), (1, 1), (1, 0), (0, 1), (1, 1)]
    stream = [1.0, 0.8, 1.5, 0.6, 1.25]
    products = torch.tensor(stream).cumprod(0)
    slots = [
        LayerSlot(i, layer, float(1 / p)) for (i, layer), p in zip(path, products, strict=True)
    ]
    stack = merger._dfs_merge(slots, inputs=[Source("m1"), Source("m2")])
    merged = AutoModelForCausalLM.from_pretrained(merger.merge(stack, tmp_path / "dfs")).eval()
    assert merged.config.num_hidden_layers == 5
    ids = torch.tensor([[5, 17, 42, 9, 100, 3]])
    with torch.no_grad():
        expected = manual_forward(models, path, stream, ids)
        actual = merged(ids).logits
    assert torch.allclose(actual, expected, atol=1e-4), (actual - expected).abs().max()


def save_tiny_qwen2(folder: Path, tokenizer, layer_types: list[str]) -> Path:
    """A tiny Qwen2 whose layers are full or sliding-window attention as ``layer_types`` says."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=len(layer_types),
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        use_sliding_window=True,
        sliding_window=2,
        layer_types=layer_types,
    )
    torch.manual_seed(len(layer_types))
    Qwen2ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_dfs_takes_each_slots_per_layer_config_from_its_own_model(tiny_tokenizer, tmp_path):
    """Per-layer config lists (Qwen2's ``layer_types``) follow the slots, from models of
    different depths: slot k gets the entry of its own model's layer."""
    from transformers import AutoModelForCausalLM

    types = {
        "a": ["full_attention", "sliding_attention"],
        "b": ["sliding_attention", "full_attention", "full_attention", "sliding_attention"],
    }
    sources = {
        name: open_source(name, str(save_tiny_qwen2(tmp_path / name, tiny_tokenizer, layer_types)))
        for name, layer_types in types.items()
    }
    path = [(0, 1), (1, 0), (1, 3), (1, 2), (0, 0)]
    stack = LayerStack((Source("a"), Source("b")), tuple(LayerSlot(i, layer) for i, layer in path))
    out = AdvancedModelMerger(sources=sources).merge(stack, tmp_path / "stack")
    config = json.loads((out / "config.json").read_text())
    want = [types["ab"[i]][layer] for i, layer in path]
    assert want == ["sliding_attention", "sliding_attention", "sliding_attention"] + [
        "full_attention",
        "full_attention",
    ]
    assert config["layer_types"] == want and config["num_hidden_layers"] == 5
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.layer_types == want
    with torch.no_grad():
        assert model(torch.tensor([[5, 17, 42, 9, 100, 3]])).logits.shape[1] == 6


def test_a_stack_remaps_per_layer_lists_only():
    """``layer_types`` follows the slots; a list that merely has the layer count's length
    (``eos_token_id``) and ``architectures`` stay as they are."""
    from agent_forge.evomerge.layout import remap_layer_config

    config = {
        "num_hidden_layers": 2,
        "layer_types": ["full", "sliding"],
        "eos_token_id": [0, 1],
        "architectures": ["A", "B"],
    }
    out = remap_layer_config(config, [(config, 1, 2), (config, 1, 2), (config, 0, 2)])
    assert out["layer_types"] == ["sliding", "sliding", "full"]
    assert out["eos_token_id"] == [0, 1] and out["architectures"] == ["A", "B"]
    assert out["num_hidden_layers"] == 3


def test_in_memory_candidates_of_one_depth_with_other_configs_get_their_own_model(
    tiny_tokenizer, tmp_path
):
    """Two stacks of one depth whose layers differ in attention type (``layer_types``): each
    in-memory candidate runs with its own config, so its logits are its streamed model's."""
    from transformers import AutoModelForCausalLM

    folder = save_tiny_qwen2(
        tmp_path / "q", tiny_tokenizer, ["full_attention", "sliding_attention"]
    )
    sources = {"q": open_source("q", str(folder))}
    first = LayerStack((Source("q"),), (LayerSlot(0, 0), LayerSlot(0, 1)))
    second = LayerStack((Source("q"),), (LayerSlot(0, 1), LayerSlot(0, 0)))
    resident = AdvancedModelMerger(sources=sources, resident=True)
    ids = torch.tensor([[5, 17, 42, 9, 100, 3, 7, 11]])
    for stack in (first, second, first):
        streamed = AutoModelForCausalLM.from_pretrained(
            AdvancedModelMerger(sources=sources).merge(
                stack, tmp_path / stack.short_hash, overwrite=True
            )
        ).eval()
        held = resident.materialize(stack)
        assert held.config.layer_types == streamed.config.layer_types
        with torch.no_grad():
            assert torch.allclose(held(ids).logits, streamed(ids).logits, atol=1e-5)


@pytest.mark.parametrize("deeper_first", [False, True])
def test_merging_inputs_of_different_depths_is_a_clear_error(merger, tmp_path, deeper_first):
    """A merge over a 2-layer model and a 3-layer stack: an error naming both depths, no
    output (streaming once wrote a 2-layer model, dropping the third slot)."""
    stack = LayerStack((Source("m2"),), (LayerSlot(0, 0), LayerSlot(0, 1), LayerSlot(0, 1)))
    inputs = [stack, Source("m1")] if deeper_first else [Source("m1"), stack]
    with pytest.raises(ConfigurationError, match=r"different layer counts \[2, 3\]"):
        merger.merge(Merge("linear", inputs, {}), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_dfs_repeated_layers_give_a_deeper_model_that_runs(merger, resident, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    slots = [
        LayerSlot(0, 0),
        LayerSlot(0, 1),
        LayerSlot(1, 0),
        LayerSlot(1, 1),
        LayerSlot(2, 1, 0.5),
        LayerSlot(0, 1),
    ]
    stack = LayerStack((Source("m1"), Source("m2"), Source("m3")), tuple(slots))
    out = merger.merge(stack, tmp_path / "deep")
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.num_hidden_layers == 6
    generated = model.generate(
        **tokenizer("hello", return_tensors="pt"),
        max_new_tokens=3,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    assert generated.shape[1] > 1
    streamed = load_file(out / "model.safetensors")
    sd3 = load_file(Path(merger.sources["m3"].folder) / "model.safetensors")
    assert torch.equal(
        streamed["model.layers.4.mlp.down_proj.weight"],
        sd3["model.layers.1.mlp.down_proj.weight"] * 0.5,
    )
    assert torch.equal(
        streamed["model.layers.4.mlp.up_proj.weight"], sd3["model.layers.1.mlp.up_proj.weight"]
    )
    params = dict(resident.materialize(stack).named_parameters())
    assert all(torch.equal(streamed[n], params[n].detach()) for n in streamed)


def test_ps_dfs_stacks_a_ps_merge_with_the_sources(merger, tmp_path):
    from transformers import AutoModelForCausalLM

    ps = merger._ps_merge({"density": 0.5}, technique="ties")
    stack = merger._dfs_merge([(0, 0), (1, 1), (0, 1)], inputs=[ps, Source("m1"), Source("m2")])
    model = AutoModelForCausalLM.from_pretrained(merger.merge(stack, tmp_path / "psdfs"))
    assert model.config.num_hidden_layers == 3


# -- tied embeddings -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tied_family(tmp_path_factory, tiny_tokenizer) -> dict[str, Path]:
    """A base and three fine-tunes whose output head is the input embedding
    (``tie_word_embeddings``)."""
    from conftest import save_tiny_family

    root = tmp_path_factory.mktemp("tied_family")
    return save_tiny_family(root, tiny_tokenizer, ["t1", "t2", "t3"], seed=10, tie=True)


def tied_merger(family, **kwargs):
    sources = {n: open_source(n, str(p)) for n, p in family.items()}
    return AdvancedModelMerger(sources=sources, base="base", **kwargs)


def assert_tied(model):
    head, embed = model.lm_head.weight, model.model.embed_tokens.weight
    assert model.config.tie_word_embeddings
    assert head.data_ptr() == embed.data_ptr() and torch.equal(head, embed)


def generates(folder, model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer("the quick", return_tensors="pt")
    generated = model.generate(
        **ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    return generated.shape[1] == ids["input_ids"].shape[1] + 4


def test_merging_tied_models_keeps_the_tie(tied_family, tmp_path):
    from transformers import AutoModelForCausalLM

    sd = states(tied_family)
    assert "lm_head.weight" not in sd["t1"]  # the sources store the embedding once
    weights = [0.5, 0.3, 0.2]
    recipe = Merge("linear", [Source("t1"), Source("t2"), Source("t3")], {"weight": weights})
    out = tied_merger(tied_family).merge(recipe, tmp_path / "linear")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    merged = load_file(out / "model.safetensors")
    assert "lm_head.weight" not in merged
    name = "model.embed_tokens.weight"
    expected = sum(w * sd[m][name] for w, m in zip(weights, ("t1", "t2", "t3"), strict=True)) / sum(
        weights
    )
    assert torch.allclose(merged[name], expected, atol=1e-6)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert_tied(model)
    assert torch.allclose(model.lm_head.weight, expected, atol=1e-6)
    assert generates(out, model)

    # TIES too: the one embedding tensor is the formula, and the head is that tensor
    out = tied_merger(tied_family).merge(
        Merge("ties", [Source("t1"), Source("t2")], {"density": 0.4}, Source("base")),
        tmp_path / "ties",
    )
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert_tied(model)
    base = sd["base"][name]
    expected = base + reference_ties([sd[m][name] - base for m in ("t1", "t2")], 0.4)
    assert torch.allclose(model.lm_head.weight, expected, atol=1e-6)


def test_resident_merge_of_tied_models_keeps_the_head_on_the_embedding(tied_family, tmp_path):
    """The in-memory model re-points its parameters into one buffer: the head must follow the
    embedding there too, so its logits are those of the streamed folder's model."""
    from transformers import AutoModelForCausalLM

    recipe = Merge("linear", [Source("t1"), Source("t2")], {"weight": [0.7, 0.3]})
    out = tied_merger(tied_family).merge(recipe, tmp_path / "out")
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    resident = tied_merger(tied_family, resident=True)
    model = resident.materialize(recipe)
    assert_tied(model)
    ids = torch.tensor([[5, 17, 42, 9, 100, 3]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, loaded(ids).logits, atol=1e-5)
    # a second candidate overwrites the buffer in place; the head follows again
    second = Merge("linear", [Source("t1"), Source("t2")], {"weight": [0.1, 0.9]})
    model = resident.materialize(second)
    assert_tied(model)
    sd = states(tied_family)
    name = "model.embed_tokens.weight"
    assert torch.allclose(
        model.lm_head.weight, 0.1 * sd["t1"][name] + 0.9 * sd["t2"][name], atol=1e-6
    )


def test_dfs_stack_of_tied_models_keeps_the_tie_and_is_exact(tied_family, tmp_path):
    """A layer stack of tied models takes embeddings, final norm and (tied) head from
    ``embed_from``: it loads tied, equals running the source layers by hand, and generates."""
    from transformers import AutoModelForCausalLM

    merger = tied_merger(tied_family)
    models = [AutoModelForCausalLM.from_pretrained(tied_family[n]).eval() for n in ("t1", "t2")]
    path = [(0, 0), (1, 1), (1, 0), (0, 1)]
    stack = merger._dfs_merge(
        [LayerSlot(i, layer) for i, layer in path],
        inputs=[Source("t1"), Source("t2")],
        embed_from=1,
    )
    out = merger.merge(stack, tmp_path / "dfs")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    merged_sd = load_file(out / "model.safetensors")
    assert "lm_head.weight" not in merged_sd
    t2 = load_file(Path(tied_family["t2"]) / "model.safetensors")
    assert torch.equal(merged_sd["model.embed_tokens.weight"], t2["model.embed_tokens.weight"])
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert merged.config.num_hidden_layers == 4
    assert_tied(merged)
    ids = torch.tensor([[5, 17, 42, 9, 100, 3]])
    # manual_forward takes embeddings, norm and head from its first model: here t2
    reordered = [models[1], models[0]]
    flipped = [(1 - i, layer) for i, layer in path]
    with torch.no_grad():
        expected = manual_forward(reordered, flipped, [1.0] * len(path), ids)
        actual = merged(ids).logits
    assert torch.allclose(actual, expected, atol=1e-4), (actual - expected).abs().max()
    assert generates(out, merged)


# -- bad input -------------------------------------------------------------------------------------


def test_layer_slot_beyond_the_source_is_a_clear_error(merger):
    with pytest.raises(ConfigurationError, match="takes layer 7 of input 0, which has 2 layers"):
        merger._dfs_merge([(0, 7)])


def test_truncated_source_fails_without_leaving_an_output_folder(tiny_family, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_family["m2"], broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="damaged or incomplete"):
        sources = {
            "m1": open_source("m1", str(tiny_family["m1"])),
            "m2": open_source("m2", str(broken)),
        }
        AdvancedModelMerger(sources=sources).merge(
            Merge("linear", [Source("m1"), Source("m2")], {}), tmp_path / "out"
        )
    assert not (tmp_path / "out").exists()
    assert not any(p.name.startswith(".out.") for p in tmp_path.iterdir())


def test_shape_mismatch_mid_merge_is_a_clear_error_and_leaves_nothing(
    tiny_family, tiny_tokenizer, tmp_path
):
    from conftest import save_tiny_llama

    wide = tmp_path / "wide"
    save_tiny_llama(wide, tiny_tokenizer, seed=3, layers=2)
    cfg = json.loads((wide / "config.json").read_text())
    assert cfg["hidden_size"] == 32
    # rewrite one tensor with another shape: the folder is otherwise valid
    sd = load_file(wide / "model.safetensors")
    sd["model.layers.1.mlp.up_proj.weight"] = torch.zeros(65, 32)
    from safetensors.torch import save_file

    save_file(sd, wide / "model.safetensors")
    sources = {"m1": open_source("m1", str(tiny_family["m1"])), "w": open_source("w", str(wide))}
    with pytest.raises(EvoMergeException, match="model.layers.1.mlp.up_proj.weight"):
        AdvancedModelMerger(sources=sources).merge(
            Merge("linear", [Source("m1"), Source("w")], {}), tmp_path / "out"
        )
    assert not (tmp_path / "out").exists()


def test_output_inside_a_source_folder_is_refused(merger, tiny_family):
    with pytest.raises(ConfigurationError, match="inside source model folder"):
        merger.merge(recipe_for("linear"), Path(tiny_family["m1"]) / "merged")


def test_non_empty_output_is_not_overwritten(merger, tmp_path):
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(ConfigurationError, match="not empty"):
        merger.merge(recipe_for("linear"), target)
    assert (target / "keep.txt").read_text() == "mine"


def test_unknown_technique_in_recipe_file_is_a_clear_error(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(
        json.dumps(
            {
                "sources": {"a": "x", "b": "y"},
                "recipe": {
                    "type": "merge",
                    "technique": "tiez",
                    "inputs": [{"type": "source", "name": "a"}, {"type": "source", "name": "b"}],
                },
            }
        )
    )
    with pytest.raises(
        ConfigurationError, match="unknown merge technique 'tiez' \\(did you mean 'ties'\\?\\)"
    ):
        load_recipe_file(path)


# -- the same bytes however the work is cut up -----------------------------------------------------


@pytest.mark.parametrize("technique", ["ties", "dare_ties", "breadcrumbs_ties", "della"])
def test_bytes_do_not_depend_on_threads_block_sizes_or_batches(
    technique, tiny_family, tmp_path, monkeypatch
):
    """Streamed with tiny blocks, spans, batches and samples on 1 and 2 threads, and resident with
    the defaults: every tensor is the same bits (PS-style layer-dependent densities included)."""
    from agent_forge.evomerge import blockwise, graph, sparsify

    sources = {n: open_source(n, str(p)) for n, p in tiny_family.items()}
    density = [[0.3, 0.6, 0.45], 0.5, {"attention": 0.7, "default": 0.4}]
    recipe = Merge(
        technique,
        [Source("m1"), Source("m2"), Source("m3")],
        {"density": density, "weight": [0.5, 0.8, 0.3]}
        | ({"epsilon": 0.1} if technique == "della" else {}),
        Source("base"),
        seed=9,
    )
    resident = AdvancedModelMerger(sources=sources, base="base", resident=True)
    expected = {n: p.detach().clone() for n, p in resident.materialize(recipe).named_parameters()}
    for name, value in (("BLOCK", 48), ("WHOLE", 100), ("SPAN", 333)):
        monkeypatch.setattr(blockwise, name, value)
    monkeypatch.setattr(sparsify, "EXACT_SELECT", 200)
    monkeypatch.setattr(sparsify, "SAMPLE", 128)
    monkeypatch.setattr(graph, "BATCH_ELEMENTS", 1000)
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            merger = AdvancedModelMerger(
                sources={n: open_source(n, str(p)) for n, p in tiny_family.items()}, base="base"
            )
            streamed = load_file(merger.merge(recipe, tmp_path / f"t{count}") / "model.safetensors")
            assert set(streamed) == set(expected)
            for name, tensor in streamed.items():
                assert torch.equal(tensor, expected[name]), (count, name)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("head_model", ["t2", "m1"])
def test_a_stack_with_its_head_from_another_input_unties_it(
    tied_family, tiny_family, head_model, tmp_path
):
    """Embeddings from tied t1, final norm and head from ``head_from`` (tied t2, whose head is
    its embedding, or untied m1): the stack is written untied with that head, streamed and in
    memory alike, and computes t1's embedding → layers → the head input's norm and head."""
    from transformers import AutoModelForCausalLM

    folders = {"t1": tied_family["t1"], head_model: (tied_family | tiny_family)[head_model]}
    sources = {n: open_source(n, str(p)) for n, p in folders.items()}
    merger = AdvancedModelMerger(sources=sources)
    stack = LayerStack(
        (Source("t1"), Source(head_model)),
        (LayerSlot(0, 0), LayerSlot(1, 1), LayerSlot(0, 1)),
        embed_from=0,
        head_from=1,
    )
    out = merger.merge(stack, tmp_path / "stack")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    written = load_file(out / "model.safetensors")
    head_files = load_file(Path(folders[head_model]) / "model.safetensors")
    head = head_files.get("lm_head.weight", head_files["model.embed_tokens.weight"])
    assert torch.equal(written["lm_head.weight"], head)
    t1 = load_file(Path(folders["t1"]) / "model.safetensors")
    assert torch.equal(written["model.embed_tokens.weight"], t1["model.embed_tokens.weight"])
    models = [AutoModelForCausalLM.from_pretrained(folders[n]).eval() for n in ("t1", head_model)]
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    held = AdvancedModelMerger(sources=sources, resident=True).materialize(stack)
    ids = torch.tensor([[5, 17, 42, 9, 100, 3]])
    with torch.no_grad():
        hidden = models[0].model.embed_tokens(ids)
        positions = torch.arange(ids.shape[1]).unsqueeze(0)
        rotary = models[0].model.rotary_emb(hidden, positions)
        for index, layer in ((0, 0), (1, 1), (0, 1)):
            out_ = models[index].model.layers[layer](
                hidden, position_embeddings=rotary, attention_mask=None, position_ids=positions
            )
            hidden = out_[0] if isinstance(out_, tuple) else out_
        expected = models[1].model.norm(hidden) @ head.T
        assert torch.allclose(merged(ids).logits, expected, atol=1e-4)
        assert torch.allclose(held(ids).logits, expected, atol=1e-4)
