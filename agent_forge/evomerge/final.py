"""The end of a run: write the best model, score parents / plain average / best on the full test
split, and write ``summary.json`` and the report."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .exceptions import ConfigurationError
from .executors import CandidateScorer, SerialExecutor
from .merger import RECIPE_FILE, AdvancedModelMerger, describe
from .recipe import Merge, RecipeNode, Source
from .report import verdict, write_report
from .storage import atomic_write_text

if TYPE_CHECKING:
    from .evolutionary_tournament import EvolutionaryMerger

logger = logging.getLogger(__name__)


def write_best(evolution: EvolutionaryMerger, best: RecipeNode) -> Path:
    """Stream the best recipe to ``<run>/best`` (reused when a finished write is already there)."""
    dest = evolution.run_dir / "best"
    if (dest / RECIPE_FILE).is_file():
        written = json.loads((dest / RECIPE_FILE).read_text())
        if written.get("hash") == best.hash:
            return dest
        raise ConfigurationError(
            f"{dest} holds another model than this run's best; move it away and resume"
        )
    merger = AdvancedModelMerger(evolution.config)
    paths = {
        ref.name: ref.path
        for ref in [*evolution.config.models, *filter(None, [evolution.config.base_model])]
    }
    return merger.merge(best, dest, source_paths=paths)


def test_scores(
    evolution: EvolutionaryMerger, best: RecipeNode, scorer: CandidateScorer
) -> dict[str, dict[str, float]]:
    """Per-task test scores (and their weighted ``mean``) of each parent, the base (when there is
    one), the plain average, default TIES (with a base) and the best."""
    contenders: dict[str, RecipeNode] = {name: Source(name) for name in evolution.space.models}
    if evolution.space.base is not None:
        contenders["base"] = Source(evolution.space.base)
    contenders.update(simple_merges(evolution))
    contenders["best"] = best
    table = {}
    for name, recipe in contenders.items():
        evaluation = scorer.score(recipe, split="test")
        table[name] = {**evaluation.scores, "mean": evaluation.fitness}
    return table


def simple_merges(evolution: EvolutionaryMerger) -> dict[str, RecipeNode]:
    """The yardsticks an evolved merge must beat: the plain average and, with a base, default
    TIES (density 0.5, λ 1) over the sources."""
    merges: dict[str, RecipeNode] = {"average": Merge("linear", evolution.space.sources, {})}
    if evolution.space.base is not None:
        merges["ties"] = Merge("ties", evolution.space.sources, {}, Source(evolution.space.base))
    return merges


def reference_fitness(evolution: EvolutionaryMerger, scorer: CandidateScorer) -> dict[str, float]:
    """Fitness-split scores of the best input model, the plain average and default TIES, for the
    fitness plot's reference lines (from the run's records where the search scored them)."""
    inputs = [Source(n) for n in evolution.space.models]
    if evolution.space.base is not None:
        inputs.append(Source(evolution.space.base))

    def fitness(recipe: RecipeNode) -> float:
        record = evolution.records.get(recipe.hash)
        return record["fitness"] if record else scorer.score(recipe, split="fitness").fitness

    scored = {r.name: fitness(r) for r in inputs}
    top = max(scored, key=lambda n: scored[n])
    out = {f"best input ({top})": scored[top]}
    for name, recipe in simple_merges(evolution).items():
        out["plain average" if name == "average" else "default TIES"] = fitness(recipe)
    return out


def final_scorer(evolution: EvolutionaryMerger) -> CandidateScorer:
    """The serial executor's scorer (its sources already open), or a new one in this process."""
    executor = evolution.executor
    if isinstance(executor, SerialExecutor):
        return executor.scorer
    return CandidateScorer(evolution.config)


def input_names(evolution: EvolutionaryMerger) -> list[str]:
    """The rows of the test table that are input models: the sources and the base."""
    return [*evolution.space.models, *(["base"] if evolution.space.base is not None else [])]


def task_weights(evolution: EvolutionaryMerger) -> dict[str, float]:
    from .evaluation import load_tasks

    return {
        task.name: task.weight for task in load_tasks(evolution.config.evaluation_settings.tasks)
    }


def finish_run(
    evolution: EvolutionaryMerger,
    best: RecipeNode,
    started: float,
    evolved: float,
    progress: Callable[..., Any],
) -> Path:
    progress("finishing", step="writing the best model")
    best_dir = write_best(evolution, best)
    written = time.perf_counter()
    progress("finishing", step="scoring parents, average and best on the test split")
    scorer = final_scorer(evolution)
    test = test_scores(evolution, best, scorer)
    references = reference_fitness(evolution, scorer)
    tested = time.perf_counter()
    records = evolution.records
    best_record = records[best.hash]
    evaluated = [r for r in records.values() if "error" not in r]
    summary = {
        "best_model": str(best_dir.resolve()),
        "best_recipe_hash": best.hash,
        "best_fitness": best_record["fitness"],
        "test": test,
        "fitness_test_gap": best_record["fitness"] - test["best"]["mean"],
        "verdict": verdict(test, input_names(evolution)),
        "reference_fitness": references,
        "task_weights": task_weights(evolution),
        "generations": len(evolution.history),
        "timings": {
            "candidates": len(records),
            "evolution_seconds": evolved - started,
            "mean_merge_seconds": sum(r["merge_seconds"] for r in evaluated)
            / max(1, len(evaluated)),
            "mean_eval_seconds": sum(r["eval_seconds"] for r in evaluated) / max(1, len(evaluated)),
            "write_seconds": written - evolved,
            "test_seconds": tested - written,
            "total_seconds": time.perf_counter() - started,
        },
    }
    task_names = [t for t in next(iter(test.values())) if t != "mean"]
    write_report(evolution.run_dir, summary, evolution.history, records, task_names, describe(best))
    atomic_write_text(evolution.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    progress("done", summary=summary, task_names=task_names)
    return best_dir
