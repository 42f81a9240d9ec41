"""Existing recipes keep giving the models they gave: recipe hashes (exact) and a position-weighted
checksum of what the merge changed in every tensor, pinned from the engine before the registry
and plan/execute restructuring (the pinned values come from commit 550655b).

A failure here means a recipe someone saved (``evomerge_recipe.json``, a run's records) no longer
names, or no longer computes, the model it did. The checksums are compared to 1e-6 relative
rather than as bytes, so that CPUs whose vector widths round a tail element differently agree;
each restructuring step is also checked byte for byte on the machine that makes it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from agent_forge.evomerge.config import create_default_config
from agent_forge.evomerge.merger import AdvancedModelMerger
from agent_forge.evomerge.recipe import LayerSlot, LayerStack, Merge, RecipeNode, Source

CONFIG = create_default_config()
SOURCES = tuple(Source(m.name) for m in CONFIG.models)
BASE = Source("base")
RECIPES: dict[str, RecipeNode] = {
    "linear": Merge("linear", SOURCES, {"weight": [0.2, 0.5, 0.3]}),
    "task_arithmetic": Merge(
        "task_arithmetic", SOURCES, {"weight": [0.1, 0.6, 0.4], "lambda": 0.9}, BASE
    ),
    "ties": Merge(
        "ties",
        SOURCES,
        {"weight": [[0.3, 0.6, 1.0, 0.2, 0.5, 0.9], 0.7, 0.4], "density": 0.4},
        BASE,
    ),
    "dare_ties": Merge("dare_ties", SOURCES, {"density": [0.3, 0.6, 0.9]}, BASE, seed=7),
    "della_linear": Merge("della_linear", SOURCES, {"density": 0.5, "epsilon": 0.1}, BASE, seed=3),
    "breadcrumbs_ties": Merge("breadcrumbs_ties", SOURCES, {"density": 0.8, "gamma": 0.05}, BASE),
    "layer_stack": LayerStack(
        SOURCES,
        tuple(
            LayerSlot(i % 3, layer, 1.0 if layer % 2 else 0.75)
            for i, layer in enumerate([0, 1, 1, 2, 3, 3])
        ),
    ),
}
PINNED: dict[str, tuple[str, float]] = {
    "linear": (
        "3de8486b069d057790b6c2907d2bdee9819a56c22648df1aea2755fdad3a6688",
        3021.0051981399065,
    ),
    "task_arithmetic": (
        "98128e5ca5b3358a68b156cca18f7098660088506f38be6b3c375b97cf3b9dae",
        1844.629616216429,
    ),
    "ties": (
        "a2f0926b28c6380976ba90234d87a94b6b42293bd21d491813fc3b22e9653f22",
        9962.530856878164,
    ),
    "dare_ties": (
        "b0a7f2c2e45554fff507185fa4df47bd09e422da36563a45007ef0229873e6af",
        12348.204666942542,
    ),
    "della_linear": (
        "9b30eab13df5d632f13ca5a0bded01f057348e4cf9ecdd3072fc706b4fe0d1a7",
        13895.291508602932,
    ),
    "breadcrumbs_ties": (
        "8de1b2fe7380d19f104b99ad841647844176d10740d6f62263b8cabd43b3b627",
        8681.926280455105,
    ),
    "layer_stack": (
        "9ede1a389d678191ae94c1c809cb736341573a71c780d672b8f7e278901dc308",
        110242.07398499746,
    ),
}


def merged(recipe: RecipeNode) -> dict[str, torch.Tensor]:
    paths = {r.name: r.path for r in [*CONFIG.models, CONFIG.base_model] if r is not None}
    with tempfile.TemporaryDirectory() as tmp:
        dest = Path(tmp) / "out"
        AdvancedModelMerger(CONFIG).merge(recipe, dest, source_paths=paths)
        return load_file(dest / "model.safetensors")


def checksum(tensors: dict[str, torch.Tensor]) -> float:
    """Σ over tensors (the k-th name) of (k + 1)·|Σᵢ (xᵢ − baseᵢ)·(1 + i mod 7)|: what the merge
    changed, weighted by position and name, so that it moves with any value the merge sets."""
    base = load_file(Path(CONFIG.base_model.path) / "model.safetensors")
    total = 0.0
    for k, name in enumerate(sorted(tensors)):
        flat = tensors[name].double().flatten()
        if name in base and base[name].numel() == flat.numel():
            flat = flat - base[name].double().flatten()
        positions = torch.arange(flat.numel(), dtype=torch.float64) % 7 + 1
        total += (k + 1) * abs(float((flat * positions).sum()))
    return total


@pytest.mark.parametrize("name", list(RECIPES))
def test_an_existing_recipe_gives_the_model_it_gave(name):
    recipe_hash, value = PINNED[name]
    assert RECIPES[name].hash == recipe_hash
    assert checksum(merged(RECIPES[name])) == pytest.approx(value, rel=1e-6)
