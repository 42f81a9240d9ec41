"""The evolutionary operators' behaviour, pinned: every operator chain yields a valid recipe, the
weaker candidates are the ones merged, patience resets on improvement, switches happen at their
rate, scale genes reach the recipe, layers get inserted, small populations still mutate."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from agent_forge.evomerge.config import EvolutionSettings, MergeSettings
from agent_forge.evomerge.genomes import LayerPathGenome
from agent_forge.evomerge.operators import (
    SearchSpace,
    change_inputs,
    initial_population,
    merge_lower,
    mutate_layer_stack,
    mutate_merge,
    mutate_recipe,
    recipe_layers,
    stack_recipe,
    technique_recipe,
)
from agent_forge.evomerge.recipe import LayerStack, Merge, RecipeNode, Source, recipe_from_dict
from agent_forge.evomerge.search import TournamentSearch, lower_merge_slots
from agent_forge.evomerge.techniques import MERGE_TECHNIQUES, model_stock

LAYERS = 3


def space(**evolution) -> SearchSpace:
    return SearchSpace(
        ("a", "b", "c"), "base", LAYERS, MergeSettings(), EvolutionSettings(**evolution)
    )


def assert_valid(recipe: RecipeNode, sp: SearchSpace) -> None:
    """Valid as a user's recipe file would be checked: every node rebuilt from its dict (which
    runs every parameter rule, DELLA's joint one included), depth bounded, every layer slot
    naming a layer its input has."""
    again = recipe_from_dict(recipe.to_dict())
    assert again.hash == recipe.hash
    assert recipe.depth() <= sp.merge.max_depth
    stack: list[RecipeNode] = [recipe]
    while stack:
        node = stack.pop()
        if isinstance(node, LayerStack):
            for slot in node.slots:
                assert slot.layer < recipe_layers(node.inputs[slot.input], sp)
                assert 0.5 <= slot.scale <= 2.0
        if isinstance(node, Merge):
            assert len({recipe_layers(i, sp) for i in node.inputs}) == 1, "inputs of unequal depth"
        stack.extend(node.children())


SEARCHED = [t for t in MERGE_TECHNIQUES if t != "passthrough"]


@pytest.mark.parametrize("technique", SEARCHED)
def test_every_operator_chain_yields_a_valid_recipe(technique):
    """Hundreds of random mutation / technique-switch / layer-refine / stack / merge steps from
    each technique, with every rate turned up: each result passes the recipe checks."""
    sp = space(
        mutation_rate=1.0,
        mutation_strength=1.0,
        technique_switch_rate=0.5,
        layer_refine_rate=0.5,
    )
    rng = np.random.default_rng(SEARCHED.index(technique))
    pool = [technique_recipe(technique, sp, rng, exact_defaults=False) for _ in range(4)]
    for step in range(300):
        op = step % 3
        if op == 0 or len(pool) < 2:
            child = mutate_recipe(pool[int(rng.integers(len(pool)))], sp, rng)
        elif op == 1:
            made = merge_lower(pool, sp, rng)
            child = made[0] if made else mutate_recipe(pool[0], sp, rng)
        else:
            child = stack_recipe(pool[int(rng.integers(len(pool)))], sp, rng) or pool[0]
        assert_valid(child, sp)
        pool = [*pool[-5:], child]


def test_della_with_per_layer_epsilons_stays_valid_when_its_density_moves():
    """The failure the issue reports: ``epsilon`` refined per layer while ``density`` stays a
    scalar; a density perturbed towards 1 must shrink every epsilon of that input."""
    sp = space(
        mutation_rate=1.0, mutation_strength=1.0, layer_refine_rate=0.0, technique_switch_rate=0.0
    )
    for technique in ("della", "della_linear"):
        node = Merge(
            technique,
            sp.sources,
            {"density": 0.5, "epsilon": [[0.2] * (LAYERS + 2)] * 3},
            Source("base"),
        )
        for seed in range(200):
            child = mutate_merge(node, sp, np.random.default_rng(seed))
            assert_valid(child, sp)
            for d, eps in zip(child.params["density"], child.params["epsilon"], strict=True):
                for e in eps:
                    assert d >= 1.0 or (0 < d - e and d + e < 1)


def test_the_weaker_candidates_are_the_ones_merged():
    sp = space(population_size=8, elite_size=2, lower_merge_count=2)
    rng = np.random.default_rng(0)
    recipes = [technique_recipe("ties", sp, rng, exact_defaults=False) for _ in range(8)]
    merged_parents: list[str] = []
    for seed in range(12):
        strategy = TournamentSearch(sp, "mixed", seed)
        strategy.population = list(recipes)
        strategy.tell([(r, float(i)) for i, r in enumerate(recipes)])  # fitness = index
        strategy.ask()
        merged_parents += [h for hs in strategy.parents.values() if len(hs) > 1 for h in hs]
    weaker = {r.hash for r in recipes[:4]}
    assert merged_parents and set(merged_parents) <= weaker


def test_patience_resets_on_improvement():
    sp = space(patience=2, min_delta=0.01)
    strategy = TournamentSearch(sp, "mixed", 0)
    recipe = technique_recipe("linear", sp, np.random.default_rng(0), exact_defaults=True)
    for fitness, stops in [(0.5, False), (0.5, False), (0.6, False), (0.6, False), (0.6, True)]:
        strategy.tell([(recipe, fitness)])
        assert strategy.should_stop() is stops
    strategy.tell([(recipe, 0.605)])  # within min_delta: no improvement
    assert strategy.should_stop()


@pytest.mark.parametrize("rate", [0.0, 0.3])
def test_technique_switches_happen_at_their_rate(rate):
    sp = space(technique_switch_rate=rate)
    node = Merge("ties", sp.sources, {"density": 0.5}, Source("base"))
    trials = 2000
    switched = sum(
        mutate_merge(node, sp, np.random.default_rng(seed)).technique != "ties"
        for seed in range(trials)
    )
    assert abs(switched / trials - rate) < 0.04


def test_scale_genes_reach_the_recipe():
    genome = LayerPathGenome([Source("a"), Source("b")], [2, 2], repetitions=1)
    count = len(genome.candidates)  # 4 bits, then 4 scales
    x = [1.0, 0.0, 1.0, 1.0] + [0.0, 0.9, 0.5, 1.0]
    stack = genome.decode(x)
    assert [(s.input, s.layer) for s in stack.slots] == [(0, 0), (1, 0), (1, 1)]
    # scale = 0.5 · (2.0 / 0.5) ** u, by hand: u = 0 → 0.5, u = 0.5 → 1.0, u = 1 → 2.0
    assert [s.scale for s in stack.slots] == [0.5, 1.0, 2.0]
    assert count == 4


def test_layer_stack_mutation_inserts_layers():
    sp = space(mutation_rate=1.0)
    stack = LayerStack(sp.sources, ((0, 0, 1.0), (0, 1, 1.0), (0, 2, 1.0)))
    inserted = 0
    for seed in range(100):
        child = mutate_layer_stack(stack, sp, np.random.default_rng(seed))
        parent_slots = {(s.input, s.layer) for s in stack.slots}
        inserted += any((s.input, s.layer) not in parent_slots for s in child.slots)
    assert inserted > 30


@pytest.mark.parametrize("parent", ["layer_stack", "merge"])
def test_mutating_a_nested_layer_stack_keeps_its_depth(parent):
    """A stack inside another stack (whose slots name its layers) or inside a merge (whose
    inputs must have equal depth) keeps its layer count; only the root may grow or shrink."""
    sp = space(mutation_rate=0.5, technique_switch_rate=0.0)
    inner = LayerStack(sp.sources, tuple((0, i, 1.0) for i in range(LAYERS)))
    if parent == "layer_stack":
        outer: RecipeNode = LayerStack((inner, Source("b")), tuple((0, i, 1.0) for i in range(3)))
    else:
        outer = Merge("linear", (inner, Source("b")), {"weight": [0.5, 0.5]})
    resized = 0
    for seed in range(60):
        child = mutate_recipe(outer, sp, np.random.default_rng(seed))
        assert_valid(child, sp)
        assert recipe_layers(child.children()[0], sp) == LAYERS
        resized += recipe_layers(child, sp) != LAYERS
    if parent == "layer_stack":
        assert resized > 0  # the root itself still grows and shrinks


def _kinds(recipe: RecipeNode) -> set[str]:
    """The technique names of a tree's merges, ``dfs`` for its stacks, ``ps`` for per-layer
    values."""
    if isinstance(recipe, Source):
        return set()
    found = {"dfs"} if isinstance(recipe, LayerStack) else {recipe.technique}  # type: ignore[union-attr]
    if isinstance(recipe, Merge) and any(
        isinstance(v, list) and any(isinstance(x, list) for x in v) for v in recipe.params.values()
    ):
        found.add("ps")
    return found.union(*(_kinds(c) for c in recipe.children()))


def test_merge_techniques_limit_what_the_search_builds():
    """With ``techniques`` set, the first generation, switches, refinement, stacks and merges of
    weaker candidates stay inside it (every rate turned up so each operator would leave it)."""
    allowed = {"linear", "ties", "slerp"}
    sp = SearchSpace(
        ("a", "b", "c"),
        "base",
        LAYERS,
        MergeSettings(techniques=sorted(allowed)),
        EvolutionSettings(technique_switch_rate=0.5, layer_refine_rate=0.5),
    )
    rng = np.random.default_rng(0)
    pool = initial_population("mixed", sp, rng, 8)
    assert {r.technique for r in pool} == allowed  # type: ignore[union-attr]
    seen: set[str] = set()
    for step in range(300):
        if step % 2:
            made = merge_lower(pool, sp, rng)
            child = made[0] if made else pool[0]
        else:
            child = mutate_recipe(pool[int(rng.integers(len(pool)))], sp, rng)
        seen |= _kinds(child)
        pool = [*pool[-7:], child]
    assert seen <= allowed
    assert len(seen) == 3  # switches did happen
    open_space = space(technique_switch_rate=0.5, layer_refine_rate=0.5)
    unlimited = {k for r in initial_population("mixed", open_space, rng, 8) for k in _kinds(r)}
    assert {"dfs", "ps"} <= unlimited  # the check above can see stacks and per-layer values


def test_input_changes_carry_each_inputs_values():
    """Drop, swap and add: the inputs a child keeps keep their weights, an added input copies
    one of them."""
    sp = SearchSpace(("a", "b", "c", "d"), "base", LAYERS, MergeSettings(), EvolutionSettings())
    weights = {"a": 0.1, "b": 0.2, "c": 0.3}
    params = {"weight": list(weights.values()), "lambda": 0.7}
    tech = MERGE_TECHNIQUES["task_arithmetic"]
    moves = set()
    for seed in range(60):
        inputs, out = change_inputs(
            [Source(n) for n in weights], params, tech, sp, np.random.default_rng(seed)
        )
        names = [i.name for i in inputs]  # type: ignore[attr-defined]
        assert len(out["weight"]) == len(names) and out["lambda"] == 0.7
        if len(names) == 2:
            moves.add("drop")
            assert out["weight"] == [weights[n] for n in names]
        elif len(names) == 4:
            moves.add("add")
            assert (
                out["weight"][:3] == list(weights.values()) and out["weight"][3] in weights.values()
            )
            assert names[3] == "d"
        else:
            moves.add("swap")
            assert "d" in names and out["weight"] == list(weights.values())
    assert moves == {"drop", "swap", "add"}


def test_mutation_tries_input_pairs_the_parent_lacks():
    sp = SearchSpace(("a", "b", "c"), "base", LAYERS, MergeSettings(), EvolutionSettings())
    slerp = Merge("slerp", (Source("a"), Source("b")), {"t": 0.5})
    children = [mutate_merge(slerp, sp, np.random.default_rng(k)) for k in range(300)]
    still = [c for c in children if c.technique == "slerp"]  # some switched technique first
    pairs = [tuple(i.name for i in c.inputs) for c in still]  # type: ignore[attr-defined]
    new = sum(p != ("a", "b") for p in pairs)
    assert all(len(p) == 2 for p in pairs)  # slerp keeps two inputs
    assert 0.05 * len(still) <= new <= 0.15 * len(still)  # at the switch rate, 0.1
    assert {p for p in pairs if "c" in p} >= {("c", "b"), ("a", "c")}


def test_operators_create_layer_stacks():
    sp = space(technique_switch_rate=0.5)
    rng = np.random.default_rng(3)
    ties = Merge("ties", sp.sources, {"density": 0.5}, Source("base"))
    mutants = [mutate_recipe(ties, sp, rng) for _ in range(200)]
    stacks = [m for m in mutants if isinstance(m, LayerStack)]
    assert stacks and all(s.inputs[0] == ties for s in stacks)
    lower = [technique_recipe("ties", sp, rng, exact_defaults=False) for _ in range(4)]
    made = [merge_lower(lower, sp, rng) for _ in range(200)]
    assert any(isinstance(m[0], LayerStack) for m in made if m)


def test_small_populations_mutate_every_generation():
    assert lower_merge_slots(4, 2, 2) == 1 and lower_merge_slots(8, 2, 2) == 2
    sp = space(population_size=4, elite_size=2, lower_merge_count=2, tournament_size=2)
    strategy = TournamentSearch(sp, "mixed", 7)
    rng = np.random.default_rng(1)
    for _ in range(6):
        population = strategy.ask()
        strategy.tell([(r, float(rng.random())) for r in population])
    for generation in range(5):
        population = strategy.ask()
        mutants = [h for h, parents in strategy.parents.items() if len(parents) == 1]
        assert mutants, f"generation {generation} holds no mutated candidate"
        strategy.tell([(r, float(rng.random())) for r in population])


def test_model_stock_filter_wise_takes_a_ratio_per_row():
    """Row 0 of the two task vectors point the same way (cos 1, t = 1), row 1 are orthogonal
    (cos 0, t = 0): per row, the result is the mean in row 0 and zero in row 1; over the whole
    tensor (cos 2/3 here), t = 2·(2/3) / (1 + 2/3) = 0.8 everywhere."""
    deltas = torch.tensor([[[1.0, 1.0], [1.0, 0.0]], [[1.0, 1.0], [0.0, 1.0]]])
    mean = deltas.mean(dim=0)
    per_row = model_stock(deltas, filter_wise=True)
    assert torch.allclose(per_row[0], mean[0]) and torch.allclose(per_row[1], torch.zeros(2))
    whole = model_stock(deltas, filter_wise=False)
    cos = 2.0 / (math.sqrt(3) * math.sqrt(3))  # (1·1 + 1·1 + 1·0 + 0·1) / (|a| |b|)
    t = 2 * cos / (1 + cos)
    assert math.isclose(t, 0.8)
    assert torch.allclose(whole, t * mean)


@pytest.mark.parametrize(("layers", "expected_changes"), [(3, 0.1 * 18), (30, 4.0)])
def test_drawn_layer_paths_change_a_few_layers_at_any_depth(layers, expected_changes):
    """A first-generation layer path is its identity path with a few changes: 10% of the bits
    of a shallow model, but about 4 at most of a 30-layer one (10% of its 180 bits, 18 random
    insertions and removals, left SmolLM2-135M scoring 0)."""
    sp = SearchSpace(("a", "b", "c"), "base", layers, MergeSettings(), EvolutionSettings())
    rng = np.random.default_rng(0)
    changes = []
    for _ in range(200):
        stack = initial_population("dfs", sp, rng, 2)[1]  # the second is drawn around identity
        identity = {(0, layer) for layer in range(layers)}
        drawn = {(slot.input, slot.layer) for slot in stack.slots}
        changes.append(len(identity ^ drawn))
    assert np.mean(changes) == pytest.approx(expected_changes, rel=0.25)


def test_a_technique_switch_keeps_only_parameters_that_mean_the_same():
    from agent_forge.evomerge.operators import _same_param
    from agent_forge.evomerge.techniques import get_technique

    della, ram, ties = get_technique("della"), get_technique("ram"), get_technique("ties")
    assert _same_param(della, ties, "weight") and _same_param(della, ties, "density")
    assert not _same_param(della, ram, "epsilon")  # a per-model spread vs one |δ| threshold
    assert not _same_param(ram, della, "epsilon") and not _same_param(ties, ram, "weight")
