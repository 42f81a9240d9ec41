"""The end of a run: write the best model, score parents / plain average / best on the full test
split, and write ``summary.json`` and the report."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import Configuration
from .exceptions import ConfigurationError
from .executors import CandidateScorer
from .merger import RECIPE_FILE, AdvancedModelMerger, describe, model_card
from .recipe import Merge, RecipeNode, Source
from .report import verdict, write_report
from .storage import atomic_write_text

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunOutcome:
    """What a finished search hands to its end: the configuration, the run folder, the input
    models' names, every scored candidate (hash → record) and the per-generation history."""

    config: Configuration
    run_dir: Path
    models: tuple[str, ...]
    base: str | None
    records: dict[str, dict[str, Any]]
    history: list[dict[str, Any]]

    @property
    def sources(self) -> tuple[Source, ...]:
        return tuple(Source(name) for name in self.models)


def write_best(run: RunOutcome, best: RecipeNode) -> Path:
    """Stream the best recipe to ``<run>/best`` (reused when a finished write is already there)."""
    dest = run.run_dir / "best"
    if (dest / RECIPE_FILE).is_file():
        written = json.loads((dest / RECIPE_FILE).read_text())
        if written.get("hash") == best.hash:
            return dest
        raise ConfigurationError(
            f"{dest} holds another model than this run's best; move it away and resume"
        )
    merger = AdvancedModelMerger(run.config)
    paths = {
        ref.name: ref.path for ref in [*run.config.models, *filter(None, [run.config.base_model])]
    }
    return merger.merge(best, dest, source_paths=paths)


def test_scores(
    run: RunOutcome, best: RecipeNode, scorer: CandidateScorer
) -> dict[str, dict[str, float]]:
    """Per-task test scores (and their weighted ``mean``) of each parent, the base (when there is
    one), the plain average, default TIES (with a base) and the best."""
    contenders: dict[str, RecipeNode] = {name: Source(name) for name in run.models}
    if run.base is not None:
        contenders["base"] = Source(run.base)
    contenders.update(simple_merges(run))
    contenders["best"] = best
    table = {}
    for name, recipe in contenders.items():
        evaluation = scorer.score(recipe, split="test")
        table[name] = {**evaluation.scores, "mean": evaluation.fitness}
    return table


def simple_merges(run: RunOutcome) -> dict[str, RecipeNode]:
    """The yardsticks an evolved merge must beat: the plain average and, with a base, default
    TIES (density 0.5, λ 1) over the sources."""
    merges: dict[str, RecipeNode] = {"average": Merge("linear", run.sources, {})}
    if run.base is not None:
        merges["ties"] = Merge("ties", run.sources, {}, Source(run.base))
    return merges


def reference_fitness(run: RunOutcome, scorer: CandidateScorer) -> dict[str, float]:
    """Fitness-split scores of the best input model, the plain average and default TIES, for the
    fitness plot's reference lines (from the run's records where the search scored them)."""
    inputs = [Source(n) for n in run.models]
    if run.base is not None:
        inputs.append(Source(run.base))

    def fitness(recipe: RecipeNode) -> float:
        record = run.records.get(recipe.hash)
        return record["fitness"] if record else scorer.score(recipe, split="fitness").fitness

    scored = {r.name: fitness(r) for r in inputs}
    top = max(scored, key=lambda n: scored[n])
    out = {f"best input ({top})": scored[top]}
    for name, recipe in simple_merges(run).items():
        out["plain average" if name == "average" else "default TIES"] = fitness(recipe)
    return out


def input_names(run: RunOutcome) -> list[str]:
    """The rows of the test table that are input models: the sources and the base."""
    return [*run.models, *(["base"] if run.base is not None else [])]


def task_weights(run: RunOutcome) -> dict[str, float]:
    from .evaluation import load_tasks

    return {task.name: task.weight for task in load_tasks(run.config.evaluation_settings.tasks)}


def finish_run(
    run: RunOutcome,
    best: RecipeNode,
    scorer: CandidateScorer,
    started: float,
    evolved: float,
    progress: Callable[..., Any],
) -> Path:
    progress("finishing", step="writing the best model")
    best_dir = write_best(run, best)
    written = time.perf_counter()
    progress("finishing", step="scoring parents, average and best on the test split")
    test = test_scores(run, best, scorer)
    references = reference_fitness(run, scorer)
    tested = time.perf_counter()
    records = run.records
    best_record = records[best.hash]
    evaluated = [r for r in records.values() if "error" not in r]
    summary = {
        "best_model": str(best_dir.resolve()),
        "best_recipe_hash": best.hash,
        "best_fitness": best_record["fitness"],
        "test": test,
        "fitness_test_gap": best_record["fitness"] - test["best"]["mean"],
        "verdict": verdict(test, input_names(run)),
        "reference_fitness": references,
        "task_weights": task_weights(run),
        "generations": len(run.history),
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
    weights = task_weights(run)
    scored = {t: 100 * test["best"][t] for t in task_names if weights.get(t, 0) > 0}
    document = json.loads((best_dir / RECIPE_FILE).read_text())
    atomic_write_text(best_dir / "README.md", model_card(document, scored))
    write_report(run.run_dir, summary, run.history, records, task_names, describe(best))
    atomic_write_text(run.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    progress("done", summary=summary, task_names=task_names)
    return best_dir
