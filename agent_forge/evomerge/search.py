"""Search strategies behind one ask/tell interface: the tournament GA (the specification's
algorithm) and CMA-ES (the ``cmaes`` package) over a genome.

The caller owns the loop::

    while not strategy.should_stop():
        recipes = strategy.ask()
        strategy.tell([(r, fitness(r)) for r in recipes])   # higher is better

``state_dict()`` holds everything needed to continue exactly (generator states included), as
JSON-ready data.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from .config import EvolutionSettings
from .exceptions import ConfigurationError
from .genomes import LayerPathGenome, ParamsGenome
from .operators import (
    SCALE_RANGE,
    SearchSpace,
    initial_population,
    merge_lower,
    mutate_recipe,
    tournament_selection,
)
from .recipe import Merge, RecipeNode, recipe_from_dict
from .techniques import MERGE_TECHNIQUES

logger = logging.getLogger(__name__)


class SearchStrategy(Protocol):
    def ask(self) -> list[RecipeNode]: ...
    def tell(self, scored: Sequence[tuple[RecipeNode, float]]) -> None: ...
    def should_stop(self) -> bool: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class _Progress:
    """Best-so-far and patience bookkeeping shared by the strategies."""

    def __init__(self, evolution: EvolutionSettings) -> None:
        self.evolution = evolution
        self.best = float("-inf")
        self.stall = 0

    def update(self, fitnesses: Sequence[float]) -> None:
        top = max(fitnesses)
        if top > self.best + self.evolution.min_delta:
            self.best, self.stall = top, 0
        else:
            self.best = max(self.best, top)
            self.stall += 1

    @property
    def patience_exhausted(self) -> bool:
        return self.stall >= self.evolution.patience

    def state(self) -> dict[str, Any]:
        return {"best": self.best if np.isfinite(self.best) else None, "stall": self.stall}

    def load(self, state: dict[str, Any]) -> None:
        self.best = state["best"] if state["best"] is not None else float("-inf")
        self.stall = state["stall"]


def lower_merge_slots(size: int, elites: int, wanted: int) -> int:
    """How many children of a generation merge lower performers: ``wanted``, but never more
    than half of the places the elites leave, so every generation holds mutated children
    (population 4 with 2 elites: one merge, one mutant)."""
    return max(0, min(wanted, (size - elites) // 2))


class TournamentSearch:
    """The tournament GA: elites stay, tournament winners are mutated, lower performers are merged.

    Args:
        method: ``mixed``, a technique name, ``ps`` or ``dfs`` (what the first generation holds).
        dfs_inputs, dfs_layers: the inputs (and their layer counts) of layer paths.
    """

    def __init__(
        self,
        space: SearchSpace,
        method: str,
        seed: int,
        dfs_inputs: Sequence[RecipeNode] = (),
        dfs_layers: Sequence[int] = (),
    ) -> None:
        self.space = space
        self.method = method
        self.evolution = space.evolution
        self.rng = np.random.default_rng(seed)
        self.dfs_inputs = list(dfs_inputs)
        self.dfs_layers = list(dfs_layers)
        self.population: list[RecipeNode] = []
        self.scored: list[tuple[RecipeNode, float]] = []
        self.progress = _Progress(space.evolution)
        self.parents: dict[str, list[str]] = {}  # child hash → parent hashes, for the last ask()

    def ask(self) -> list[RecipeNode]:
        if not self.scored:
            if not self.population:
                self.population = initial_population(
                    self.method,
                    self.space,
                    self.rng,
                    self.evolution.population_size,
                    self.dfs_inputs,
                    self.dfs_layers,
                )
            return list(self.population)
        self.population = self._next_generation()
        self.scored = []
        return list(self.population)

    def _next_generation(self) -> list[RecipeNode]:
        ranked = sorted(
            self.scored, key=lambda item: -item[1]
        )  # stable: ties keep population order
        size = self.evolution.population_size
        elites = [recipe for recipe, _ in ranked[: min(self.evolution.elite_size, size - 1)]]
        chosen = {r.hash for r in elites}
        nxt = list(elites)
        self.parents = {}
        lower = [recipe for recipe, _ in ranked[len(ranked) // 2 :]]
        for _ in range(lower_merge_slots(size, len(elites), self.evolution.lower_merge_count)):
            made = merge_lower(lower, self.space, self.rng)
            if made is not None and made[0].hash not in chosen:
                nxt.append(made[0])
                chosen.add(made[0].hash)
                self.parents[made[0].hash] = [r.hash for r in made[1]]
        while len(nxt) < size:
            winner = self.tournament_selection()
            child = self.mutate_model(winner)
            for _ in range(10):
                if child.hash not in chosen:
                    break
                child = self.mutate_model(child)
            nxt.append(child)
            chosen.add(child.hash)
            self.parents.setdefault(child.hash, [winner.hash])
        return nxt

    def tournament_selection(self) -> RecipeNode:
        return tournament_selection(self.scored, self.evolution.tournament_size, self.rng)

    def mutate_model(self, recipe: RecipeNode) -> RecipeNode:
        return mutate_recipe(recipe, self.space, self.rng)

    def tell(self, scored: Sequence[tuple[RecipeNode, float]]) -> None:
        self.scored = list(scored)
        self.progress.update([f for _, f in scored])

    def should_stop(self) -> bool:
        return self.progress.patience_exhausted

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "tournament",
            "method": self.method,
            "rng": self.rng.bit_generator.state,
            "population": [r.to_dict() for r in self.population],
            "scored": [[r.to_dict(), f] for r, f in self.scored],
            "progress": self.progress.state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.population = [recipe_from_dict(r) for r in state["population"]]
        self.scored = [(recipe_from_dict(r), f) for r, f in state["scored"]]
        self.progress.load(state["progress"])


class CMAESSearch:
    """CMA-ES (``cmaes.CMA``, seeded) over a genome in [0, 1]ⁿ; maximises fitness.

    Resuming replays the recorded (x, fitness) history into a fresh optimiser with the same seed,
    which reproduces its internal state exactly without pickling it.

    ``anchors`` (e.g. the plain average) join the first generation outside the optimiser: the
    run's best is then never below them on fitness, however short the run or poor the start.
    ``mean`` and ``sigma`` default to the genome's ``initial()`` and ``cmaes_sigma``; ``parent``
    (a recipe hash) is recorded as every candidate's parent, for the lineage.
    """

    def __init__(
        self,
        genome: ParamsGenome | LayerPathGenome,
        evolution: EvolutionSettings,
        seed: int,
        anchors: Sequence[RecipeNode] = (),
        *,
        mean: np.ndarray | None = None,
        sigma: float | None = None,
        parent: str | None = None,
    ) -> None:
        self.genome = genome
        self.evolution = evolution
        self.seed = seed
        self.anchors = list(anchors)
        self.mean = genome.initial() if mean is None else np.asarray(mean, dtype=float)
        self.sigma = evolution.cmaes_sigma if sigma is None else sigma
        self.parent = parent
        self.parents: dict[str, list[str]] = {}  # child hash → parent hashes, for the last ask()
        self.history: list[list[tuple[list[float], float]]] = []
        self.pending: list[np.ndarray] = []
        self.progress = _Progress(evolution)
        self.optimizer = self._fresh()

    def _fresh(self) -> Any:
        from cmaes import CMA

        size = self.genome.size
        if size < 2:
            raise ConfigurationError(
                f"CMA-ES needs at least 2 searched parameters; this genome has {size}"
            )
        bounds = np.array([[0.0, 1.0]] * size)
        return CMA(
            mean=self.mean,
            sigma=self.sigma,
            bounds=bounds,
            seed=self.seed,
            population_size=self.evolution.population_size,
        )

    def ask(self) -> list[RecipeNode]:
        self.pending = [self.optimizer.ask() for _ in range(self.optimizer.population_size)]
        decoded = [self.genome.decode(x) for x in self.pending]
        if self.parent is not None:
            self.parents = {r.hash: [self.parent] for r in decoded}
        return decoded if self.history else [*decoded, *self.anchors]

    def tell(self, scored: Sequence[tuple[RecipeNode, float]]) -> None:
        extra = 0 if self.history else len(self.anchors)
        if len(scored) != len(self.pending) + extra:
            raise ConfigurationError(
                "CMA-ES was told a different number of candidates than it asked for"
            )
        everything = [float(f) for _, f in scored]
        fitness = everything[: len(self.pending)]
        # cmaes minimises
        self.optimizer.tell([(x, -f) for x, f in zip(self.pending, fitness, strict=True)])
        self.history.append([(x.tolist(), f) for x, f in zip(self.pending, fitness, strict=True)])
        self.pending = []
        self.progress.update(everything)

    def should_stop(self) -> bool:
        return self.progress.patience_exhausted or bool(self.optimizer.should_stop())

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "cmaes",
            "seed": self.seed,
            "history": self.history,
            "progress": self.progress.state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer = self._fresh()
        self.history = []
        for generation in state["history"]:
            xs = [self.optimizer.ask() for _ in range(self.optimizer.population_size)]
            recorded = [np.asarray(x) for x, _ in generation]
            if not all(np.array_equal(a, b) for a, b in zip(xs, recorded, strict=True)):
                raise ConfigurationError(
                    "the checkpoint's CMA-ES history does not replay; "
                    "it was written by another version"
                )
            self.optimizer.tell([(x, -f) for x, (_, f) in zip(xs, generation, strict=True)])
            self.history.append([(x.tolist(), f) for x, (_, f) in zip(xs, generation, strict=True)])
        self.progress.load(state["progress"])


EVALUATIONS_PER_REFINED_VALUE = 3
"""The refine stage's layer groups are as many as its budget (population × generations) allows
at this many evaluations per searched value. CMA-ES adapts its steps from what a generation
ranks; with far fewer evaluations than values (96 weights per layer of three 30-layer
SmolLM2 fine-tunes against 24 evaluations) its steps stay random and the stage finds nothing."""


def centred_weights(merge: Merge) -> dict[str, Any]:
    """``merge``'s params with its per-input weights scaled so that the largest is 0.5, when
    the technique normalises by the weights (the same merge: a normalised merge is unchanged by
    scaling every weight by one factor). The search range of a weight is [0, 1] and the
    defaults sit at 1.0, its edge, where CMA-ES could only lower a weight and clips half of
    every step; centred, a step can raise one input against the others as far as lower it."""
    params = dict(merge.params)
    weights = params.get("weight")
    if params.get("normalize") is not True or not isinstance(weights, list | tuple):
        return params
    lists = [w if isinstance(w, list | tuple) else [w] for w in weights]
    if not all(isinstance(v, int | float) for w in lists for v in w):
        return params  # component mappings: left as they are
    flat = [abs(float(v)) for w in lists for v in w]
    if not flat or max(flat) == 0:
        return params
    factor = 0.5 / max(flat)
    params["weight"] = [
        [v * factor for v in w] if isinstance(w, list | tuple) else w * factor for w in weights
    ]
    return params


def refine_strategy(space: SearchSpace, best: RecipeNode, seed: int) -> CMAESSearch | None:
    """CMA-ES around ``best`` (a merge): its technique, inputs, base, seed and sparsity (densities,
    epsilons) stay; every other searched value (weights, λ, SLERP's t) takes one value per layer
    group, starting at ``best``'s own values.

    The tournament finds which merge to make; its Gaussian steps perturb a few values at a time
    with one fixed step size and stall among dozens of per-layer values, where CMA-ES adapts
    their joint steps. This is the Sakana paper's parameter-space search, started from the
    tournament's winner instead of from defaults. None when there is nothing to refine (a
    source, a layer stack, or a merge with fewer than two searched values). The layer groups are
    coarsened to fit the stage's budget (:data:`EVALUATIONS_PER_REFINED_VALUE`), and the
    weights of a normalised merge start centred in their range (:func:`centred_weights`).

    Sparsity stays because its values are thresholds: the fitness is a step function of them,
    which CMA-ES's smooth steps read as noise, and leaving them out halves the genome of a TIES
    merge (on the embedded default, seed 2, both ways end level on test: 73.7 without
    densities, 73.6 with)."""
    if not isinstance(best, Merge) or not space.allows("ps"):
        return None
    tech = MERGE_TECHNIQUES[best.technique]
    searched = {
        p.name for p in tech.params if p.is_numeric and p.search is not None and not p.sparsity
    }
    evolution = space.evolution

    def genome_of(groups: int) -> ParamsGenome:
        return ParamsGenome(
            best.technique,
            best.inputs,
            best.base,
            groups=groups,
            fixed={k: v for k, v in best.params.items() if k not in searched},
            seed=best.seed or 0,
            shared_by_group=True,
        )

    # shared_by_group: every searched value takes one coordinate per group
    per_group = genome_of(1).size
    budget = evolution.population_size * evolution.refine_stage_generations
    affordable = budget // (EVALUATIONS_PER_REFINED_VALUE * max(1, per_group))
    genome = genome_of(max(1, min(space.groups, affordable)))
    if genome.size < 2:
        return None
    return CMAESSearch(
        genome,
        evolution,
        seed,
        anchors=[best],
        mean=genome.encode(centred_weights(best)),
        sigma=evolution.refine_sigma,
        parent=best.hash,
    )


def make_strategy(
    strategy: str,
    method: str,
    space: SearchSpace,
    seed: int,
    dfs_inputs: Sequence[RecipeNode] = (),
    dfs_layers: Sequence[int] = (),
) -> SearchStrategy:
    """The strategy for one search stage (``method`` is ``mixed``, a technique, ``ps`` or
    ``dfs``)."""
    if strategy == "tournament":
        return TournamentSearch(space, method, seed, dfs_inputs, dfs_layers)
    anchors = [Merge("linear", space.sources, {})]
    if method == "dfs":
        inputs = list(dfs_inputs) or list(space.sources)
        if dfs_inputs:
            anchors.append(dfs_inputs[0])  # the previous stage's best
        layers = list(dfs_layers) or [space.layers] * len(inputs)
        genome: ParamsGenome | LayerPathGenome = LayerPathGenome(
            inputs, layers, space.merge.dfs_repetitions, SCALE_RANGE
        )
    elif method in ("mixed", "ps"):
        technique = space.merge.ps_technique if space.base is not None else "linear"
        tech = MERGE_TECHNIQUES[technique]
        genome = ParamsGenome(
            technique,
            space.sources,
            tech.base_for(space.base_node),
            groups=space.groups,
            seed=seed,
        )
    else:
        tech = MERGE_TECHNIQUES[method]
        if tech.needs_base and space.base is None:
            raise ConfigurationError(
                f"merge_settings.merge_method = {method!r} needs base_model; set it (or --base)"
            )
        inputs = list(space.sources)[: tech.max_inputs or len(space.sources)]
        genome = ParamsGenome(method, inputs, tech.base_for(space.base_node), seed=seed)
    return CMAESSearch(genome, space.evolution, seed, anchors)
