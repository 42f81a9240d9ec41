"""mergekit-style YAML: translated into recipes, and — for the deterministic techniques — giving the
same tensors as mergekit itself does from the same file (mergekit is a test-only comparator)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from conftest import save_perturbed_family
from safetensors.torch import load_file, save_file

from agent_forge.evomerge.exceptions import ConfigurationError
from agent_forge.evomerge.merger import AdvancedModelMerger
from agent_forge.evomerge.recipe import LayerStack, Merge
from agent_forge.evomerge.recipe_files import load_recipe_file
from agent_forge.evomerge.sources import open_source

RUN_MERGEKIT = textwrap.dedent(
    """
    import sys, yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    for config_path, out in zip(sys.argv[1::2], sys.argv[2::2]):
        config = MergeConfiguration.model_validate(yaml.safe_load(open(config_path)))
        run_merge(config, out, MergeOptions(copy_tokenizer=False, quiet=True, lazy_unpickle=False))
    """
)


def configs(family: dict[str, Path]) -> dict[str, dict]:
    base, m1, m2, m3 = (str(family[n]) for n in ("base", "m1", "m2", "m3"))
    three = [
        {"model": m1, "parameters": {"weight": 0.5, "density": 0.6}},
        {"model": m2, "parameters": {"weight": 0.3, "density": 0.4}},
        {"model": m3, "parameters": {"weight": 0.2, "density": 0.8}},
    ]
    return {
        "linear": {
            "merge_method": "linear",
            "models": [
                {"model": m1, "parameters": {"weight": 2.0}},
                {"model": m2, "parameters": {"weight": 1.0}},
            ],
        },
        "task_arithmetic": {
            "merge_method": "task_arithmetic",
            "base_model": base,
            "models": [
                {"model": m1, "parameters": {"weight": 0.7}},
                {"model": m2, "parameters": {"weight": 0.4}},
            ],
            "parameters": {"lambda": 0.9},
        },
        "ties": {
            "merge_method": "ties",
            "base_model": base,
            "models": three,
            "parameters": {"lambda": 1.1},
        },
        "ties_defaults": {
            "merge_method": "ties",
            "base_model": base,
            "models": [
                {"model": m1, "parameters": {"weight": 0.6}},
                {"model": m2, "parameters": {"weight": 0.4}},
            ],
        },
        "breadcrumbs": {
            "merge_method": "breadcrumbs",
            "base_model": base,
            "models": [
                {"model": m1, "parameters": {"weight": 0.6, "density": 0.7, "gamma": 0.05}},
                {"model": m2, "parameters": {"weight": 0.4, "density": 0.9, "gamma": 0.02}},
            ],
        },
        "breadcrumbs_ties": {
            "merge_method": "breadcrumbs_ties",
            "base_model": base,
            "models": three,
        },
        "model_stock": {
            "merge_method": "model_stock",
            "base_model": base,
            "models": [{"model": m1}, {"model": m2}, {"model": m3}],
        },
        "slerp": {
            "merge_method": "slerp",
            "base_model": m1,
            "models": [{"model": m1}, {"model": m2}],
            "parameters": {
                "t": [
                    {"filter": "self_attn", "value": [0.0, 0.5, 0.3, 0.7, 1.0]},
                    {"filter": "mlp", "value": [1.0, 0.5, 0.7, 0.3, 0.0]},
                    {"value": 0.4},
                ]
            },
        },
        "slerp_base_listed_second": {
            "merge_method": "slerp",
            "base_model": m2,
            "models": [{"model": m1}, {"model": m2}],
            "parameters": {"t": 0.3},
        },
        "catch_all_first_wins": {  # mergekit takes the first matching condition
            "merge_method": "linear",
            "models": [
                {
                    "model": m1,
                    "parameters": {"weight": [{"value": 0.4}, {"filter": "mlp", "value": 3.0}]},
                },
                {"model": m2, "parameters": {"weight": 1.0}},
            ],
        },
        "filters_fall_back_to_the_top_level": {
            "merge_method": "ties",
            "base_model": base,
            "models": [
                {"model": m1, "parameters": {"weight": [{"filter": "mlp", "value": 0.9}]}},
                {"model": m2, "parameters": {"density": [{"filter": "self_attn", "value": 0.3}]}},
            ],
            "parameters": {"weight": 0.5, "density": 0.7},
        },
        # mergekit matches a filter as a substring of the tensor name: on a Llama "attention"
        # is only post_attention_layernorm, "norm" every norm, "mlp.gate" only gate_proj
        **{
            f"filter_{label}": {
                "merge_method": "task_arithmetic",
                "base_model": base,
                "models": [
                    {
                        "model": m1,
                        "parameters": {"weight": [{"filter": f, "value": 2.0}, {"value": 0.5}]},
                    },
                    {"model": m2, "parameters": {"weight": 0.4}},
                ],
            }
            for label, f in (("attention", "attention"), ("norm", "norm"), ("mlp_gate", "mlp.gate"))
        },
        "filters_in_order_first_match_wins": {  # q_proj is in self_attn: it never gets 3.0
            "merge_method": "ties",
            "base_model": base,
            "models": [
                {
                    "model": m1,
                    "parameters": {
                        "weight": [
                            {"filter": "self_attn", "value": 0.2},
                            {"filter": "q_proj", "value": 3.0},
                            {"filter": "layers.1.", "value": 1.5},
                        ],
                        "density": [{"filter": "q_proj", "value": 0.3}, {"value": 0.8}],
                    },
                },
                {"model": m2, "parameters": {"weight": 0.4}},
            ],
            "parameters": {"weight": [{"filter": "mlp", "value": 0.7}, {"value": 0.6}]},
        },
        "task_arithmetic_normalised_out_bf16": {
            "merge_method": "task_arithmetic",
            "base_model": base,
            "models": [
                {"model": m1, "parameters": {"weight": 0.7}},
                {"model": m2, "parameters": {"weight": 0.4}},
            ],
            "parameters": {"normalize": True, "lambda": 0.9},
            "out_dtype": "bfloat16",
        },
        "nearswap": {
            "merge_method": "nearswap",
            "base_model": base,
            "models": [{"model": base}, {"model": m1}],
            "parameters": {"t": 0.002},
        },
        "sce": {
            "merge_method": "sce",
            "base_model": base,
            "models": [{"model": m1}, {"model": m2}, {"model": m3}],
        },
        "sce_select_topk": {
            "merge_method": "sce",
            "base_model": base,
            "models": [{"model": m1}, {"model": m2}, {"model": m3}],
            "parameters": {"select_topk": 0.3},
        },
        "karcher": {
            "merge_method": "karcher",
            "models": [{"model": m1}, {"model": m2}, {"model": m3}],
        },
        "karcher_few_steps": {
            "merge_method": "karcher",
            "models": [{"model": m1}, {"model": m2}, {"model": m3}],
            "parameters": {"max_iter": 1, "tol": 1e-7},
        },
        "multislerp": {
            "merge_method": "multislerp",
            "base_model": base,
            "models": [
                {"model": m1, "parameters": {"weight": 0.5}},
                {"model": m2, "parameters": {"weight": 0.3}},
                {"model": m3, "parameters": {"weight": 0.2}},
            ],
        },
        "multislerp_without_base": {
            "merge_method": "multislerp",
            "models": [
                {"model": m1, "parameters": {"weight": 1.0}},
                {"model": m2, "parameters": {"weight": 2.0}},
            ],
        },
        "nuslerp": {
            "merge_method": "nuslerp",
            "base_model": base,
            "models": [
                {"model": m1, "parameters": {"weight": 0.3}},
                {"model": m2, "parameters": {"weight": 0.7}},
            ],
        },
        "nuslerp_columns_without_base": {
            "merge_method": "nuslerp",
            "models": [
                {"model": m1, "parameters": {"weight": 0.6}},
                {"model": m2, "parameters": {"weight": 0.4}},
            ],
            "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
        },
        "nuslerp_rows": {
            "merge_method": "nuslerp",
            "base_model": base,
            "models": [
                {"model": m1, "parameters": {"weight": 0.5}},
                {"model": m3, "parameters": {"weight": 0.5}},
            ],
            "parameters": {"nuslerp_flatten": False},
        },
        "arcee_fusion": {
            "merge_method": "arcee_fusion",
            "base_model": base,
            "models": [{"model": base}, {"model": m1}],
        },
        "ram": {
            "merge_method": "ram",
            "base_model": base,
            "models": [{"model": m1}, {"model": m2}, {"model": m3}],
            "parameters": {"epsilon": 0.02},  # δ ~ N(0, 0.02²): 0 to 3 models move each entry
        },
        "ram_defaults": {
            "merge_method": "ram",
            "base_model": base,
            "models": [{"model": m1}, {"model": m2}],
        },
        "ramplus_tl": {
            "merge_method": "ramplus_tl",
            "base_model": base,
            "models": [{"model": m1}, {"model": m2}, {"model": m3}],
            "parameters": {"epsilon": 0.02, "r": 0.05, "alpha": 20.0},  # ρ ≈ 9: not clamped
        },
        "ramplus_tl_clamped": {
            "merge_method": "ramplus_tl",
            "base_model": base,
            "models": [{"model": m1}, {"model": m2}, {"model": m3}],
            "parameters": {"epsilon": 0.02, "r": 0.5},
        },
        "passthrough": {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": m1, "layer_range": [0, 2]}]},
                {"sources": [{"model": m2, "layer_range": [1, 2]}]},
            ],
        },
    }


@pytest.fixture(scope="module")
def mergekit_outputs(tiny_family, tmp_path_factory):
    pytest.importorskip("mergekit", reason="mergekit is a test extra: pip install -e '.[test]'")
    root = tmp_path_factory.mktemp("mergekit")
    args = []
    for name, config in configs(tiny_family).items():
        config = {**config, "dtype": "float32"}
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        args += [str(path), str(root / f"{name}-out")]
    subprocess.run([sys.executable, "-c", RUN_MERGEKIT, *args], check=True, capture_output=True)
    return root


def evomerge_merge(yaml_path: Path, out: Path) -> dict[str, torch.Tensor]:
    def layers(model: str) -> int:
        return open_source("probe", model).config["num_hidden_layers"]

    document = load_recipe_file(yaml_path, layer_count=layers)
    sources = {name: open_source(name, path) for name, path in document.sources.items()}
    merger = AdvancedModelMerger(sources=sources, base=document.base)
    if document.dtype:  # as the CLI's --merge does
        merger.settings = merger.settings.model_copy(update={"dtype": document.dtype})
    return load_file(merger.merge(document.recipe, out) / "model.safetensors")


@pytest.mark.parametrize(
    "name",
    [
        "linear",
        "task_arithmetic",
        "ties",
        "ties_defaults",
        "breadcrumbs",
        "breadcrumbs_ties",
        "model_stock",
        "slerp",
        "slerp_base_listed_second",
        "catch_all_first_wins",
        "filters_fall_back_to_the_top_level",
        "filter_attention",
        "filter_norm",
        "filter_mlp_gate",
        "filters_in_order_first_match_wins",
        "task_arithmetic_normalised_out_bf16",
        "nearswap",
        "sce",
        "sce_select_topk",
        "karcher",
        "karcher_few_steps",
        "multislerp",
        "multislerp_without_base",
        "nuslerp",
        "nuslerp_columns_without_base",
        "nuslerp_rows",
        "arcee_fusion",
        "ram",
        "ram_defaults",
        "ramplus_tl",
        "ramplus_tl_clamped",
        "passthrough",
    ],
)
def test_same_tensors_as_mergekit(name, mergekit_outputs, tmp_path):
    ours = evomerge_merge(mergekit_outputs / f"{name}.yaml", tmp_path / "ours")
    out = mergekit_outputs / f"{name}-out"
    theirs = {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}
    assert set(ours) == set(theirs)
    for tensor_name, tensor in theirs.items():
        assert torch.allclose(ours[tensor_name], tensor, rtol=1e-5, atol=1e-6), (
            tensor_name,
            (ours[tensor_name] - tensor).abs().max(),
        )


def mergekit_merge(config: dict, root: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """``config`` written as a float32 YAML under ``root``, and mergekit's merge of it."""
    path = root / "mergekit.yaml"
    path.write_text(yaml.safe_dump({**config, "dtype": "float32"}))
    out = root / "mergekit-out"
    subprocess.run(
        [sys.executable, "-c", RUN_MERGEKIT, str(path), str(out)], check=True, capture_output=True
    )
    return path, {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.fixture(scope="module")
def tiny_qwen3_family(tmp_path_factory, tiny_tokenizer):
    from transformers import Qwen3Config

    config = Qwen3Config(
        vocab_size=len(tiny_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
    )
    return save_perturbed_family(tmp_path_factory.mktemp("qwen3"), tiny_tokenizer, config)


@pytest.mark.parametrize("target", ["q_norm", "self_attn"])
def test_qwen3_filters_reach_q_norm_as_in_mergekit(target, tiny_qwen3_family, tmp_path):
    """Qwen3's q_norm/k_norm sit inside self_attn: a "self_attn" filter reaches them (they are
    norms by component), a "q_norm" filter reaches only q_norm."""
    pytest.importorskip("mergekit", reason="mergekit is a test extra: pip install -e '.[test]'")
    family = {k: str(v) for k, v in tiny_qwen3_family.items()}
    weight = [{"filter": target, "value": 2.0}, {"value": 0.5}]
    config = {
        "merge_method": "task_arithmetic",
        "base_model": family["base"],
        "models": [
            {"model": family["m1"], "parameters": {"weight": weight}},
            {"model": family["m2"], "parameters": {"weight": 0.4}},
        ],
    }
    path, theirs = mergekit_merge(config, tmp_path)
    ours = evomerge_merge(path, tmp_path / "ours")
    assert set(ours) == set(theirs)
    for name, tensor in theirs.items():
        assert torch.allclose(ours[name], tensor, rtol=1e-5, atol=1e-6), name
    base = load_file(Path(family["base"]) / "model.safetensors")
    m1 = load_file(Path(family["m1"]) / "model.safetensors")
    m2 = load_file(Path(family["m2"]) / "model.safetensors")
    q_norm = "model.layers.0.self_attn.q_norm.weight"
    expected = base[q_norm] + 2.0 * (m1[q_norm] - base[q_norm]) + 0.4 * (m2[q_norm] - base[q_norm])
    assert torch.allclose(ours[q_norm], expected, atol=1e-6)


def _shifted_copy(base: Path, out: Path, delta: dict[str, torch.Tensor]) -> Path:
    """A copy of the model at ``base`` with ``delta`` added to its tensors."""
    shutil.copytree(base, out)
    tensors = load_file(base / "model.safetensors")
    save_file(
        {k: v + delta[k] for k, v in tensors.items()},
        out / "model.safetensors",
        metadata={"format": "pt"},
    )
    return out


def test_model_stock_with_opposed_task_vectors_matches_mergekit(tiny_family, tmp_path):
    """Task vectors pointing mostly opposite ways (cos ≈ -0.7): mergekit's t is negative, and
    EvoMerge's default follows it (``clamp_cosine`` would keep the base instead)."""
    pytest.importorskip("mergekit", reason="mergekit is a test extra: pip install -e '.[test]'")
    base = tiny_family["base"]
    generator = torch.Generator().manual_seed(7)
    tensors = load_file(base / "model.safetensors")
    delta = {
        k: 0.02 * torch.randn(v.shape, generator=generator) for k, v in sorted(tensors.items())
    }
    wobble = {
        k: 0.02 * torch.randn(v.shape, generator=generator) for k, v in sorted(tensors.items())
    }
    first = _shifted_copy(base, tmp_path / "first", delta)
    opposed = {k: wobble[k] - delta[k] for k in delta}
    second = _shifted_copy(base, tmp_path / "second", opposed)
    config = {
        "merge_method": "model_stock",
        "base_model": str(base),
        "models": [{"model": str(first)}, {"model": str(second)}],
    }
    path, theirs = mergekit_merge(config, tmp_path)
    ours = evomerge_merge(path, tmp_path / "ours")
    base_tensors = load_file(base / "model.safetensors")
    stepped_away = 0
    for name, tensor in theirs.items():
        assert torch.allclose(ours[name], tensor, rtol=1e-5, atol=1e-6), name
        mean = (delta[name] + opposed[name]) / 2
        stepped_away += int(((tensor - base_tensors[name]) * mean).sum() < 0)
    assert stepped_away == len(theirs)  # t < 0 in every tensor: the case the clamp changes


def test_a_bfloat16_yaml_is_computed_in_float32_and_rounded_once(tiny_family, tmp_path):
    """A deliberate difference: mergekit computes a ``dtype: bfloat16`` merge in bfloat16."""
    config = configs(tiny_family)["ties"]
    merged = {}
    for dtype in ("float32", "bfloat16"):
        path = tmp_path / f"{dtype}.yaml"
        path.write_text(yaml.safe_dump({**config, "dtype": dtype}))
        merged[dtype] = evomerge_merge(path, tmp_path / dtype)
    for name, tensor in merged["bfloat16"].items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, merged["float32"][name].to(torch.bfloat16)), name


def test_mergekit_defaults_fill_what_the_yaml_leaves_out(tiny_family, tmp_path):
    path = tmp_path / "dare.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "merge_method": "dare_ties",
                "base_model": str(tiny_family["base"]),
                "models": [
                    {"model": str(tiny_family[n]), "parameters": {"weight": 0.5}}
                    for n in ("m1", "m2")
                ],
            }
        )
    )
    recipe = load_recipe_file(path).recipe
    assert isinstance(recipe, Merge)
    assert recipe.params["density"] == [1.0, 1.0]
    assert recipe.params["rescale"] == "l1" and recipe.params["normalize"] is False
    # mergekit's rescale is a boolean: false turns DARE's rescaling off
    config = yaml.safe_load(path.read_text()) | {
        "parameters": {"rescale": False, "normalize": True}
    }
    path.write_text(yaml.safe_dump(config))
    recipe = load_recipe_file(path).recipe
    assert recipe.params["rescale"] == "none" and recipe.params["normalize"] is True


