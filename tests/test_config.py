"""Configuration: the spec's usage, JSON/YAML round trips, and a clear message for every bad
field."""

from __future__ import annotations

import json

import pytest
import yaml
from pydantic import ValidationError

from agent_forge.evomerge.config import (
    Configuration,
    EvolutionSettings,
    ModelReference,
    create_default_config,
    parse_size,
)
from agent_forge.evomerge.exceptions import ConfigurationError


def test_spec_usage_example_works_as_written():
    from evomerge.config import create_default_config as spec_create  # the spec's import path

    config = spec_create()
    config.models = [
        ModelReference(name="model1", path="path/to/model1"),
        ModelReference(name="model2", path="path/to/model2"),
        ModelReference(name="model3", path="path/to/model3"),
    ]
    config.merge_settings.merge_method = "ps_dfs"
    config.evolution_settings.num_generations = 100
    assert [m.name for m in config.models] == ["model1", "model2", "model3"]
    assert config.merge_settings.merge_method == "ps_dfs"
    assert config.evolution_settings.num_generations == 100


def test_default_config_points_at_the_embedded_models_and_tasks():
    config = create_default_config()
    assert len(config.models) == 3 and config.base_model is not None
    for ref in [*config.models, config.base_model]:
        assert (__import__("pathlib").Path(ref.path) / "config.json").is_file()
    assert config.evaluation_settings.tasks and all(
        __import__("pathlib").Path(t).is_file() for t in config.evaluation_settings.tasks
    )


def test_model_reference_accepts_positional_name_and_path():
    assert ModelReference("a", "b") == ModelReference(name="a", path="b")


@pytest.mark.parametrize("suffix", [".json", ".yaml", ".yml"])
def test_round_trip_json_and_yaml(tmp_path, suffix):
    config = Configuration(
        models=[ModelReference("a", "/x/a"), ModelReference("b", "org/b")],
        base_model=ModelReference("base", "/x/base"),
        seed=7,
        device="cpu",
    )
    config.merge_settings.parameters = {"density": [0.5, 0.7], "lambda": 0.9}
    config.evolution_settings.strategy = "cmaes"
    path = config.save(tmp_path / f"run{suffix}")
    again = Configuration.load(path)
    assert again == config
    raw = path.read_text()
    data = yaml.safe_load(raw) if suffix != ".json" else json.loads(raw)
    assert data["evolution_settings"]["strategy"] == "cmaes"


@pytest.mark.parametrize(
    "data,message",
    [
        ({"modles": []}, "unknown field 'modles'"),
        (
            {"evolution_settings": {"popsize": 4}},
            "unknown field 'evolution_settings.popsize' \\(allowed: strategy,",
        ),
        (
            {"evolution_settings": {"population_size": 1}},
            "evolution_settings.population_size = 1: .*greater than or equal to 2",
        ),
        (
            {"evolution_settings": {"population_size": 4, "tournament_size": 5}},
            "tournament_size = 5 exceeds population_size = 4",
        ),
        (
            {"evolution_settings": {"strategy": "annealing"}},
            "evolution_settings.strategy = \"annealing\": .*'tournament' or 'cmaes'",
        ),
        ({"evolution_settings": {"mutation_rate": 1.5}}, "mutation_rate = 1.5"),
        (
            {"merge_settings": {"merge_method": "tie"}},
            "unknown method 'tie' \\(did you mean 'ties'",
        ),
        ({"merge_settings": {"ps_technique": "linear"}}, "needs no base model"),
        ({"merge_settings": {"max_shard_size": "lots"}}, "cannot read size 'lots'"),
        ({"device": "tpu"}, 'device = "tpu"'),
        ({"seed": -1}, "seed = -1"),
        ({"models": [{"name": "a", "path": "x"}, {"name": "a", "path": "y"}]}, "repeated: a"),
        ({"models": [{"name": "", "path": "x"}]}, "models.0.name"),
    ],
)
def test_each_invalid_field_is_named_with_value_and_what_is_allowed(data, message):
    with pytest.raises(ConfigurationError, match=message):
        Configuration.from_dict(data, origin="run.json")


def test_error_message_is_one_line_prefixed_with_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("evolution_settings:\n  population_size: 0\n")
    with pytest.raises(ConfigurationError) as info:
        Configuration.load(path)
    assert str(info.value).startswith(f"{path}: evolution_settings.population_size = 0")
    assert "\n" not in str(info.value)


def test_unparseable_and_missing_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigurationError, match="not valid json"):
        Configuration.load(bad)
    with pytest.raises(ConfigurationError, match="does not exist"):
        Configuration.load(tmp_path / "missing.yaml")


def test_assignment_is_validated():
    settings = EvolutionSettings()
    with pytest.raises(ValidationError):
        settings.population_size = 1


def test_parse_size():
    assert parse_size("2GB") == 2_000_000_000
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("1.5kb") == 1500
    with pytest.raises(ValueError):
        parse_size("-3GB")


def test_a_small_population_in_a_file_shrinks_the_default_tournament_and_elite():
    """A file that sets population_size 2 and leaves the tournament (3) and elite (2) at their
    defaults gets them shrunk to fit; sizes it sets itself are still checked."""
    settings = Configuration.from_dict({"evolution_settings": {"population_size": 2}})
    assert settings.evolution_settings.tournament_size == 2
    assert settings.evolution_settings.elite_size == 1
    assert Configuration.from_dict({}).evolution_settings.tournament_size == 3
