"""The spec's helpers: atomic save, clean-up of only what the run made, device choice,
validation."""

from __future__ import annotations

import pytest
import torch

from agent_forge.evomerge.config import Configuration, ModelReference
from agent_forge.evomerge.exceptions import ConfigurationError, IncompatibleModelsError
from agent_forge.evomerge.utils import (
    MERGE_TECHNIQUES,
    clean_up_models,
    save_model,
    setup_gpu_if_available,
    validate_merge_config,
)


@pytest.fixture()
def model_and_tokenizer(tiny_family):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_family["m1"]), AutoTokenizer.from_pretrained(
        tiny_family["m1"]
    )


def test_save_model_writes_a_loadable_folder(model_and_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tokenizer = model_and_tokenizer
    out = save_model(
        model, tokenizer, tmp_path / "saved", extra_files={"evomerge_recipe.json": "{}"}
    )
    assert {"config.json", "model.safetensors", "tokenizer.json", "evomerge_recipe.json"} <= {
        p.name for p in out.iterdir()
    }
    again = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(again.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_save_model_shards_large_models_with_an_index(model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    out = save_model(model, tokenizer, tmp_path / "sharded", max_shard_size="30KB")
    assert (out / "model.safetensors.index.json").is_file()
    assert len(list(out.glob("model-*.safetensors"))) > 1


class ExplodingTokenizer:
    def save_pretrained(self, path):
        (path / "partial.json").write_text("{")
        raise OSError("disk full")


def test_failure_mid_save_leaves_no_destination_and_no_residue(model_and_tokenizer, tmp_path):
    model, _ = model_and_tokenizer
    with pytest.raises(OSError, match="disk full"):
        save_model(model, ExplodingTokenizer(), tmp_path / "dest")
    assert list(tmp_path.iterdir()) == []


def test_save_model_refuses_non_empty_destination_and_source_folders(
    model_and_tokenizer, tiny_family, tmp_path
):
    model, tokenizer = model_and_tokenizer
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(ConfigurationError, match="not empty"):
        save_model(model, tokenizer, taken)
    assert (taken / "notes.txt").read_text() == "mine"
    with pytest.raises(ConfigurationError, match="inside source model folder"):
        save_model(model, tokenizer, tiny_family["m1"] / "out", protected=[tiny_family["m1"]])
    out = save_model(model, tokenizer, taken, overwrite=True)
    assert (out / "model.safetensors").is_file() and not (out / "notes.txt").exists()


def test_clean_up_deletes_only_what_the_run_created(model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    ours = save_model(model, tokenizer, tmp_path / "ours")
    users = tmp_path / "users"
    users.mkdir()
    (users / "weights.bin").write_text("precious")
    deleted = clean_up_models([ours, users])
    assert deleted == [ours.resolve()]
    assert not ours.exists() and (users / "weights.bin").read_text() == "precious"


def test_setup_gpu_if_available_on_a_cpu_machine():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the CPU fallback is what this test checks")
    assert setup_gpu_if_available("auto") == (torch.device("cpu"), torch.float32)
    with pytest.raises(ConfigurationError, match="no CUDA GPU"):
        setup_gpu_if_available("cuda")


def test_merge_techniques_reexported():
    assert "ties" in MERGE_TECHNIQUES and MERGE_TECHNIQUES["ties"].needs_base


def family_config(family, **merge) -> Configuration:
    config = Configuration(
        models=[ModelReference(n, str(family[n])) for n in ("m1", "m2", "m3")],
        base_model=ModelReference("base", str(family["base"])),
    )
    for key, value in merge.items():
        setattr(config.merge_settings, key, value)
    return config


def test_validate_merge_config_accepts_a_good_configuration(tiny_family):
    sources = validate_merge_config(
        family_config(tiny_family, merge_method="ties", parameters={"density": 0.4})
    )
    assert [s.name for s in sources] == ["m1", "m2", "m3", "base"]


@pytest.mark.parametrize(
    "merge,message",
    [
        (
            {"merge_method": "ties", "parameters": {"density": 2.0}},
            "density' = 2.0 is out of range",
        ),
        ({"merge_method": "ties", "parameters": {"densty": 0.5}}, "unknown parameter 'densty'"),
        ({"merge_method": "slerp", "parameters": {"t": -0.1}}, "'t' = -0.1 is out of range"),
    ],
)
def test_validate_merge_config_checks_settings_against_the_registry(tiny_family, merge, message):
    with pytest.raises(ConfigurationError, match=message):
        validate_merge_config(family_config(tiny_family, **merge))


def test_validate_merge_config_requires_a_base_where_needed(tiny_family):
    config = family_config(tiny_family, merge_method="task_arithmetic")
    config.base_model = None
    with pytest.raises(ConfigurationError, match="needs base_model"):
        validate_merge_config(config)


def test_validate_merge_config_refuses_techniques_that_all_need_a_missing_base(tiny_family):
    config = family_config(tiny_family, merge_method="mixed", techniques=["ties", "ps"])
    config.base_model = None
    with pytest.raises(ConfigurationError, match="techniques .* all merge task vectors"):
        validate_merge_config(config)
    config.merge_settings.techniques = ["ties", "slerp"]
    validate_merge_config(config)  # slerp needs no base


def test_unknown_search_technique_is_named_with_a_hint():
    from pydantic import ValidationError

    from agent_forge.evomerge.config import MergeSettings

    with pytest.raises(ValidationError, match="unknown technique 'tise'.*ties"):
        MergeSettings(techniques=["linear", "tise"])
    with pytest.raises(ValidationError, match="techniques is empty"):
        MergeSettings(techniques=[])


def test_validate_merge_config_reports_incompatible_models(tiny_family, tiny_tokenizer, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = family_config(tiny_family, merge_method="linear")

    wide = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tiny_tokenizer),
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    wide.save_pretrained(tmp_path / "wide")
    tiny_tokenizer.save_pretrained(tmp_path / "wide")
    config.models[2] = ModelReference("wide", str(tmp_path / "wide"))
    with pytest.raises(
        IncompatibleModelsError,
        match="m1 and wide cannot be merged weight-by-weight: config hidden_size is 32 vs 48",
    ):
        validate_merge_config(config)
