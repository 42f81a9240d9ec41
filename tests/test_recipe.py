"""Recipes: canonical JSON, stable hashes, validation, round trips, linear collapse."""

from __future__ import annotations

import json

import pytest
import torch

from agent_forge.evomerge.exceptions import ConfigurationError
from agent_forge.evomerge.graph import RecipeGraph, SourcePool
from agent_forge.evomerge.recipe import (
    LayerSlot,
    LayerStack,
    Merge,
    Source,
    collapse_linear,
    recipe_from_dict,
    recipe_from_json,
)

A, B, C, BASE = Source("a"), Source("b"), Source("c"), Source("base")


def test_equivalent_spellings_have_one_canonical_form_and_hash():
    terse = Merge("ties", [A, B], {"density": 0.5}, BASE)
    explicit = Merge(
        "ties",
        [A, B],
        {"weight": [1, 1.0], "density": [0.5, 0.5], "lambda": 1, "normalize": True},
        BASE,
    )
    assert terse == explicit and terse.hash == explicit.hash
    assert terse.canonical_json == explicit.canonical_json
    assert len({terse, explicit}) == 1


def test_hash_changes_with_any_parameter_input_or_seed():
    base = Merge("dare_ties", [A, B], {"density": 0.5}, BASE, seed=1)
    variants = [
        Merge("dare_ties", [A, B], {"density": 0.5000001}, BASE, seed=1),
        Merge("dare_ties", [B, A], {"density": 0.5}, BASE, seed=1),
        Merge("dare_ties", [A, B], {"density": 0.5}, BASE, seed=2),
        Merge("dare_linear", [A, B], {"density": 0.5}, BASE, seed=1),
    ]
    assert len({base.hash, *(v.hash for v in variants)}) == 5


def test_seed_is_dropped_for_deterministic_techniques():
    assert Merge("ties", [A, B], {}, BASE, seed=1) == Merge("ties", [A, B], {}, BASE, seed=99)
    assert "seed" not in Merge("ties", [A, B], {}, BASE, seed=1).to_dict()


def test_round_trip_through_json_keeps_floats_exact():
    recipe = LayerStack(
        (Merge("linear", [A, B], {"weight": [0.1 + 0.2, 1 / 3]}), C),
        (LayerSlot(0, 0, 0.7), LayerSlot(1, 3, 1e-3), LayerSlot(0, 1)),
        embed_from=1,
    )
    again = recipe_from_json(json.dumps(recipe.to_dict()))
    assert again == recipe and again.hash == recipe.hash
    assert again.inputs[0].params["weight"][0] == 0.1 + 0.2


def test_hash_is_stable_across_versions_of_this_code():
    """The hash is sha256 of the canonical JSON: pin one value so an accidental format change
    shows."""
    recipe = Merge("linear", [A, B], {"weight": [1.0, 2.0]})
    assert recipe.canonical_json == (
        '{"inputs":[{"name":"a","type":"source"},{"name":"b","type":"source"}],'
        '"params":{"normalize":true,"weight":[1.0,2.0]},"technique":"linear","type":"merge"}'
    )
    import hashlib

    assert recipe.hash == hashlib.sha256(recipe.canonical_json.encode()).hexdigest()


@pytest.mark.parametrize(
    "data,message",
    [
        (
            {"type": "merge", "technique": "ties", "inputs": [{"type": "source", "name": "a"}]},
            "ties needs a base model",
        ),
        (
            {
                "type": "merge",
                "technique": "linear",
                "inputs": [{"type": "source", "name": "a"}],
                "extra": 1,
            },
            "unknown key 'extra'",
        ),
        ({"type": "blend", "inputs": []}, "unknown node type 'blend'"),
        (
            {
                "type": "merge",
                "technique": "linear",
                "inputs": [
                    {"type": "source", "name": "a"},
                    {"type": "merge", "technique": "ties", "inputs": []},
                ],
            },
            r"recipe.inputs\[1\]: ties needs a base model",
        ),
        (
            {
                "type": "layer_stack",
                "inputs": [{"type": "source", "name": "a"}],
                "slots": [[1, 0, 1.0]],
            },
            "names input 1, but there are 1",
        ),
        (
            {"type": "layer_stack", "inputs": [{"type": "source", "name": "a"}], "slots": []},
            "at least one layer slot",
        ),
        ({"type": "source", "name": ""}, "non-empty model name"),
    ],
)
def test_invalid_recipes_name_the_node_and_problem(data, message):
    with pytest.raises(ConfigurationError, match=message):
        recipe_from_dict(data)


