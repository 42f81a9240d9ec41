"""Evolutionary operators on recipes: initial populations, mutation, tournament selection, and the
merging of lower performers. Pure functions of their inputs and a seeded ``numpy`` generator.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .config import EvolutionSettings, MergeSettings
from .genomes import LayerPathGenome, ParamsGenome
from .recipe import LayerSlot, LayerStack, Merge, RecipeNode, Source, collapse_linear
from .techniques import (
    MERGE_TECHNIQUES,
    Param,
    Technique,
    get_technique,
    searched_params,
)

logger = logging.getLogger(__name__)

#: The mixed population's kinds, in the order the first generation takes them: the plain
#: average first (the yardstick), then one of each family — sign election, the per-layer PS
#: merge, the DFS layer stack, plain task arithmetic, random drops — so that even a population
#: of four holds every kind of search space.
MIXED_ORDER = (
    "linear",
    "ties",
    "ps",
    "dfs",
    "task_arithmetic",
    "dare_ties",
    "slerp",
    "della",
    "breadcrumbs",
    "model_stock",
    "dare_linear",
    "breadcrumbs_ties",
    "della_linear",
)
#: Techniques used to merge lower performers (their recipes become the new node's inputs).
LOWER_MERGE_TECHNIQUES = ("linear", "task_arithmetic", "ties", "dare_ties")
#: Chance that merging lower performers stacks their layers (a DFS node) instead.
LOWER_STACK_RATE = 0.25
SCALE_RANGE = (0.5, 2.0)
#: At most this many indicator bits flip, on average, when a layer path is drawn around an
#: identity path. A rate alone does not scale: 10% of a 4-layer model's 24 bits is 2.4 changes,
#: of SmolLM2-135M's 180 bits (30 layers, 3 inputs, 2 repetitions) 18, and 18 random
#: insertions and removals leave a real model scoring 0 (measured: every such stack did).
DFS_MAX_EXPECTED_FLIPS = 4.0


@dataclass(frozen=True)
class SearchSpace:
    """What the search may combine: the models (by name), the base, and their layer count."""

    models: tuple[str, ...]
    base: str | None
    layers: int
    merge: MergeSettings
    evolution: EvolutionSettings

    @property
    def sources(self) -> tuple[RecipeNode, ...]:
        return tuple(Source(n) for n in self.models)

    @property
    def base_node(self) -> RecipeNode | None:
        return Source(self.base) if self.base is not None else None

    @property
    def groups(self) -> int:
        return self.merge.ps_layer_groups or self.layers + 2

    def allows(self, kind: str) -> bool:
        """Whether ``merge.techniques`` lets the search build ``kind`` (a technique, ``ps`` for
        per-layer values or ``dfs`` for layer stacks)."""
        return self.merge.techniques is None or kind in self.merge.techniques

    def usable(self, technique: str, n_inputs: int) -> bool:
        tech = MERGE_TECHNIQUES[technique]
        if tech.needs_base and self.base is None:
            return False
        return tech.min_inputs <= n_inputs <= (tech.max_inputs or n_inputs)


def new_seed(rng: np.random.Generator) -> int:
    return int(rng.integers(0, 2**31 - 1))


def _jitter(genome_x: np.ndarray, rng: np.random.Generator, spread: float) -> np.ndarray:
    return np.clip(genome_x + rng.normal(0.0, spread, size=genome_x.shape), 0.0, 1.0)


def technique_recipe(
    technique: str,
    space: SearchSpace,
    rng: np.random.Generator,
    *,
    exact_defaults: bool,
    inputs: Sequence[RecipeNode] | None = None,
) -> RecipeNode:
    """One recipe of ``technique`` over the sources, parameters drawn around the defaults."""
    inputs = list(inputs if inputs is not None else space.sources)
    tech = get_technique(technique)
    if tech.max_inputs is not None and len(inputs) > tech.max_inputs:
        order = rng.permutation(len(inputs))[: tech.max_inputs]
        inputs = [inputs[i] for i in sorted(order)]
    genome = ParamsGenome(technique, inputs, tech.base_for(space.base_node), seed=new_seed(rng))
    x = genome.initial()
    if not exact_defaults:
        x = _jitter(x, rng, 0.25)
    return genome.decode(x)


def ps_recipe(space: SearchSpace, rng: np.random.Generator, *, exact_defaults: bool) -> RecipeNode:
    """A parameter-space merge: ``ps_technique`` with a weight and density per model and layer
    group."""
    genome = ParamsGenome(
        space.merge.ps_technique,
        space.sources,
        space.base_node,
        groups=space.groups,
        seed=new_seed(rng),
    )
    x = genome.initial()
    return genome.decode(x if exact_defaults else _jitter(x, rng, 0.2))


def dfs_recipe(
    space: SearchSpace,
    rng: np.random.Generator,
    inputs: Sequence[RecipeNode],
    layer_counts: Sequence[int],
    *,
    identity_of: int = 0,
    flip: float = 0.0,
) -> RecipeNode:
    """A layer path over ``inputs``: the identity path of ``inputs[identity_of]`` with each
    indicator bit flipped with probability ``flip`` (and scales jittered when flipping)."""
    genome = LayerPathGenome(
        inputs, layer_counts, space.merge.dfs_repetitions, SCALE_RANGE, embed_from=identity_of
    )
    x = genome.initial()
    if flip > 0:
        count = len(genome.candidates)
        flips = rng.random(count) < min(flip, DFS_MAX_EXPECTED_FLIPS / count)
        x[:count] = np.where(flips, 1.0 - x[:count], x[:count])
        x[count:] = _jitter(x[count:], rng, 0.1)
    return genome.decode(x)


def _mixed_kinds(space: SearchSpace) -> list[str]:
    kinds = []
    for kind in MIXED_ORDER:
        if not space.allows(kind):
            usable = False
        elif kind == "ps":
            usable = space.base is not None
        elif kind == "dfs":
            usable = True
        else:
            tech = MERGE_TECHNIQUES[kind]
            usable = space.usable(
                kind, min(len(space.models), tech.max_inputs or len(space.models))
            )
        if usable:
            kinds.append(kind)
    return kinds


def initial_population(
    method: str,
    space: SearchSpace,
    rng: np.random.Generator,
    size: int,
    dfs_inputs: Sequence[RecipeNode] = (),
    dfs_layers: Sequence[int] = (),
) -> list[RecipeNode]:
    """The first generation for a merge method (``mixed``, a technique, ``ps`` or ``dfs``).

    ``mixed`` covers the techniques in :data:`MIXED_ORDER` usable with the given models (with
    or without a base), then repeats them with other draws. The first of each kind takes the
    defaults (for ``dfs``: the identity path of the first input); duplicates are redrawn.
    """
    dfs_inputs = list(dfs_inputs) or list(space.sources)
    dfs_layers = list(dfs_layers) or [space.layers] * len(dfs_inputs)
    usable = _mixed_kinds(space) if method == "mixed" else [method]
    kinds = [usable[i % len(usable)] for i in range(size)]
    population: list[RecipeNode] = []
    seen: set[str] = set()
    for i, kind in enumerate(kinds):
        first = kinds.index(kind) == i
        for attempt in range(20):
            exact = first and attempt == 0
            if kind == "ps":
                recipe = ps_recipe(space, rng, exact_defaults=exact)
            elif kind == "dfs":
                identity = 0 if method == "dfs" else int(rng.integers(len(dfs_inputs)))
                recipe = dfs_recipe(
                    space,
                    rng,
                    dfs_inputs,
                    dfs_layers,
                    identity_of=identity,
                    flip=0.0 if exact and method == "dfs" else 0.1,
                )
            else:
                recipe = technique_recipe(kind, space, rng, exact_defaults=exact)
            if recipe.hash not in seen:
                break
        seen.add(recipe.hash)
        population.append(recipe)
    return population


# -- selection -------------------------------------------------------------------------------------


def tournament_selection(
    scored: Sequence[tuple[RecipeNode, float]], tournament_size: int, rng: np.random.Generator
) -> RecipeNode:
    """The fittest of ``tournament_size`` candidates drawn without replacement (ties: first
    drawn)."""
    size = min(tournament_size, len(scored))
    picks = [int(i) for i in rng.choice(len(scored), size=size, replace=False)]
    best = picks[0]
    for i in picks[1:]:
        if scored[i][1] > scored[best][1]:
            best = i
    return scored[best][0]


# -- mutation --------------------------------------------------------------------------------------


def mutable_nodes(recipe: RecipeNode) -> list[RecipeNode]:
    """Merge and LayerStack nodes of a tree, pre-order (sources are not mutable)."""
    if isinstance(recipe, Source):
        return []
    return [recipe, *(node for child in recipe.children() for node in mutable_nodes(child))]


def replace_node(recipe: RecipeNode, target: RecipeNode, replacement: RecipeNode) -> RecipeNode:
    """A copy of ``recipe`` with the first subtree equal to ``target`` replaced."""
    if recipe is target:
        return replacement
    if isinstance(recipe, Merge):
        inputs = tuple(replace_node(i, target, replacement) for i in recipe.inputs)
        base = replace_node(recipe.base, target, replacement) if recipe.base is not None else None
        return Merge(recipe.technique, inputs, recipe.params, base, recipe.seed)
    if isinstance(recipe, LayerStack):
        inputs = tuple(replace_node(i, target, replacement) for i in recipe.inputs)
        return LayerStack(inputs, recipe.slots, recipe.embed_from, recipe.head_from)
    return recipe


def mutate_recipe(recipe: RecipeNode, space: SearchSpace, rng: np.random.Generator) -> RecipeNode:
    """A new recipe from ``recipe``: one node of the tree perturbed (see the node mutators)."""
    nodes = mutable_nodes(recipe)
    if not nodes:
        return technique_recipe("linear", space, rng, exact_defaults=False)
    if space.allows("dfs") and rng.random() < space.evolution.technique_switch_rate / 2:
        stacked = stack_recipe(recipe, space, rng)
        if stacked is not None:
            return stacked
    target = nodes[int(rng.integers(len(nodes)))]
    if isinstance(target, Merge):
        changed: RecipeNode = mutate_merge(target, space, rng)
    else:
        assert isinstance(target, LayerStack)
        # Only the root may change its layer count: a nested stack's layers are named by the
        # slots of the stacks above it and must match the depth of the inputs merged beside it.
        changed = mutate_layer_stack(target, space, rng, resize=target is recipe)
    return replace_node(recipe, target, changed)


def stack_recipe(
    recipe: RecipeNode, space: SearchSpace, rng: np.random.Generator
) -> LayerStack | None:
    """The technique switch into data-flow space: ``recipe``'s own layer path with a few
    indicator bits flipped, over ``recipe`` and the sources, so that layers of the sources (or a
    second pass of its own) can enter (None when that tree would exceed ``max_depth``)."""
    if recipe.depth() + 1 > space.merge.max_depth:
        return None
    inputs = [recipe, *(s for s in space.sources if s != recipe)]
    layers = [recipe_layers(r, space) for r in inputs]
    bits = space.merge.dfs_repetitions * sum(layers)
    return dfs_recipe(space, rng, inputs, layers, identity_of=0, flip=2.0 / bits)


def change_inputs(
    inputs: Sequence[RecipeNode],
    params: dict,
    tech: Technique,
    space: SearchSpace,
    rng: np.random.Generator,
) -> tuple[list[RecipeNode], dict]:
    """Drop one input, swap one for a source the merge does not use, or add such a source,
    with the per-input parameters following their input (an added one copies another's).

    This is how the search leaves out a model that hurts every merge it enters, or tries a
    pair the first generation did not draw; weights alone reach that only in many steps.
    """
    inputs = list(inputs)
    depth = recipe_layers(inputs[0], space)
    spare = [s for s in space.sources if s not in inputs] if depth == space.layers else []
    moves = []
    if len(inputs) > max(2, tech.min_inputs):
        moves.append("drop")
    if spare:
        moves.append("swap")
        if tech.max_inputs is None or len(inputs) < tech.max_inputs:
            moves.append("add")
    if not moves:
        return inputs, params
    move = moves[int(rng.integers(len(moves)))]
    per_input = [
        p.name for p in tech.params if p.per_input and isinstance(params.get(p.name), list)
    ]
    params = dict(params)
    if move == "drop":
        k = int(rng.integers(len(inputs)))
        del inputs[k]
        for name in per_input:
            params[name] = [v for i, v in enumerate(params[name]) if i != k]
    elif move == "swap":
        inputs[int(rng.integers(len(inputs)))] = spare[int(rng.integers(len(spare)))]
    else:
        inputs.append(spare[int(rng.integers(len(spare)))])
        for name in per_input:
            params[name] = [*params[name], params[name][int(rng.integers(len(params[name])))]]
    return inputs, params


def mutate_merge(node: Merge, space: SearchSpace, rng: np.random.Generator) -> Merge:
    """Perturb numeric parameters (Gaussian, σ = strength × searched range, clipped), sometimes
    switch technique, change the inputs (at the switch rate too) or draw a new seed for a
    randomised one."""
    evo = space.evolution
    technique, params, inputs = node.technique, dict(node.params), list(node.inputs)
    if rng.random() < evo.technique_switch_rate:
        base_depth = recipe_layers(node.inputs[0], space) == space.layers
        options = [
            t
            for t in MERGE_TECHNIQUES
            if t not in ("passthrough", technique)
            and space.allows(t)
            and space.usable(t, len(inputs))
            and (base_depth or not MERGE_TECHNIQUES[t].takes_base)
        ]
        if options:
            old, technique = get_technique(technique), options[int(rng.integers(len(options)))]
            params = {
                k: v for k, v in params.items() if _same_param(old, get_technique(technique), k)
            }
    tech = get_technique(technique)
    if rng.random() < evo.technique_switch_rate:
        inputs, params = change_inputs(inputs, params, tech, space, rng)
    if space.allows("ps") and rng.random() < evo.layer_refine_rate:
        params = refine_by_layer(params, tech, space, rng)
    leaves = [
        (p, path)
        for p in tech.params
        if p.is_numeric and p.search and p.name in params
        for path in _leaf_paths(params[p.name])
    ]
    rate = min(
        evo.mutation_rate, 3.0 / max(1, len(leaves))
    )  # about three changes at most per child
    chosen = [leaf for leaf in leaves if rng.random() < rate]
    if leaves and not chosen:
        chosen = [leaves[int(rng.integers(len(leaves)))]]
    for param, path in chosen:
        params[param.name] = _perturb_at(
            params[param.name], path, param, evo.mutation_strength, rng
        )
    seed = node.seed
    if tech.randomized and (seed is None or rng.random() < 0.2):
        seed = new_seed(rng)
    base = tech.base_for(node.base or space.base_node)
    params = searched_params(tech, params, len(inputs))
    return Merge(technique, tuple(inputs), params, base, seed)


def _same_param(old: Technique, new: Technique, name: str) -> bool:
    """Whether parameter ``name`` means the same in both techniques (a technique switch keeps
    its values): same shape and ranges. RAM's ``epsilon`` (a threshold on |δ|, one value) is
    not DELLA's (a per-model spread of keep probabilities)."""
    known = {p.name: p for p in new.params}
    if name not in known:
        return False
    theirs, ours = old.param(name), known[name]
    return (theirs.per_input, theirs.low, theirs.high, theirs.search) == (
        ours.per_input,
        ours.low,
        ours.high,
        ours.search,
    )


def refine_by_layer(
    params: dict, tech: Technique, space: SearchSpace, rng: np.random.Generator
) -> dict:
    """Give one per-model parameter one value per layer group (copies of its current value).

    The child computes the same tensors as its parent until a group's value is perturbed: this
    is how the search moves from per-model settings into the per-layer PS space of the Sakana
    paper without losing what it found.
    """
    names = [
        p.name
        for p in tech.params
        if p.per_input
        and p.is_numeric
        and p.search
        and p.name in params
        and any(isinstance(v, float) for v in params[p.name])
    ]
    if not names:
        return params
    name = names[int(rng.integers(len(names)))]
    refined = dict(params)
    refined[name] = [[v] * space.groups if isinstance(v, float) else v for v in params[name]]
    return refined


def _leaf_paths(value: object, prefix: tuple = ()) -> list[tuple]:
    if isinstance(value, dict):
        return [p for k in sorted(value) for p in _leaf_paths(value[k], (*prefix, k))]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _leaf_paths(v, (*prefix, i))]
    if isinstance(value, str):  # a name filter's substring: not searched
        return []
    return [prefix]


