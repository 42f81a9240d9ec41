"""Every documented command, run as a subprocess on the embedded default models."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from agent_forge.evomerge.config import create_default_config

QUICK = ["--generations", "1", "--population", "4", "--fitness-sample-size", "24"]
MODEL_NAMES = [
    m.name for m in create_default_config().models
]  # the embedded skills (task names too)


def cli(
    *args: str, env: dict[str, str] | None = None, timeout: int = 300, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "agent_forge.evomerge.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=full_env,
        timeout=timeout,
    )


def assert_clean_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and fragment in lines[-1], result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def default_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "run"
    result = cli("--run", *QUICK, "--output", str(out))
    assert result.returncode == 0, result.stderr
    assert (
        "test split" in result.stdout and f"best model: {out.resolve() / 'best'}" in result.stdout
    )
    for row in (*MODEL_NAMES, "base", "average", "ties", "best"):
        assert row in result.stdout
    table_end = result.stdout.index("└")
    assert result.stdout[table_end:].splitlines()[1].startswith("verdict: best ")
    return out


def test_run_with_the_embedded_default(default_run):
    summary = json.loads((default_run / "summary.json").read_text())
    assert (default_run / "best" / "model.safetensors").is_file()
    assert set(summary["test"]) == {*MODEL_NAMES, "base", "average", "ties", "best"}
    test = summary["test"]
    over_average = 100 * (test["best"]["mean"] - test["average"]["mean"])
    assert f"{abs(over_average):.1f}" in summary["verdict"]
    assert summary["verdict"] in (default_run / "report.md").read_text()
    references = summary["reference_fitness"]
    top = max([*MODEL_NAMES, "base"], key=lambda name: test[name]["mean"])
    assert set(references) == {"plain average", "default TIES", f"best input ({top})"} or (
        # the best input on fitness may differ from the best on test
        set(references) - {"plain average", "default TIES"}
        <= {f"best input ({name})" for name in [*MODEL_NAMES, "base"]}
        and len(references) == 3
    )
    records = [json.loads(line) for line in (default_run / "evaluations.jsonl").open()]
    average = next(r for r in records if r["label"] == "linear" and r["generation"] == 0)
    assert references["plain average"] == average["fitness"]  # the same split and subset


def test_merge_rebuilds_the_best_model_from_its_recipe(default_run, tmp_path):
    out = tmp_path / "rebuilt"
    result = cli(
        "--merge", str(default_run / "best" / "evomerge_recipe.json"), "--output", str(out)
    )
    assert result.returncode == 0, result.stderr
    digest = [
        hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
        for folder in (out, default_run / "best")
    ]
    assert digest[0] == digest[1]


def front_matter(card: Path) -> dict:
    text = card.read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---", 2)[1])


def test_the_best_model_card_carries_its_test_scores_and_no_local_paths(default_run):
    front = front_matter(default_run / "best" / "README.md")
    summary = json.loads((default_run / "summary.json").read_text())
    (index,) = front["model-index"]
    scores = {r["dataset"]["name"]: r["metrics"][0]["value"] for r in index["results"]}
    weights = summary["task_weights"]
    expected = {t: round(100 * v, 2) for t, v in summary["test"]["best"].items() if weights.get(t)}
    assert scores == expected and scores
    assert "base_model" not in front  # the embedded models are local folders, not hub ids
    assert front["pipeline_tag"] == "text-generation" and "merge" in front["tags"]
    assert front["license"] == "other"  # the embedded models state none
    document = json.loads((default_run / "best" / "evomerge_recipe.json").read_text())
    for name, info in document["source_info"].items():
        assert len(info["sha256"]) == 64 and info["hub_id"] is None, name


def test_merge_reads_a_moved_model_from_source_and_warns_when_it_changed(default_run, tmp_path):
    import shutil

    recipe = json.loads((default_run / "best" / "evomerge_recipe.json").read_text())
    name = sorted(recipe["sources"])[0]
    moved = tmp_path / "moved"
    shutil.copytree(recipe["sources"][name], moved)
    recipe["sources"][name] = str(tmp_path / "gone")  # the folder the recipe names has moved
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(recipe))
    assert_clean_error(cli("--merge", str(path), "--output", str(tmp_path / "a")), "gone")
    result = cli(
        "--merge", str(path), "--output", str(tmp_path / "b"), "--source", f"{name}={moved}"
    )
    assert result.returncode == 0, result.stderr
    assert "is not the one the recipe was made from" not in result.stderr
    original = (default_run / "best" / "model.safetensors").read_bytes()
    assert (tmp_path / "b" / "model.safetensors").read_bytes() == original
    other = next(p for n, p in recipe["sources"].items() if n != name)
    result = cli(
        "--merge", str(path), "--output", str(tmp_path / "c"), "--source", f"{name}={other}"
    )
    assert result.returncode == 0, result.stderr
    assert f"model {name} ({other}) is not the one the recipe was made from" in result.stderr
    assert_clean_error(
        cli("--merge", str(path), "--output", str(tmp_path / "d"), "--source", "nobody=x"),
        "the recipe has no model 'nobody'",
    )


def test_model_card_lists_hub_ids_and_the_shared_license(tiny_family, tmp_path):
    """A source saved from a Hub model records its id (_name_or_path) and its card's license:
    the card's base_model names that id, never the local folder."""
    import shutil

    from agent_forge.evomerge.merger import AdvancedModelMerger
    from agent_forge.evomerge.recipe import Merge, Source
    from agent_forge.evomerge.sources import open_source

    folders = {}
    for name, hub in (("m1", "org/tuned-one"), ("m2", "org/tuned-two")):
        folders[name] = tmp_path / name
        shutil.copytree(tiny_family[name], folders[name])
        config = json.loads((folders[name] / "config.json").read_text())
        (folders[name] / "config.json").write_text(json.dumps({**config, "_name_or_path": hub}))
        (folders[name] / "README.md").write_text("---\nlicense: apache-2.0\n---\n# a model\n")
    merger = AdvancedModelMerger(sources={n: open_source(n, str(p)) for n, p in folders.items()})
    recipe = Merge("slerp", [Source("m1"), Source("m2")], {"t": 0.3})
    out = merger.merge(recipe, tmp_path / "out")
    front = front_matter(out / "README.md")
    assert front["base_model"] == ["org/tuned-one", "org/tuned-two"]
    assert front["license"] == "apache-2.0" and "slerp" in front["tags"]
    assert str(tmp_path) not in yaml.safe_dump(front)
    (folders["m2"] / "README.md").write_text("---\nlicense: mit\n---\n")
    merger = AdvancedModelMerger(sources={n: open_source(n, str(p)) for n, p in folders.items()})
    assert (
        front_matter(merger.merge(recipe, tmp_path / "mixed") / "README.md")["license"] == "other"
    )