def test_slices_become_a_layer_stack(tiny_family, tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(configs(tiny_family)["passthrough"]))
    document = load_recipe_file(path)
    assert isinstance(document.recipe, LayerStack)
    assert [(s.input, s.layer) for s in document.recipe.slots] == [(0, 0), (0, 1), (1, 1)]
    assert document.sources == {"m1": str(tiny_family["m1"]), "m2": str(tiny_family["m2"])}


@pytest.mark.parametrize(
    "config,message",
    [
        (
            {"merge_method": "frankenmerge", "models": [{"model": "a"}, {"model": "b"}]},
            "merge_method 'frankenmerge' is not supported",
        ),
        (
            {"merge_method": "ties", "models": [{"model": "a"}, {"model": "b"}]},
            "ties needs base_model",
        ),
        (
            {"merge_method": "linear", "models": [{"model": "a"}], "tokenizer_source": "union"},
            "tokenizer_source",
        ),
        (
            {"merge_method": "linear", "models": [{"model": "a"}, {"model": "b"}]},
            "model a has no weight, which mergekit requires for linear",
        ),
        (
            {
                "merge_method": "slerp",
                "base_model": "a",
                "models": [{"model": "a"}, {"model": "b"}],
                "parameters": {"t": [{"filter": "mlp", "value": 0.5}]},
            },
            "'t' has filters but no value for the tensors they do not match",
        ),
    ],
)
def test_unsupported_mergekit_features_are_clear_errors(config, message, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigurationError, match=message):
        load_recipe_file(path)
