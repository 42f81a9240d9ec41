"""Search strategies and operators on their own: a sphere in recipe parameters, no models needed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from agent_forge.evomerge.config import EvolutionSettings, MergeSettings
from agent_forge.evomerge.genomes import LayerPathGenome, ParamsGenome
from agent_forge.evomerge.operators import (
    SearchSpace,
    initial_population,
    merge_lower,
    mutate_recipe,
    tournament_selection,
)
from agent_forge.evomerge.recipe import LayerStack, Merge, RecipeNode, Source
from agent_forge.evomerge.search import (
    CMAESSearch,
    TournamentSearch,
    make_strategy,
    refine_strategy,
)
from agent_forge.evomerge.techniques import get_technique

TARGET_WEIGHTS = [0.2, 0.7, 0.4]
TARGET_LAMBDA = 0.8


def space(**evolution) -> SearchSpace:
    return SearchSpace(("a", "b", "c"), "base", 2, MergeSettings(), EvolutionSettings(**evolution))


def sphere(recipe: RecipeNode) -> float:
    """Higher is better; 0 at the target weights and λ of a task-arithmetic merge of the sources
    (anything else — another technique, other inputs, a merge of merges — scores -10)."""
    if not (
        isinstance(recipe, Merge)
        and recipe.technique == "task_arithmetic"
        and recipe.inputs == tuple(Source(n) for n in "abc")
    ):
        return -10.0
    weights = recipe.params["weight"]
    return (
        -sum((w - t) ** 2 for w, t in zip(weights, TARGET_WEIGHTS, strict=True))
        - (recipe.params["lambda"] - TARGET_LAMBDA) ** 2
    )


def run(strategy, generations: int) -> list[float]:
    bests = []
    for _ in range(generations):
        recipes = strategy.ask()
        scored = [(r, sphere(r)) for r in recipes]
        strategy.tell(scored)
        bests.append(max(f for _, f in scored))
    return bests


@pytest.mark.parametrize("kind", ["tournament", "cmaes"])
def test_each_strategy_improves_on_a_sphere(kind):
    evo = dict(
        population_size=8,
        num_generations=30,
        patience=100,
        technique_switch_rate=0.0,
        lower_merge_count=0,
        layer_refine_rate=0.0,
    )
    strategy = make_strategy(kind, "task_arithmetic", space(**evo), seed=3)
    bests = run(strategy, 25)
    assert max(bests) > bests[0] + 0.05
    assert max(bests) > -0.01  # within ~0.1 of the optimum in every coordinate


@pytest.mark.parametrize("kind", ["tournament", "cmaes"])
def test_state_dict_round_trip_gives_the_same_next_ask(kind):
    strategy = make_strategy(
        kind, "task_arithmetic", space(patience=100, layer_refine_rate=0.0), seed=5
    )
    run(strategy, 3)
    state = json.loads(json.dumps(strategy.state_dict()))
    again = make_strategy(
        kind, "task_arithmetic", space(patience=100, layer_refine_rate=0.0), seed=5
    )
    again.load_state_dict(state)
    assert [r.hash for r in again.ask()] == [r.hash for r in strategy.ask()]


def test_cmaes_with_a_fixed_seed_is_reproducible():
    first = [
        [r.hash for r in make_strategy("cmaes", "ps", space(), seed=9).ask()] for _ in range(2)
    ]
    assert first[0] == first[1]
    a, b = (
        make_strategy("cmaes", "ps", space(), seed=9),
        make_strategy("cmaes", "ps", space(), seed=10),
    )
    assert [r.hash for r in a.ask()] != [r.hash for r in b.ask()]


def test_tournament_selection_picks_by_fitness():
    recipes = [
        Merge("linear", [Source("a"), Source("b")], {"weight": [1.0, float(i)]}) for i in range(6)
    ]
    scored = [(r, float(f)) for r, f in zip(recipes, [0.1, 0.9, 0.3, 0.5, 0.2, 0.4], strict=True)]
    rng = np.random.default_rng(0)
    # a tournament over the whole population always returns the fittest
    assert all(tournament_selection(scored, 6, rng) is recipes[1] for _ in range(20))
    # tournaments of two pick fitter candidates more often: the worst can never win
    wins = [tournament_selection(scored, 2, rng) for _ in range(3000)]
    counts = [sum(w is r for w in wins) for r in recipes]
    assert counts[0] == 0 and counts[1] > counts[3] > counts[2] > counts[4]


def test_mutation_stays_in_range_and_is_seed_deterministic():
    sp = space(mutation_rate=1.0, mutation_strength=1.0, technique_switch_rate=0.3)
    recipe = Merge(
        "ties", [Source("a"), Source("b"), Source("c")], {"density": 0.5}, Source("base")
    )
    for seed in range(40):
        child = mutate_recipe(recipe, sp, np.random.default_rng(seed))
        assert child.hash == mutate_recipe(recipe, sp, np.random.default_rng(seed)).hash
        assert child.hash != recipe.hash
        if isinstance(child, LayerStack):  # the switch into data-flow space wraps the recipe
            assert child.inputs[0] == recipe
            continue
        tech = get_technique(child.technique)
        for param in tech.params:
            if param.is_numeric and param.search:
                values = child.params[param.name] if param.per_input else [child.params[param.name]]
                leaves = [x for v in values for x in (v if isinstance(v, list) else [v])]
                assert all(param.search[0] <= v <= param.search[1] for v in leaves), (
                    param.name,
                    values,
                )


def test_mutation_of_a_layer_stack_keeps_valid_slots_and_scales():
    sp = space(mutation_rate=0.8, technique_switch_rate=0.0)
    stack = LayerStack((Source("a"), Source("b")), ((0, 0, 1.0), (1, 1, 1.0), (0, 1, 1.0)))
    rng = np.random.default_rng(1)
    for _ in range(50):
        stack = mutate_recipe(stack, sp, rng)
        assert isinstance(stack, LayerStack) and 1 <= len(stack.slots) <= 2 * 2 * 2
        assert all(s.layer < 2 and 0.5 <= s.scale <= 2.0 for s in stack.slots)


def test_initial_mixed_population_covers_the_techniques():
    population = initial_population("mixed", space(), np.random.default_rng(0), 8)
    kinds = [r.technique if isinstance(r, Merge) else "dfs" for r in population]
    assert kinds == [
        "linear",
        "ties",
        "dare_ties",  # the PS merge (ps_technique dare_ties, per-layer values)
        "dfs",
        "task_arithmetic",
        "dare_ties",
        "slerp",
        "della",
    ]
    ps = population[2]
    assert (
        isinstance(ps.params["weight"][0], list) and len(ps.params["weight"][0]) == 4
    )  # 2 layers + 2
    assert population[0].params == {"weight": [1.0] * 3, "normalize": True}  # the plain average
    small = initial_population("mixed", space(), np.random.default_rng(0), 4)
    # DFS even in a population of four
    assert [type(r).__name__ for r in small].count("LayerStack") == 1
    assert len({r.hash for r in population}) == 8
    without_base = SearchSpace(("a", "b", "c"), None, 2, MergeSettings(), EvolutionSettings())
    kinds = {
        type(r).__name__ + getattr(r, "technique", "")
        for r in initial_population("mixed", without_base, np.random.default_rng(0), 8)
    }
    assert kinds <= {"Mergelinear", "Mergeslerp", "LayerStack"} and "LayerStack" in kinds


def test_merging_lower_performers_builds_a_node_over_their_recipes():
    sp = space()
    lower = [
        Merge("ties", [Source("a"), Source("b")], {"density": d}, Source("base"))
        for d in (0.3, 0.6, 0.9)
    ]
    rng = np.random.default_rng(4)
    made = [merge_lower(lower, sp, rng) for _ in range(20)]
    for recipe, parents in filter(None, made):
        assert all(p in lower for p in parents) and 2 <= len(parents) <= 3
        assert recipe.depth() == 2 and all(child in lower for child in recipe.inputs)


def test_merging_lower_performers_never_builds_past_max_depth():
    """Depth bounding: a node over depth-2 recipes is depth 3, so ``max_depth: 2`` makes none
    (``3`` does); linear nodes over linear merges collapse to depth 1, within ``max_depth: 1``."""

    def bounded(depth: int) -> SearchSpace:
        return SearchSpace(
            ("a", "b", "c"), "base", 2, MergeSettings(max_depth=depth), EvolutionSettings()
        )

    leaves = [Source("a"), Source("b"), Source("c")]
    deep = [
        Merge("slerp", [Merge("ties", leaves, {"density": d}, Source("base")), Source("a")], {})
        for d in (0.3, 0.6, 0.9)
    ]
    assert all(r.depth() == 2 for r in deep)
    rng = np.random.default_rng(0)
    assert all(merge_lower(deep, bounded(2), rng) is None for _ in range(30))
    made = list(filter(None, (merge_lower(deep, bounded(3), rng) for _ in range(30))))
    assert made and all(recipe.depth() == 3 for recipe, _ in made)
    linear = [Merge("linear", leaves, {"weight": [w, 1.0, 1.0]}) for w in (0.5, 1.0, 2.0)]
    made = list(filter(None, (merge_lower(linear, bounded(1), rng) for _ in range(30))))
    assert made
    for recipe, _ in made:
        assert recipe.technique == "linear" and recipe.depth() == 1
        assert sorted(i.name for i in recipe.inputs) == ["a", "b", "c"]


def test_genomes_decode_into_valid_recipes():
    ps = ParamsGenome("dare_ties", [Source("a"), Source("b")], Source("base"), groups=4, seed=1)
    assert ps.size == 2 * 4 * 2 + 1  # weight and density per model and group, plus λ
    recipe = ps.decode(np.full(ps.size, 0.5))
    assert recipe.params["weight"][0] == [0.5] * 4
    assert recipe.params["density"][1] == [0.55] * 4  # the middle of its range (0.1, 1.0)
    path = LayerPathGenome([Source("a"), Source("b")], [2, 2], repetitions=2)
    identity = path.decode(path.initial())
    assert [(s.input, s.layer, s.scale) for s in identity.slots] == [(0, 0, 1.0), (0, 1, 1.0)]
    none_kept = path.decode(np.zeros(path.size))
    assert len(none_kept.slots) == 1


def test_tournament_keeps_elites_unchanged():
    strategy = TournamentSearch(
        space(elite_size=2, patience=100, layer_refine_rate=0.0), "task_arithmetic", seed=0
    )
    first = strategy.ask()
    strategy.tell([(r, sphere(r)) for r in first])
    ranked = sorted(((r, sphere(r)) for r in first), key=lambda x: -x[1])
    second = strategy.ask()
    assert [r.hash for r in second[:2]] == [ranked[0][0].hash, ranked[1][0].hash]


def test_cmaes_rejects_a_told_list_of_the_wrong_length():
    strategy = CMAESSearch(
        ParamsGenome("ties", [Source("a"), Source("b")], Source("base")), EvolutionSettings(), 0
    )
    recipes = strategy.ask()
    with pytest.raises(Exception, match="different number"):
        strategy.tell([(recipes[0], 0.0)])


def test_layer_refinement_keeps_the_parents_tensors_until_perturbed(tiny_sources):
    """A per-model weight turned into per-layer-group copies computes exactly the same model."""
    import torch

    from agent_forge.evomerge.graph import RecipeGraph, SourcePool
    from agent_forge.evomerge.operators import refine_by_layer

    sp = space()
    parent = Merge(
        "task_arithmetic",
        [Source("m1"), Source("m2"), Source("m3")],
        {"weight": [0.3, 0.5, 0.2], "lambda": 0.9},
        Source("base"),
    )
    refined_params = refine_by_layer(
        dict(parent.params), get_technique("task_arithmetic"), sp, np.random.default_rng(0)
    )
    assert refined_params["weight"] == [[0.3] * 4, [0.5] * 4, [0.2] * 4]
    child = Merge("task_arithmetic", parent.inputs, refined_params, parent.base)
    assert child.hash != parent.hash
    graph = RecipeGraph(SourcePool(tiny_sources, "base"))
    for name in (
        "model.embed_tokens.weight",
        "model.layers.1.self_attn.o_proj.weight",
        "lm_head.weight",
    ):
        assert torch.equal(graph.compute(child, name), graph.compute(parent, name))


def test_refine_starts_at_the_best_merge_with_one_value_per_layer_group():
    sp = space()  # 2 layers: 4 groups (embeddings, two layers, head)
    sources = sp.sources
    best = Merge(
        "ties", sources, {"weight": [0.2, 0.7, 0.4], "density": 0.6, "lambda": 0.8}, sp.base_node
    )
    strategy = refine_strategy(sp, best, seed=5)
    assert strategy is not None
    assert strategy.genome.size == 3 * 4 + 4  # weights per input and group, λ per group
    start = strategy.genome.decode(strategy.mean)
    # TIES normalises by the weights: the same merge, with the largest weight at the middle
    # of its range [0, 1] instead of wherever the tournament left it
    assert np.allclose(start.params["weight"], [[w / 1.4] * 4 for w in (0.2, 0.7, 0.4)])
    assert start.params["density"] == [0.6] * 3  # sparsity stays as the search left it
    assert start.params["lambda"] == pytest.approx([0.8] * 4)
    assert start.params["normalize"] == best.params["normalize"]
    asked = strategy.ask()
    assert best in asked  # the best joins the first generation: the stage never ends below it
    children = [r for r in asked if r != best]
    assert len(children) == sp.evolution.population_size
    for child in children:
        assert (child.technique, child.inputs, child.base) == ("ties", sources, sp.base_node)
        assert all(len(v) == 4 for v in child.params["weight"])
        assert child.params["density"] == [0.6] * 3
        assert strategy.parents[child.hash] == [best.hash]


def test_refine_keeps_weights_that_do_not_normalise_as_they_are():
    sp = space()
    best = Merge("task_arithmetic", sp.sources, {"weight": [0.2, 0.9, 0.4]}, sp.base_node)
    strategy = refine_strategy(sp, best, seed=5)
    start = strategy.genome.decode(strategy.mean)
    assert np.allclose(start.params["weight"], [[w] * 4 for w in (0.2, 0.9, 0.4)])


def test_refine_coarsens_layer_groups_to_its_budget():
    """Three evaluations per searched value: a linear merge of three 30-layer models (32
    positions) refined by 6 candidates over 4 generations gets 24 evaluations, so 8 values:
    two groups of three weights. A budget of 400 affords every position."""
    best = Merge("linear", tuple(Source(n) for n in "abc"), {"weight": [1.0, 1.0, 1.0]})

    def refined_groups(population: int, generations: int) -> int:
        evolution = EvolutionSettings(
            population_size=population,
            tournament_size=2,
            elite_size=1,
            num_generations=generations,
            refine_generations=generations,
        )
        sp = SearchSpace(("a", "b", "c"), "base", 30, MergeSettings(), evolution)
        strategy = refine_strategy(sp, best, seed=0)
        assert strategy.genome.size * 3 <= population * generations
        return strategy.genome.groups

    assert refined_groups(6, 4) == 2
    assert refined_groups(8, 10) == 8
    assert refined_groups(10, 40) == 32


def test_refine_finds_values_that_differ_by_layer():
    """A target only per-layer values reach: SLERP's t should be 0.2 in the first half of the
    positions and 0.8 in the second. The best single t (0.5) is the start."""
    sp = space(population_size=8)
    best = Merge("slerp", sp.sources[:2], {"t": 0.5})
    target = [0.2, 0.2, 0.8, 0.8]

    def fitness(recipe: Merge) -> float:
        t = recipe.params["t"]
        t = t if isinstance(t, list) else [t] * 4
        return -sum((a - b) ** 2 for a, b in zip(t, target, strict=True))

    strategy = refine_strategy(sp, best, seed=0)
    assert strategy is not None and strategy.genome.size == 4
    found = fitness(best)
    for _ in range(25):
        asked = strategy.ask()
        scores = [fitness(r) for r in asked]
        strategy.tell(list(zip(asked, scores, strict=True)))
        found = max(found, *scores)
    assert fitness(best) == pytest.approx(-0.36)
    assert found > -0.02


def test_nothing_to_refine_gives_no_stage():
    sp = space()
    assert refine_strategy(sp, Source("a"), 0) is None
    stack = LayerStack((Source("a"),), ((0, 0), (0, 1)))
    assert refine_strategy(sp, stack, 0) is None
    only = SearchSpace(
        ("a", "b", "c"), "base", 2, MergeSettings(techniques=["slerp"]), EvolutionSettings()
    )
    assert refine_strategy(only, Merge("slerp", only.sources[:2], {"t": 0.5}), 0) is None