def test_merge_with_gguf_export(default_run, tmp_path):
    out = tmp_path / "merged"
    result = cli(
        "--merge",
        str(default_run / "best" / "evomerge_recipe.json"),
        "--output",
        str(out),
        "--export-gguf",
        "--outtype",
        "f32",
    )
    assert result.returncode == 0, result.stderr
    from agent_forge.evomerge.gguf_utils import gguf_info

    info = gguf_info(tmp_path / "merged-f32.gguf")
    assert info["architecture"] == "llama"


def test_evaluate_prints_a_table(default_run):
    result = cli("--evaluate", str(default_run / "best"))
    assert result.returncode == 0, result.stderr
    for task in (*MODEL_NAMES, "mean"):
        assert task in result.stdout
    assert "%" in result.stdout


def test_generate_continues_a_prompt():
    model = create_default_config().models[0].path
    result = cli("--generate", model, "--prompt", "ABCD>", "--max-length", "4")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ABCD>") and len(result.stdout.strip()) > len("ABCD>")


def test_run_with_two_local_models_takes_the_third_from_the_defaults(tmp_path):
    config = create_default_config()
    first, second = (tmp_path / "mine-a", tmp_path / "mine-b")
    shutil.copytree(config.models[0].path, first)
    shutil.copytree(config.models[1].path, second)
    result = cli(
        "--run",
        *QUICK,
        "--model1",
        str(first),
        "--model2",
        str(second),
        "--output",
        str(tmp_path / "run"),
    )
    assert result.returncode == 0, result.stderr
    assert f"model3 not given: using {config.models[2].name}" in result.stderr
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert [m["name"] for m in saved["models"]] == ["mine-a", "mine-b", config.models[2].name]


