"""Where candidates are scored: in this process, or on a Ray cluster.

An executor takes recipes and returns one :class:`Evaluation` per recipe, in order. Each worker
holds the sources (and task vectors) resident once and materialises every candidate in place
into one model — no disk, no re-instantiation — then scores it on the fitness split.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from .config import Configuration
from .recipe import RecipeNode, recipe_from_dict

logger = logging.getLogger(__name__)


@dataclass
class Evaluation:
    """A candidate's fitness, its per-task scores, and where the time went."""

    recipe_hash: str
    fitness: float
    scores: dict[str, float]
    merge_seconds: float
    eval_seconds: float
    raw: dict[str, Any] = field(default_factory=dict)


class Executor(Protocol):
    """``batch``: how many recipes one ``evaluate`` call should get (None: all of a generation);
    ``local_scorer``: a scorer in this process whose sources are already open, if there is one."""

    batch: int | None
    local_scorer: CandidateScorer | None

    def evaluate(self, recipes: Sequence[RecipeNode]) -> list[Evaluation]: ...
    def close(self) -> None: ...


class CandidateScorer:
    """One worker's state: resident sources, the evaluator, the tokenizer."""

    def __init__(
        self, config: Configuration, split: str = "fitness", threads: int | None = None
    ) -> None:
        from transformers import AutoTokenizer

        from .evaluation import TaskEvaluator, configure_torch_threads, load_tasks
        from .merger import AdvancedModelMerger
        from .utils import setup_gpu_if_available

        configure_torch_threads(threads)
        device, _ = setup_gpu_if_available(config.device)
        self.merger = AdvancedModelMerger(config, device=device, resident=True)
        first = self.merger.sources[self.merger.model_names[0]]
        self.tokenizer = AutoTokenizer.from_pretrained(first.folder)
        settings = config.evaluation_settings
        self.evaluator = TaskEvaluator(
            load_tasks(settings.tasks),
            batch_size=settings.batch_size,
            fitness_sample_size=settings.fitness_sample_size,
            seed=config.seed,
        )
        self.split = split

    def score(
        self, recipe: RecipeNode, split: str | None = None, limit: int | None = None
    ) -> Evaluation:
        started = time.perf_counter()
        model = self.merger.materialize(recipe)
        merged = time.perf_counter()
        scores = self.evaluator.evaluate(model, self.tokenizer, split or self.split, limit=limit)
        done = time.perf_counter()
        return Evaluation(
            recipe.hash,
            scores.aggregate,
            dict(scores.per_task),
            merged - started,
            done - merged,
            raw=scores.raw,
        )


class SerialExecutor:
    """Scores candidates one after another in this process (one per call, so that progress and
    the records follow each candidate)."""

    batch = 1

    def __init__(self, config: Configuration) -> None:
        self.scorer = CandidateScorer(config)
        self.local_scorer: CandidateScorer | None = self.scorer

    def evaluate(self, recipes: Sequence[RecipeNode]) -> list[Evaluation]:
        return [self.scorer.score(recipe) for recipe in recipes]

    def close(self) -> None:
        pass


class RayExecutor:
    """Scores candidates on Ray actors, each holding the sources once (one CPU thread per actor).

    Uses a running cluster when ``RAY_ADDRESS`` is set, else starts a local one.
    """

    batch = None
    local_scorer = None

    def __init__(self, config: Configuration, workers: int) -> None:
        try:
            import ray
        except ImportError:
            from .exceptions import ConfigurationError

            raise ConfigurationError(
                "backend 'ray' needs Ray: pip install 'agent-forge-evomerge[ray]'"
            ) from None
        if not ray.is_initialized():
            ray.init(
                num_cpus=None if _has_address() else workers,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
            )
        payload = config.model_dump(mode="json")
        actor = ray.remote(num_cpus=1)(_RayScorer)
        self.ray = ray
        self.actors = [actor.remote(payload) for _ in range(workers)]

    def evaluate(self, recipes: Sequence[RecipeNode]) -> list[Evaluation]:
        futures = [
            self.actors[i % len(self.actors)].score.remote(r.to_dict())
            for i, r in enumerate(recipes)
        ]
        return [Evaluation(**result) for result in self.ray.get(futures)]

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []


def _has_address() -> bool:
    import os

    return bool(os.environ.get("RAY_ADDRESS"))


class _RayScorer:
    def __init__(self, payload: dict[str, Any]) -> None:
        self.scorer = CandidateScorer(Configuration.model_validate(payload), threads=1)

    def score(self, recipe: dict[str, Any]) -> dict[str, Any]:
        evaluation = self.scorer.score(recipe_from_dict(recipe))
        return evaluation.__dict__


def make_executor(config: Configuration) -> Executor:
    if config.backend == "ray":
        return RayExecutor(config, config.workers)
    if config.workers > 1:
        logger.warning("workers = %d needs backend 'ray'; scoring serially", config.workers)
    return SerialExecutor(config)
