"""The evolution: ``EvolutionaryMerger`` and ``run_evolutionary_tournament(config)``.

This is the only place that loops: ask the search strategy for recipes, score the new ones
through an executor (a fitness cache keyed by recipe hash means no recipe is scored twice),
tell the strategy, checkpoint, and stop after ``num_generations`` or when the best has not
improved by ``min_delta`` for ``patience`` generations. The run folder holds::

    config.json  evaluations.jsonl  checkpoint.json  best/  report.md  fitness.png
    lineage.png  summary.json

A run stopped at any point continues with ``resume`` and ends exactly as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from .config import PLACEMENT_FIELDS, Configuration
from .exceptions import ConfigurationError, EvoMergeException, RunInterrupted
from .executors import CandidateScorer, Evaluation, Executor, make_executor
from .final import RunOutcome, finish_run
from .layout import source_layers
from .operators import SearchSpace
from .recipe import LayerStack, Merge, RecipeNode, Source, recipe_from_dict
from .search import SearchStrategy, TournamentSearch, make_strategy, refine_strategy
from .sources import ModelSource
from .storage import atomic_write_text, check_destination

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.json"
EVALUATIONS = "evaluations.jsonl"
ProgressCallback = Callable[..., None]


def stage_methods(method: str, refine: bool = False) -> list[str]:
    """The run's stages: ``ps_dfs`` is PS then DFS over the PS best; ``refine`` adds a last
    stage of CMA-ES around the best merge (see :func:`search.refine_strategy`)."""
    return (["ps", "dfs"] if method == "ps_dfs" else [method]) + (["refine"] if refine else [])


def stage_seed(seed: int, stage: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{stage}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def label(recipe: RecipeNode) -> str:
    if isinstance(recipe, Source):
        return recipe.name
    if isinstance(recipe, LayerStack):
        return f"dfs({len(recipe.slots)})"
    assert isinstance(recipe, Merge)
    nested = any(not isinstance(i, Source) for i in recipe.inputs)
    return f"{recipe.technique}{'*' if nested else ''}"


class EvolutionaryMerger:
    """Evolves merge recipes of the configured models (see the module docstring).

    Args:
        config: the run configuration (validated; models resolved and checked here).
        run_dir: the run folder (created; must be new or empty unless ``resume``).
        resume: continue the run in ``run_dir`` from its checkpoint.
        executor: where candidates are scored (default from ``config.backend``).
        progress: called with events (``stage``, ``generation``, ``candidate``,
            ``generation_done``).
    """

    def __init__(
        self,
        config: Configuration,
        run_dir: str | Path,
        *,
        resume: bool = False,
        executor: Executor | None = None,
        progress: ProgressCallback | None = None,
        sources: Sequence[ModelSource] | None = None,
    ) -> None:
        from .utils import validate_merge_config

        self.config = config
        self.run_dir = Path(run_dir)
        self.progress = progress or (lambda *args, **kwargs: None)
        self.sources = list(sources) if sources is not None else validate_merge_config(config)
        self.space = SearchSpace(
            models=tuple(m.name for m in config.models),
            base=config.base_model.name if config.base_model else None,
            layers=source_layers(self.sources[0].config),
            merge=config.merge_settings,
            evolution=config.evolution_settings,
        )
        self.stages = stage_methods(
            config.merge_settings.merge_method, config.evolution_settings.refine_generations > 0
        )
        self.records: dict[str, dict[str, Any]] = {}
        self.history: list[dict[str, Any]] = []
        self.stage_index = 0
        self.generation = 0
        self.stage_inputs: list[RecipeNode] = []
        self._strategy_state: dict[str, Any] | None = None
        self._strategy: SearchStrategy | None = None
        self._helper_tournament: TournamentSearch | None = None  # the spec methods' own
        if resume:
            self._load_checkpoint()
        self.executor = executor
        self.evaluator_calls = 0

    # -- the spec's operations ---------------------------------------------------------------------

    def create_merged_models(self) -> list[RecipeNode]:
        """The initial population: ``population_size`` recipes of different techniques (for
        ``mixed``), drawn from the run's seed — the first generation a tournament run scores."""
        return TournamentSearch(self.space, self.stages[0], stage_seed(self.config.seed, 0)).ask()

    def tournament_selection(self, scored: Sequence[tuple[RecipeNode, float]]) -> RecipeNode:
        """The winner of one tournament of ``tournament_size`` among ``scored`` (recipe,
        fitness). A view: it draws from a generator of its own, never the run's."""
        helper = self._helper()
        helper.scored = list(scored)
        return helper.tournament_selection()

    def mutate_model(self, recipe: RecipeNode) -> RecipeNode:
        """A mutated copy of ``recipe`` (parameters perturbed within range; sometimes a new
        technique or a layer stack). A view: the run's own search is not touched."""
        return self._helper().mutate_model(recipe)

    def _helper(self) -> TournamentSearch:
        """The spec methods' own tournament, seeded apart from every search stage, so that
        calling them before or during ``evolve()`` never changes what it does."""
        if self._helper_tournament is None:
            self._helper_tournament = TournamentSearch(
                self.space, "mixed", stage_seed(self.config.seed, 99)
            )
        return self._helper_tournament

    def evolve(self) -> RecipeNode:
        """Run every stage to its end; returns the best recipe found (checkpointing as it goes)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.executor is None:
            self.executor = make_executor(self.config)
        try:
            while self.stage_index < len(self.stages):
                strategy = self._stage_strategy()
                if strategy is None:  # nothing to refine
                    self._next_stage()
                    continue
                self.progress(
                    "stage",
                    name=self.stages[self.stage_index],
                    index=self.stage_index,
                    count=len(self.stages),
                )
                limit = self._stage_generations(self.stages[self.stage_index])
                while self.generation < limit and not strategy.should_stop():
                    self._run_generation(strategy)
                self._next_stage()
        except KeyboardInterrupt:
            raise RunInterrupted(
                f"interrupted; the run folder keeps its checkpoint. Resume with: "
                f"python -m agent_forge.evomerge.cli --resume {self.run_dir}"
            ) from None
        return self.best_recipe

    def _run_generation(self, strategy: SearchStrategy) -> None:
        started = time.perf_counter()
        recipes = strategy.ask()
        parents = getattr(strategy, "parents", {})
        self.progress(
            "generation",
            generation=len(self.history),
            total=self._total_generations(),
            candidates=len(recipes),
        )
        fitness = self._score(recipes, parents)
        strategy.tell(list(zip(recipes, fitness, strict=True)))
        self.history.append(
            {
                "generation": len(self.history),
                "stage": self.stages[self.stage_index],
                "best": max(r["fitness"] for r in self.records.values()),
                "generation_best": max(fitness),
                "mean": sum(fitness) / len(fitness),
                "seconds": time.perf_counter() - started,
            }
        )
        self.generation += 1
        self._save_checkpoint(strategy)
        self.progress("generation_done", **self.history[-1])

    def _score(self, recipes: Sequence[RecipeNode], parents: dict[str, list[str]]) -> list[float]:
        """Fitness of each recipe; only recipes never seen before reach the executor."""
        assert self.executor is not None
        todo: list[RecipeNode] = []
        for recipe in recipes:
            if recipe.hash not in self.records and all(r.hash != recipe.hash for r in todo):
                todo.append(recipe)
        batch = getattr(self.executor, "batch", None) or max(1, len(todo))
        for start in range(0, len(todo), batch):
            chunk = todo[start : start + batch]
            for recipe, evaluation in zip(chunk, self._evaluate(chunk), strict=True):
                self._record(recipe, evaluation, parents.get(recipe.hash, []))
                self.progress(
                    "candidate",
                    fitness=evaluation.fitness,
                    best=self.best_fitness,
                    label=label(recipe),
                    new=True,
                )
        return [self.records[r.hash]["fitness"] for r in recipes]

    def _evaluate(self, recipes: Sequence[RecipeNode]) -> list[Evaluation]:
        assert self.executor is not None
        self.evaluator_calls += len(recipes)
        try:
            return self.executor.evaluate(recipes)
        except EvoMergeException as exc:
            if len(recipes) > 1:
                return [self._evaluate([r])[0] for r in recipes]
            logger.warning(
                "candidate %s could not be scored (%s); it gets fitness -1",
                recipes[0].short_hash,
                exc,
            )
            return [Evaluation(recipes[0].hash, -1.0, {}, 0.0, 0.0, raw={"error": str(exc)})]

    def _record(self, recipe: RecipeNode, evaluation: Evaluation, parents: list[str]) -> None:
        if not parents:  # e.g. a DFS stage's first layer stacks over the PS stage's best
            parents = [c.hash for c in recipe.children() if c.hash in self.records]
        record = {
            "generation": len(self.history),
            "stage": self.stages[self.stage_index],
            "hash": recipe.hash,
            "label": label(recipe),
            "recipe": recipe.to_dict(),
            "parents": parents,
            "scores": evaluation.scores,
            "fitness": evaluation.fitness,
            "merge_seconds": evaluation.merge_seconds,
            "eval_seconds": evaluation.eval_seconds,
        }
        if "error" in evaluation.raw:
            record["error"] = evaluation.raw["error"]
        self.records[recipe.hash] = record
        with open(self.run_dir / EVALUATIONS, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    # -- stages ------------------------------------------------------------------------------------

    def _stage_generations(self, stage: str) -> int:
        settings = self.config.evolution_settings
        if stage == "refine":
            return settings.refine_stage_generations
        return settings.num_generations

    def _total_generations(self) -> int:
        return sum(self._stage_generations(s) for s in self.stages)

    def _stage_strategy(self) -> SearchStrategy | None:
        if self._strategy is None:
            method = self.stages[min(self.stage_index, len(self.stages) - 1)]
            seed = stage_seed(self.config.seed, self.stage_index)
            if method == "refine":
                best = self.stage_inputs[0] if self.stage_inputs else None
                self._strategy = refine_strategy(self.space, best, seed) if best else None
                if self._strategy is None:
                    return None
            else:
                self._strategy = make_strategy(
                    self.config.evolution_settings.strategy,
                    method,
                    self.space,
                    seed,
                    self.stage_inputs,
                    [self.space.layers] * len(self.stage_inputs),
                )
            if self._strategy_state is not None:
                self._strategy.load_state_dict(self._strategy_state)
                self._strategy_state = None
        return self._strategy

    def _next_stage(self) -> None:
        self.stage_index += 1
        self.generation = 0
        self._strategy = None
        following = self.stages[self.stage_index] if self.stage_index < len(self.stages) else None
        if following == "dfs" and self.records:
            self.stage_inputs = [self.best_recipe, *self.space.sources]
        elif following == "refine" and self.records:
            self.stage_inputs = [self.best_recipe]
        self._save_checkpoint(None)

    # -- best --------------------------------------------------------------------------------------

    def outcome(self) -> RunOutcome:
        """What the run's end needs, as plain data."""
        return RunOutcome(
            config=self.config,
            run_dir=self.run_dir,
            models=self.space.models,
            base=self.space.base,
            records=self.records,
            history=self.history,
        )

    @property
    def best_fitness(self) -> float:
        return max((r["fitness"] for r in self.records.values()), default=float("-inf"))

    @property
    def best_recipe(self) -> RecipeNode:
        if not self.records:
            raise ConfigurationError("no candidate has been evaluated yet")
        best = max(
            self.records.values(), key=lambda r: r["fitness"]
        )  # first of equals (insertion order)
        return recipe_from_dict(best["recipe"])

    # -- checkpoints -------------------------------------------------------------------------------

    def _save_checkpoint(self, strategy: SearchStrategy | None) -> None:
        state = {
            "version": 1,
            "config": self.config.to_dict(),
            "stage_index": self.stage_index,
            "generation": self.generation,
            "stage_inputs": [r.to_dict() for r in self.stage_inputs],
            "strategy": strategy.state_dict() if strategy is not None else None,
            "history": self.history,
        }
        atomic_write_text(self.run_dir / CHECKPOINT, json.dumps(state) + "\n")

    def _load_checkpoint(self) -> None:
        path = self.run_dir / CHECKPOINT
        saved_config = self.run_dir / "config.json"
        if saved_config.is_file():
            check_same_config(Configuration.load(saved_config), self.config, self.run_dir)
        for line in (
            (self.run_dir / EVALUATIONS).read_text().splitlines()
            if (self.run_dir / EVALUATIONS).is_file()
            else []
        ):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by the interruption
                continue
            self.records[record["hash"]] = record
        if not path.is_file():
            return
        state = json.loads(path.read_text())
        self.stage_index = state["stage_index"]
        self.generation = state["generation"]
        self.stage_inputs = [recipe_from_dict(r) for r in state["stage_inputs"]]
        self._strategy_state = state["strategy"]
        self.history = state["history"]