def test_a_run_over_tied_models_evolves_and_writes_a_tied_model(tmp_path):
    """Models whose head is their input embedding (SmolLM2, Qwen2.5, Llama 3.2 …): every
    candidate technique, in memory and streamed, keeps the tie."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from agent_forge.evomerge.config import ModelReference

    config = create_default_config()

    def tied_copy(reference: ModelReference) -> ModelReference:
        model = AutoModelForCausalLM.from_pretrained(reference.path)
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
        folder = tmp_path / "tied" / reference.name
        model.save_pretrained(folder)
        AutoTokenizer.from_pretrained(reference.path).save_pretrained(folder)
        return ModelReference(reference.name, str(folder))

    config.models = [tied_copy(m) for m in config.models]
    config.base_model = tied_copy(config.base_model)
    config.evolution_settings.population_size = 6
    config.evolution_settings.num_generations = 2
    config.evaluation_settings.fitness_sample_size = 24
    path = config.save(tmp_path / "tied.json")
    result = cli("--config", str(path), "--run", "--output", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    best = tmp_path / "run" / "best"
    assert json.loads((best / "config.json").read_text())["tie_word_embeddings"] is True
    model = AutoModelForCausalLM.from_pretrained(best)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    evaluations = (tmp_path / "run" / "evaluations.jsonl").read_text().splitlines()
    labels = {json.loads(line)["label"] for line in evaluations}
    assert len(labels) >= 4, labels  # the mixed population: several techniques ran


def test_run_from_a_config_file_with_flags_overriding(tmp_path):
    config = create_default_config()
    config.evolution_settings.population_size = 4
    config.evolution_settings.tournament_size = 2
    config.evolution_settings.num_generations = 3
    config.evaluation_settings.fitness_sample_size = 24
    config.seed = 11
    path = config.save(tmp_path / "run.json")
    result = cli(
        "--config", str(path), "--run", "--generations", "1", "--output", str(tmp_path / "run")
    )
    assert result.returncode == 0, result.stderr
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["seed"] == 11 and saved["evolution_settings"]["num_generations"] == 1


def test_sigint_mid_generation_then_resume_gives_the_same_best(tmp_path):
    args = ["--generations", "3", "--population", "4", "--fitness-sample-size", "24", "--seed", "3"]
    whole = cli("--run", *args, "--output", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr
    run = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "-m", "agent_forge.evomerge.cli", "--run", *args, "--output", str(run)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        # a shell's background job inherits SIGINT ignored (then Python raises nothing on it)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    evaluations = run / "evaluations.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline:  # wait until generation 1 is under way
        if evaluations.is_file() and len(evaluations.read_text().splitlines()) >= 5:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 2, stderr
    assert f"--resume {run}" in stderr and "Traceback" not in stderr
    assert not (run / "summary.json").exists()
    resumed = cli("--resume", str(run), "--device", "cpu")  # where it runs may change
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {run} with device cpu, backend serial, workers 1" in resumed.stderr
    assert json.loads((run / "config.json").read_text())["device"] == "auto"  # the run's own
    best = [
        json.loads((folder / "summary.json").read_text())["best_recipe_hash"]
        for folder in (tmp_path / "whole", run)
    ]
    assert best[0] == best[1]


def test_spec_example_with_hub_models_fails_offline_with_a_clear_message(tmp_path):
    result = cli(
        "--run",
        "--model1",
        "bert-base-uncased",
        "--model2",
        "roberta-base",
        "--model3",
        "distilbert-base-uncased",
        env={"HF_HOME": str(tmp_path / "hf")},
        cwd=tmp_path,
    )
    assert_clean_error(result, "bert-base-uncased is not available offline")
    assert not (tmp_path / "evomerge_runs").exists()  # no run folder is left behind


def test_log_file_gets_debug_lines_and_quiet_silences_progress(default_run, tmp_path):
    log = tmp_path / "evomerge.log"
    result = cli("--evaluate", str(default_run / "best"), "--quiet", "--log-file", str(log))
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == ""
    text = log.read_text()
    assert "DEBUG" in text and "agent_forge.evomerge" in text


@pytest.mark.parametrize(
    "args,fragment",
    [
        ([], "nothing to do"),
        (["--run", "--evaluate", "x"], "choose exactly one"),
        (["--run", "--population", "1"], "evolution_settings.population_size = 1"),
        (["--run", "--strategy", "annealing"], "invalid choice: 'annealing'"),
        (["--run", "--method", "tie"], "did you mean 'ties'"),
        (["--run", "--model1", "/no/such/model"], "model path /no/such/model does not exist"),
        (["--generate", "/no/such/model", "--prompt", "hi"], "does not exist"),
        (["--generate", "x"], "--generate needs --prompt"),
        (
            ["--merge", "/no/recipe.json", "--output", "x"],
            "recipe file /no/recipe.json does not exist",
        ),
        (["--resume", "/no/run"], "is not a run folder"),
        (["--resume", "/no/run", "--output", "x"], "--output does not apply to --resume"),
        (["--resume", "/no/run", "--temperature", "0.5"], "--temperature does not apply"),
        (["--config", "/no/config.yaml", "--run"], "does not exist"),
    ],
)
def test_user_mistakes_end_in_one_line_and_exit_code_2(args, fragment):
    assert_clean_error(cli(*args), fragment)


def broken_copy(tiny_family, tmp_path: Path, how: str) -> Path:
    """m2 with half its weights file cut off, or with one tensor of another shape."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / how
    shutil.copytree(tiny_family["m2"], folder)
    weights = folder / "model.safetensors"
    if how == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    else:
        tensors = load_file(weights)
        tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(65, 32)
        save_file(tensors, weights)
    return folder