def _perturb_at(
    value: object, path: tuple, param: Param, strength: float, rng: np.random.Generator
) -> object:
    if not path:
        assert param.search is not None and isinstance(value, float)
        low, high = param.search
        return float(np.clip(value + rng.normal(0.0, strength * (high - low)), low, high))
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        return {**value, head: _perturb_at(value[head], rest, param, strength, rng)}
    assert isinstance(value, list)
    copy = list(value)
    copy[head] = _perturb_at(copy[head], rest, param, strength, rng)
    return copy


def mutate_layer_stack(
    node: LayerStack, space: SearchSpace, rng: np.random.Generator, *, resize: bool = True
) -> LayerStack:
    """Perturb slot scales (log-normal), and (when ``resize``) sometimes drop a slot or insert a
    random layer."""
    evo = space.evolution
    slots = list(node.slots)
    for k, slot in enumerate(slots):
        if rng.random() < evo.mutation_rate:
            scale = float(
                np.clip(slot.scale * np.exp(rng.normal(0.0, evo.mutation_strength)), *SCALE_RANGE)
            )
            slots[k] = LayerSlot(slot.input, slot.layer, round(scale, 6))
    limit = space.merge.dfs_repetitions * space.layers * len(node.inputs)
    if resize and len(slots) > 1 and rng.random() < evo.mutation_rate:
        del slots[int(rng.integers(len(slots)))]
    if resize and len(slots) < limit and rng.random() < evo.mutation_rate:
        source = int(rng.integers(len(node.inputs)))
        layer = int(rng.integers(recipe_layers(node.inputs[source], space)))
        slots.insert(int(rng.integers(len(slots) + 1)), LayerSlot(source, layer, 1.0))
    if tuple(slots) == node.slots:
        k = int(rng.integers(len(slots)))
        slot = slots[k]
        slots[k] = LayerSlot(
            slot.input,
            slot.layer,
            round(
                float(
                    np.clip(
                        slot.scale * np.exp(rng.normal(0.0, evo.mutation_strength)), *SCALE_RANGE
                    )
                ),
                6,
            ),
        )
    return LayerStack(node.inputs, tuple(slots), node.embed_from, node.head_from)


