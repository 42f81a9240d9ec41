"""The evolution on the embedded default models: cache, early stop, elitism, run folder, exact
resume."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from agent_forge.evomerge.config import (
    Configuration,
    EvolutionSettings,
    ModelReference,
    create_default_config,
)
from agent_forge.evomerge.evolutionary_tournament import (
    EvolutionaryMerger,
    prepare_run_dir,
    run_evolutionary_tournament,
)
from agent_forge.evomerge.exceptions import ConfigurationError, RunInterrupted
from agent_forge.evomerge.executors import SerialExecutor
from agent_forge.evomerge.recipe import Merge


def small_config(tmp_path: Path, name: str = "run", **evolution) -> Configuration:
    config = create_default_config()
    config.output_dir = str(tmp_path / name)
    config.evaluation_settings.fitness_sample_size = 24
    settings = dict(
        population_size=4, num_generations=3, tournament_size=2, elite_size=1, patience=10
    )
    settings.update(evolution)
    config.evolution_settings = EvolutionSettings(**settings)
    return config


class CountingExecutor(SerialExecutor):
    """The real in-process executor, counting how many candidates reach it."""

    def __init__(self, config):
        super().__init__(config)
        self.scored: list[str] = []

    def evaluate(self, recipes):
        self.scored += [r.hash for r in recipes]
        return super().evaluate(recipes)


@pytest.fixture(scope="module")
def counted_run(tmp_path_factory):
    config = small_config(tmp_path_factory.mktemp("counted"), num_generations=4)
    executor = CountingExecutor(config)
    evolution = EvolutionaryMerger(config, config.output_dir, executor=executor)
    best = evolution.evolve()
    return evolution, executor, best


def test_cache_prevents_scoring_any_recipe_twice(counted_run):
    evolution, executor, _ = counted_run
    assert len(executor.scored) == len(set(executor.scored)) == len(evolution.records)
    asked = 4 * len(evolution.history)
    assert len(executor.scored) < asked  # elites come back every generation, from the cache
    lines = (Path(evolution.run_dir) / "evaluations.jsonl").read_text().splitlines()
    assert len(lines) == len(executor.scored)
    record = json.loads(lines[0])
    assert {
        "generation",
        "hash",
        "recipe",
        "parents",
        "scores",
        "fitness",
        "merge_seconds",
        "eval_seconds",
    } <= set(record)


def test_elitism_keeps_the_best_fitness_non_decreasing(counted_run):
    evolution, _, best = counted_run
    per_generation = [h["generation_best"] for h in evolution.history]
    assert per_generation == sorted(per_generation)
    assert evolution.records[best.hash]["fitness"] == max(per_generation)


def test_spec_methods_on_the_merger(counted_run):
    evolution, _, _ = counted_run
    population = evolution.create_merged_models()
    assert len(population) == 4 and len({r.hash for r in population}) == 4
    scored = [(r, float(i)) for i, r in enumerate(population)]
    winners = {evolution.tournament_selection(scored).hash for _ in range(30)}
    assert population[0].hash not in winners  # the least fit never wins a tournament of two
    child = evolution.mutate_model(population[3])
    assert child.hash != population[3].hash


def test_early_stopping_when_the_best_stops_improving(tmp_path):
    config = small_config(tmp_path, patience=1, min_delta=1.0, num_generations=6)
    evolution = EvolutionaryMerger(config, config.output_dir)
    evolution.evolve()
    stages = [h["stage"] for h in evolution.history]
    assert stages == ["mixed", "mixed", "refine", "refine"]  # each stage stops on its own


def test_cmaes_run_is_reproducible(tmp_path):
    hashes = []
    for name in ("a", "b"):
        config = small_config(tmp_path, name, strategy="cmaes", num_generations=2)
        config.merge_settings.merge_method = "ps"
        evolution = EvolutionaryMerger(config, config.output_dir)
        evolution.evolve()
        hashes.append(list(evolution.records))
        average = Merge("linear", evolution.space.sources, {})
        assert average.hash in evolution.records  # the anchor joins the first generation
        assert evolution.best_fitness >= evolution.records[average.hash]["fitness"]
        searched = [r for r in evolution.records.values() if r["stage"] == "ps"]
        assert len(searched) == 2 * 4 + 1
    assert hashes[0] == hashes[1]


def digest(folder: str | Path) -> str:
    return hashlib.sha256((Path(folder) / "model.safetensors").read_bytes()).hexdigest()


def test_killed_run_resumes_to_the_same_best_recipe_and_bytes(tmp_path):
    whole = run_evolutionary_tournament(small_config(tmp_path, "whole"))
    whole_summary = json.loads((Path(whole).parent / "summary.json").read_text())

    seen = []

    def kill_in_generation_two(kind, **info):
        if kind == "candidate":
            seen.append(info)
            if len(seen) == 6:  # the second new candidate of generation 2
                raise KeyboardInterrupt

    config = small_config(tmp_path, "killed")
    with pytest.raises(RunInterrupted, match="--resume"):
        run_evolutionary_tournament(config, progress=kill_in_generation_two)
    assert not (Path(config.output_dir) / "best").exists()
    resumed = run_evolutionary_tournament(resume=config.output_dir)
    summary = json.loads((Path(resumed).parent / "summary.json").read_text())
    assert summary["best_recipe_hash"] == whole_summary["best_recipe_hash"]
    assert digest(resumed) == digest(whole)
    assert summary["test"] == whole_summary["test"]
    hashes = [
        json.loads(line)["hash"]
        for line in (Path(resumed).parent / "evaluations.jsonl").read_text().splitlines()
    ]
    assert len(hashes) == len(set(hashes))


def test_run_folder_holds_summary_report_plots_and_best(tmp_path):
    best = run_evolutionary_tournament(small_config(tmp_path, num_generations=2))
    run = Path(best).parent
    for name in (
        "config.json",
        "evaluations.jsonl",
        "checkpoint.json",
        "report.md",
        "fitness.png",
        "lineage.png",
        "summary.json",
        "best/evomerge_recipe.json",
        "best/config.json",
        "best/tokenizer.json",
    ):
        assert (run / name).is_file(), name
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_model"] == str(Path(best).resolve())
    names = {m.name for m in create_default_config().models}
    assert set(summary["test"]) == names | {"base", "average", "ties", "best"}
    assert all("mean" in scores for scores in summary["test"].values())
    assert summary["fitness_test_gap"] == pytest.approx(
        summary["best_fitness"] - summary["test"]["best"]["mean"]
    )
    recipe = json.loads((run / "best" / "evomerge_recipe.json").read_text())
    assert recipe["hash"] == summary["best_recipe_hash"]
    report = (run / "report.md").read_text()
    assert "| best |" in report and "fitness.png" in report


def test_spec_usage_example_runs_end_to_end(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from agent_forge.evomerge.utils import generate_text

    config = create_default_config()
    default_models = list(config.models)
    config.models = [ModelReference(name=m.name, path=m.path) for m in default_models]
    config.merge_settings.merge_method = "ps_dfs"
    config.evolution_settings.num_generations = 1
    config.evolution_settings.population_size = 4
    config.evolution_settings.tournament_size = 2
    config.evaluation_settings.fitness_sample_size = 24
    config.output_dir = str(tmp_path / "spec")
    best_model = run_evolutionary_tournament(config)
    model = AutoModelForCausalLM.from_pretrained(best_model)
    tokenizer = AutoTokenizer.from_pretrained(best_model)
    text = generate_text(model, tokenizer, "Once upon a time", max_length=10)
    assert isinstance(text, str)
    stages = {
        json.loads(line)["stage"]
        for line in (tmp_path / "spec" / "evaluations.jsonl").read_text().splitlines()
    }
    assert {"ps", "dfs"} <= stages <= {"ps", "dfs", "refine"}  # refine: when the best is a merge


def test_refine_stage_searches_around_the_best_merge_and_never_ends_below_it(tmp_path):
    config = small_config(tmp_path, num_generations=3, refine_generations=2)
    evolution = EvolutionaryMerger(config, config.output_dir)
    evolution.evolve()
    stages = [h["stage"] for h in evolution.history]
    assert stages == ["mixed"] * 3 + ["refine"] * 2
    records = list(evolution.records.values())
    searched = [r for r in records if r["stage"] == "mixed"]
    start = max(searched, key=lambda r: r["fitness"])
    refined = [r for r in records if r["stage"] == "refine"]
    assert len(refined) == 2 * 4 and all(r["parents"] == [start["hash"]] for r in refined)
    groups = evolution.space.groups
    for record in refined:
        merge = record["recipe"]
        assert merge["technique"] == start["recipe"]["technique"]
        assert merge["inputs"] == start["recipe"]["inputs"]
        params = merge["params"]
        mixing = [params[k] for k in ("t", "lambda") if k in params]
        mixing += params.get("weight", [])  # one list per input
        # one value per refine group: as many groups as 8 evaluations afford (here one)
        assert mixing and all(len(v) == 1 for v in mixing) and groups > 1
    assert evolution.best_fitness >= start["fitness"]


def test_refine_generations_zero_turns_the_stage_off(tmp_path):
    config = small_config(tmp_path, num_generations=2, refine_generations=0)
    evolution = EvolutionaryMerger(config, config.output_dir)
    evolution.evolve()
    assert [h["stage"] for h in evolution.history] == ["mixed", "mixed"]


def test_a_run_killed_in_the_refine_stage_resumes_to_the_same_end(tmp_path):
    whole = EvolutionaryMerger(small_config(tmp_path, "whole"), tmp_path / "whole")
    whole.evolve()
    seen: list[str] = []

    def kill_in_refine(kind, **info):
        seen.append(info.get("name", kind))
        if seen.count("refine") and kind == "candidate" and seen[-2] == "candidate":
            raise KeyboardInterrupt  # the second candidate of the refine stage

    config = small_config(tmp_path, "killed")
    with pytest.raises(RunInterrupted):
        EvolutionaryMerger(config, config.output_dir, progress=kill_in_refine).evolve()
    resumed = EvolutionaryMerger(config, config.output_dir, resume=True)
    assert resumed.stages[resumed.stage_index] == "refine"
    resumed.evolve()
    assert list(resumed.records) == list(whole.records)
    assert [h["best"] for h in resumed.history] == [h["best"] for h in whole.history]
    assert resumed.best_recipe == whole.best_recipe


def test_resume_takes_where_to_run_from_the_given_config(tmp_path):
    config = small_config(tmp_path, num_generations=1)
    prepare_run_dir(config, None)
    moved = small_config(tmp_path, num_generations=1)
    moved.backend, moved.workers, moved.device = "ray", 3, "cpu"
    resumed, _ = prepare_run_dir(moved, config.output_dir)
    assert (resumed.backend, resumed.workers, resumed.device) == ("ray", 3, "cpu")
    assert Configuration.load(Path(config.output_dir) / "config.json").backend == "serial"
    unchanged, _ = prepare_run_dir(None, config.output_dir)
    assert (unchanged.backend, unchanged.workers) == ("serial", 1)


def test_resume_with_a_different_config_names_the_field(tmp_path):
    config = small_config(tmp_path, num_generations=1)
    run_evolutionary_tournament(config)
    changed = small_config(tmp_path, num_generations=5)
    with pytest.raises(
        ConfigurationError, match="evolution_settings.num_generations is 1 in the run, 5 here"
    ):
        run_evolutionary_tournament(changed, resume=config.output_dir)


def test_a_new_run_refuses_a_used_folder(tmp_path):
    config = small_config(tmp_path, num_generations=1)
    run_evolutionary_tournament(config)
    with pytest.raises(ConfigurationError, match="not empty"):
        run_evolutionary_tournament(config)


def test_lower_performers_are_merged_into_new_nodes(counted_run):
    evolution, _, _ = counted_run
    nested = [
        r for r in evolution.records.values() if r["generation"] > 0 and len(r["parents"]) >= 2
    ]
    assert nested, "no merge of lower performers was bred"
    for record in nested:
        # a merge of their recipes, or (LOWER_STACK_RATE) a stack of their layers
        assert record["recipe"]["type"] in ("merge", "layer_stack")
        parents = {p: evolution.records[p] for p in record["parents"]}
        assert all(p["generation"] < record["generation"] for p in parents.values())
        assert record["recipe"]["inputs"] == [p["recipe"] for p in parents.values()]


def test_the_spec_methods_are_views_that_never_change_the_run(tmp_path):
    """``create_merged_models()``, ``tournament_selection()`` and ``mutate_model()`` called
    before ``evolve()`` leave it exactly as an untouched run: same candidates, same order."""
    runs = []
    for name, poke in (("plain", False), ("poked", True)):
        config = small_config(tmp_path, name, num_generations=2)
        evolution = EvolutionaryMerger(config, config.output_dir)
        if poke:
            population = evolution.create_merged_models()
            scored = [(r, float(i)) for i, r in enumerate(population)]
            for _ in range(3):
                evolution.mutate_model(evolution.tournament_selection(scored))
        evolution.evolve()
        runs.append(list(evolution.records))
    assert runs[0] == runs[1]


def test_a_default_run_scores_a_layer_stack(counted_run):
    evolution, _, _ = counted_run
    kinds = [r["recipe"]["type"] for r in evolution.records.values()]
    assert "layer_stack" in kinds