@pytest.mark.parametrize(
    "case,fragment",
    [
        ("density out of range", "density"),
        ("no base", "ties needs base_model"),
        ("truncated", "damaged or incomplete"),
        ("reshaped", "model.layers.1.mlp.up_proj.weight"),
    ],
)
def test_bad_merge_recipes_end_in_one_line_exit_2_and_no_output(
    case, fragment, tiny_family, tmp_path
):
    m1, m2, base = (str(tiny_family[n]) for n in ("m1", "m2", "base"))
    density = 1.5 if case == "density out of range" else 0.5
    if case in ("truncated", "reshaped"):
        m2 = str(broken_copy(tiny_family, tmp_path, case))
    recipe = {
        "merge_method": "ties",
        "models": [
            {"model": m, "parameters": {"weight": 0.5, "density": density}} for m in (m1, m2)
        ],
    }
    if case != "no base":
        recipe["base_model"] = base
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    before = {p: p.stat().st_mtime_ns for p in Path(m2).iterdir()}
    assert_clean_error(cli("--merge", str(path), "--output", str(tmp_path / "out")), fragment)
    assert not (tmp_path / "out").exists()
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())
    assert {p: p.stat().st_mtime_ns for p in Path(m2).iterdir()} == before  # inputs untouched


STACK = {"type": "layer_stack", "inputs": [{"type": "source", "name": "a"}], "slots": [[0, 0]]}
DARE = {
    "type": "merge",
    "technique": "dare_ties",
    "inputs": [{"type": "source", "name": "a"}],
    "base": {"type": "source", "name": "b"},
}