# -- merging the lower performers ------------------------------------------------------------------


def recipe_layers(recipe: RecipeNode, space: SearchSpace) -> int:
    if isinstance(recipe, LayerStack):
        return len(recipe.slots)
    children = recipe.children()
    return recipe_layers(children[0], space) if children else space.layers


def merge_lower(
    recipes: Sequence[RecipeNode], space: SearchSpace, rng: np.random.Generator
) -> tuple[RecipeNode, list[RecipeNode]] | None:
    """A new node over 2–3 lower performers of equal depth, with the performers it merged
    (None when none can be made within ``max_depth``): a Merge, or (at ``LOWER_STACK_RATE``) a
    layer stack of their layers. Task-vector techniques apply only where the base has that
    depth; linear-of-linear nodes are collapsed."""
    by_layers: dict[int, list[RecipeNode]] = {}
    for recipe in recipes:
        by_layers.setdefault(recipe_layers(recipe, space), []).append(recipe)
    groups = [g for g in by_layers.values() if len(g) >= 2]
    if not groups:
        return None
    group = groups[int(rng.integers(len(groups)))]
    count = min(len(group), int(rng.integers(2, 4)))
    picks = sorted(rng.choice(len(group), size=count, replace=False))
    inputs = [group[i] for i in picks]
    if space.allows("dfs") and rng.random() < LOWER_STACK_RATE:
        depth = recipe_layers(inputs[0], space)
        stacked = dfs_recipe(space, rng, inputs, [depth] * count, identity_of=0, flip=0.15)
        if stacked.depth() <= space.merge.max_depth:
            return stacked, inputs
    same_depth = recipe_layers(inputs[0], space) == space.layers
    options = [
        t
        for t in LOWER_MERGE_TECHNIQUES
        if space.allows(t) and (t == "linear" or (same_depth and space.usable(t, count)))
    ] or ["linear"]  # linear over the performers' recipes is always a valid merge of them
    technique = options[int(rng.integers(len(options)))]
    merged = collapse_linear(
        technique_recipe(technique, space, rng, exact_defaults=False, inputs=inputs)
    )
    if merged.depth() > space.merge.max_depth:
        return None
    return merged, inputs