def check_same_config(saved: Configuration, given: Configuration, run_dir: Path) -> None:
    """Raise ConfigurationError naming the first field where ``given`` differs from the run's."""
    ignore = {"output_dir", *PLACEMENT_FIELDS}

    def walk(a: Any, b: Any, path: str) -> str | None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                if not path and key in ignore:
                    continue
                found = walk(a.get(key), b.get(key), f"{path}.{key}" if path else key)
                if found:
                    return found
            return None
        return None if a == b else f"{path} is {json.dumps(a)} in the run, {json.dumps(b)} here"

    difference = walk(saved.to_dict(), given.to_dict(), "")
    if difference:
        raise ConfigurationError(
            f"resume folder {run_dir} was made with a different configuration: {difference}; "
            "resume without changing it, or start a new run"
        )


def default_run_dir() -> Path:
    return Path("evomerge_runs") / datetime.now().strftime("run-%Y%m%d-%H%M%S")


def prepare_run_dir(config: Configuration, resume: str | Path | None) -> tuple[Configuration, Path]:
    """The run's folder and configuration: a new empty folder, or the one being resumed."""
    if resume is not None:
        run_dir = Path(resume)
        saved = run_dir / "config.json"
        if not saved.is_file():
            raise ConfigurationError(
                f"{run_dir} is not a run folder (no config.json); pass the folder a --run created"
            )
        stored = Configuration.load(saved)
        if config is not None:
            check_same_config(stored, config, run_dir)
            placement = {key: getattr(config, key) for key in PLACEMENT_FIELDS}
            if placement != {key: getattr(stored, key) for key in PLACEMENT_FIELDS}:
                logger.info(
                    "resuming %s with %s",
                    run_dir,
                    ", ".join(f"{key} {value}" for key, value in placement.items()),
                )
                stored = Configuration.from_dict({**stored.to_dict(), **placement})
        return stored, run_dir
    run_dir = Path(config.output_dir) if config.output_dir else default_run_dir()
    check_destination(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = config.model_copy(deep=True)
    for ref in [*resolved.models, *([resolved.base_model] if resolved.base_model else [])]:
        if Path(ref.path).expanduser().exists():
            ref.path = str(Path(ref.path).expanduser().resolve())
    resolved.evaluation_settings.tasks = [
        str(Path(t).resolve()) for t in resolved.evaluation_settings.tasks
    ]
    resolved.output_dir = str(run_dir.resolve())
    resolved.save(run_dir / "config.json")
    return resolved, run_dir


# -- the whole run ---------------------------------------------------------------------------------


def run_evolutionary_tournament(
    config: Configuration | None = None,
    *,
    resume: str | Path | None = None,
    progress: ProgressCallback | None = None,
) -> str:
    """Evolve, write the best model, score parents / average / best on the test split, report.

    Args:
        config: the run configuration (default: the embedded default). With ``resume`` it may be
            None (the run's own configuration is used) or must equal the run's.
        resume: a run folder to continue from its checkpoint.
        progress: receives progress events (see :class:`EvolutionaryMerger`).

    Returns:
        The path of the best model's folder (``<run>/best``), loadable with ``from_pretrained``.
    """
    from .config import create_default_config

    if config is None and resume is None:
        config = create_default_config()
    started = time.perf_counter()
    from .utils import validate_merge_config

    sources = validate_merge_config(config) if resume is None else None  # before any folder is made
    config, run_dir = prepare_run_dir(config, resume)  # type: ignore[arg-type]
    try:
        evolution = EvolutionaryMerger(
            config, run_dir, resume=resume is not None, progress=progress, sources=sources
        )
        best = evolution.evolve()
        evolved = time.perf_counter()
        assert evolution.executor is not None
        scorer = evolution.executor.local_scorer or CandidateScorer(config)
        best_dir = finish_run(
            evolution.outcome(),
            best,
            scorer,
            started,
            evolved,
            progress or (lambda *a, **k: None),
        )
    except KeyboardInterrupt:
        raise RunInterrupted(
            f"interrupted; the run folder keeps its checkpoint. Resume with: "
            f"python -m agent_forge.evomerge.cli --resume {run_dir}"
        ) from None
    finally:
        if "evolution" in locals() and evolution.executor is not None:
            evolution.executor.close()
    return str(best_dir)