@pytest.mark.parametrize(
    "recipe,fragment",
    [
        (DARE | {"seed": "abc"}, "seed 'abc' must be an integer"),
        (DARE | {"seed": 1.7}, "seed 1.7 must be an integer"),
        (DARE | {"params": [1, 2]}, "'params' must be a mapping"),
        (STACK | {"embed_from": "x"}, "'embed_from' must be an input index"),
        (STACK | {"embed_from": 0.0}, "'embed_from' must be an input index"),
        (STACK | {"slots": [[0, 1, None]]}, "scale must be a number"),
        (STACK | {"slots": [[0, 1, "x"]]}, "scale must be a number"),
        (STACK | {"slots": [[True, 0]]}, "input and layer must be non-negative integers"),
        (STACK | {"slots": [{"input": 0, "layer": 0, "sclae": 2}]}, "unknown key 'sclae'"),
        (STACK | {"slots": 5}, "'slots' must be a list"),
    ],
)
def test_malformed_recipe_files_end_in_one_line_and_exit_2(recipe, fragment, tmp_path):
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps({"recipe": recipe, "sources": {"a": "/x/a", "b": "/x/b"}}))
    assert_clean_error(cli("--merge", str(path), "--output", str(tmp_path / "out")), fragment)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "config,fragment",
    [
        (
            {"merge_method": "linear", "models": [{"parameters": {"weight": 1.0}}]},
            "models[0]: each entry needs 'model'",
        ),
        (
            {"merge_method": "linear", "models": [{"model": "/x/a", "parameters": [1]}]},
            "models[0]: 'parameters' must be a mapping",
        ),
        (
            {"merge_method": "passthrough", "slices": [{"sources": [{"model": "/x/a"}]}]},
            "slice 0: layer_range must be [start, stop]",
        ),
        (
            {
                "merge_method": "passthrough",
                "slices": [{"sources": [{"model": "/x/a", "layer_range": [1]}]}],
            },
            "slice 0: layer_range must be [start, stop]",
        ),
    ],
)
def test_malformed_mergekit_files_end_in_one_line_and_exit_2(config, fragment, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    assert_clean_error(cli("--merge", str(path), "--output", str(tmp_path / "out")), fragment)
    assert not (tmp_path / "out").exists()


def test_bad_config_file_names_the_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("evolution_settings:\n  population_size: 1\n")
    assert_clean_error(cli("--config", str(path), "--run"), "population_size = 1")


def test_unwritable_output_is_a_clear_error(tmp_path):
    # /proc accepts no new folders, even for root (chmod cannot stop root)
    assert_clean_error(
        cli("--run", *QUICK, "--output", "/proc/evomerge-run"), "cannot write under /proc"
    )
    as_file = tmp_path / "a-file"
    as_file.write_text("x")
    assert_clean_error(cli("--run", *QUICK, "--output", str(as_file)), "exists and is a file")


def test_output_that_is_not_empty_is_refused(tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep")
    assert_clean_error(cli("--run", *QUICK, "--output", str(taken)), "not empty")
    assert (taken / "mine.txt").read_text() == "keep"


def test_help_shows_the_spec_examples_and_version():
    result = cli("--help")
    assert result.returncode == 0
    for example in (
        "--run --model1 bert-base-uncased --model2 roberta-base --model3 distilbert-base-uncased",
        "--evaluate path/to/merged/model",
        '--generate path/to/merged/model --prompt "Your prompt here"',
        "--config path/to/config.json --run",
    ):
        assert example in result.stdout
    assert cli("--version").stdout.startswith("evomerge ")


def flags_to_config(*argv: str):
    """The configuration the CLI builds from these flags (in process: no run)."""
    from agent_forge.evomerge.cli import build_parser
    from agent_forge.evomerge.commands import build_config

    return build_config(build_parser().parse_args(list(argv)))


def test_population_flag_shrinks_the_tournament_and_elite_unless_the_file_sets_them(tmp_path):
    config = flags_to_config("--run", "--population", "2")
    evolution = config.evolution_settings
    assert (evolution.population_size, evolution.tournament_size, evolution.elite_size) == (2, 2, 1)
    path = tmp_path / "c.yaml"
    path.write_text("evolution_settings:\n  tournament_size: 3\n")
    with pytest.raises(Exception, match="tournament_size = 3 exceeds population_size = 2"):
        flags_to_config("--run", "--config", str(path), "--population", "2")


def test_three_models_given_leave_the_embedded_base_out(tmp_path, caplog):
    caplog.set_level("INFO", logger="agent_forge")
    three = ["--model1", "a", "--model2", "b", "--model3", "c"]
    assert flags_to_config("--run", *three).base_model is None
    assert "no --base: merging without a base model" in caplog.text
    assert flags_to_config("--run", *three, "--base", "mine").base_model.path == "mine"
    path = tmp_path / "c.yaml"
    path.write_text("base_model: {name: chosen, path: /my/base}\n")
    assert flags_to_config("--run", "--config", str(path), *three).base_model.name == "chosen"
    two = flags_to_config("--run", "--model1", "a", "--model2", "b")
    assert two.base_model.name == "base"  # the third model is embedded: so is its base


def test_model_flags_with_a_config_without_models_say_where_each_slot_comes_from(tmp_path, caplog):
    caplog.set_level("INFO", logger="agent_forge")
    path = tmp_path / "c.yaml"
    path.write_text("seed: 3\n")
    config = flags_to_config("--run", "--config", str(path), "--model1", "a", "--model2", "b")
    assert [m.name for m in config.models][:2] == ["a", "b"]
    assert "the configuration names no models" not in caplog.text
    assert f"model3 not given: using {MODEL_NAMES[2]}" in caplog.text
    assert "from the embedded default models" in caplog.text