def test_depth_and_source_names():
    inner = Merge("ties", [A, B], {}, BASE)
    outer = Merge("linear", [inner, C], {})
    assert outer.depth() == 2 and inner.depth() == 1 and A.depth() == 0
    assert outer.source_names() == {"a", "b", "c", "base"}


def test_linear_of_linear_collapses_to_one_node_with_the_same_value(tiny_sources):
    m1, m2, m3 = Source("m1"), Source("m2"), Source("m3")
    inner = Merge("linear", [m1, m2], {"weight": [1.0, 3.0]})  # (m1 + 3 m2) / 4
    nested = Merge(
        "linear", [inner, m3, m1], {"weight": [2.0, 1.0, 1.0]}
    )  # (2·inner + m3 + m1) / 4
    flat = collapse_linear(nested)
    assert flat.depth() == 1
    # 2·(1/4) + 1 for m1, 2·(3/4) for m2, 1 for m3
    assert [s.name for s in flat.inputs] == ["m1", "m2", "m3"]
    assert flat.params["weight"] == [1.5, 1.5, 1.0]
    graph = RecipeGraph(SourcePool(tiny_sources, "base"))
    for name in ("model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight"):
        assert torch.allclose(graph.compute(flat, name), graph.compute(nested, name), atol=1e-6)


def test_collapse_keeps_an_unnormalised_input_of_a_normalised_node(tiny_sources):
    """(½)·[(m1 + m2) + m3] is not (m1 + m2 + m3)/3: the unnormalised inner merge stays a
    node, and the value is unchanged."""
    m1, m2, m3 = Source("m1"), Source("m2"), Source("m3")
    inner = Merge("linear", [m1, m2], {"weight": [1.0, 1.0], "normalize": False})
    nested = Merge("linear", [inner, m3], {"weight": [1.0, 1.0]})
    collapsed = collapse_linear(nested)
    assert collapsed.depth() == 2
    graph = RecipeGraph(SourcePool(tiny_sources, "base"))
    name = "model.layers.0.mlp.up_proj.weight"
    a, b, c = (graph.compute(s, name) for s in (m1, m2, m3))
    assert torch.allclose(graph.compute(collapsed, name), (a + b + c) / 2, atol=1e-6)


def test_collapse_leaves_non_linear_nodes_and_recurses_into_them():
    inner = Merge("linear", [A, Merge("linear", [B, C], {})], {})
    ties = Merge("ties", [inner, C], {}, BASE)
    collapsed = collapse_linear(ties)
    assert collapsed.technique == "ties" and collapsed.inputs[0].depth() == 1


def test_inner_subtrees_are_cached_between_candidates_and_give_the_same_bits(tiny_sources):
    """A nested candidate's inner merge is computed once and reused by the next candidate
    that contains it (the cached leaf of a deep tree), with identical values."""
    m1, m2, m3, base = Source("m1"), Source("m2"), Source("m3"), Source("base")
    inner = Merge("ties", [m1, m2], {"density": 0.5}, base)
    first = Merge("linear", [inner, m3], {"weight": [0.7, 0.3]})
    second = Merge("task_arithmetic", [inner, m1], {"lambda": 0.5}, base)
    cached = RecipeGraph(SourcePool(tiny_sources, "base"), subtree_cache_bytes=10**8)
    plain = RecipeGraph(SourcePool(tiny_sources, "base"))
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(cached.compute(first, name), plain.compute(first, name))
    assert (inner.hash, name) in cached._subtree_cache  # the inner node was kept
    kept = cached._subtree_cache[(inner.hash, name)]
    assert torch.equal(kept, plain.compute(inner, name))
    assert torch.equal(cached.compute(second, name), plain.compute(second, name))
    assert cached._subtree_cache[(inner.hash, name)] is kept  # reused, not recomputed
    assert (first.hash, name) not in cached._subtree_cache  # roots are not cached
