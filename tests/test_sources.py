"""Model sources: folders, hub ids offline, pickle refusal, lazy reading, compatibility messages."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from agent_forge.evomerge.exceptions import IncompatibleModelsError, ModelLoadError
from agent_forge.evomerge.sources import check_compatible, compatibility_problems, open_source


def test_folder_opens_with_names_shapes_and_config(tiny_family):
    source = open_source("m1", str(tiny_family["m1"]))
    assert source.model_type == "llama" and source.config["num_hidden_layers"] == 2
    assert "model.layers.1.mlp.down_proj.weight" in source.tensor_names
    assert source.info("model.embed_tokens.weight").shape == (300, 32)
    assert source.info("model.embed_tokens.weight").dtype == "float32"
    tensor = source.get_tensor("model.norm.weight")
    assert tensor.shape == (32,)


def _run_isolated(code: str, env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(env_extra)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


OPEN_HUB_ID = """
    import time
    from agent_forge.evomerge.sources import open_source
    from agent_forge.evomerge.exceptions import ModelLoadError
    start = time.perf_counter()
    try:
        open_source("bert", "bert-base-uncased")
    except ModelLoadError as exc:
        print(f"{time.perf_counter() - start:.2f}|{exc}")
"""


def test_uncached_hub_id_offline_fails_fast_with_how_to_fix(tmp_path):
    result = _run_isolated(OPEN_HUB_ID, {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    seconds, message = result.stdout.strip().split("|", 1)
    assert float(seconds) < 5
    assert "bert-base-uncased is not available offline" in message
    assert "huggingface-cli download bert-base-uncased" in message and "local folder" in message


def test_uncached_hub_id_with_unreachable_hub_fails_fast(tmp_path):
    # a hub endpoint that refuses connections stands for "no network"
    result = _run_isolated(
        OPEN_HUB_ID, {"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9"}
    )
    seconds, message = result.stdout.strip().split("|", 1)
    assert float(seconds) < 15
    assert "not available offline" in message and "hub is unreachable" in message


def test_cached_hub_id_resolves_from_the_local_cache(tiny_family, tmp_path):
    """A model in the Hugging Face cache layout opens by its id with no network."""
    cache = tmp_path / "hub"
    snapshot = cache / "models--org--tiny" / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_family["m1"], snapshot)
    (cache / "models--org--tiny" / "refs").mkdir()
    (cache / "models--org--tiny" / "refs" / "main").write_text("a" * 40)
    code = """
        from agent_forge.evomerge.sources import open_source
        s = open_source("t", "org/tiny")
        print(s.folder, len(s.tensor_names))
    """
    result = _run_isolated(code, {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    folder, count = result.stdout.split()
    assert Path(folder) == snapshot and int(count) == 21


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        open_source("x", str(tmp_path / "nowhere"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        open_source("x", "./relative/nowhere")


def test_pickled_bin_only_folder_is_refused_unless_allowed(tiny_family, tmp_path):
    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(tiny_family["m1"] / "config.json", folder)
    torch.save(load_file(tiny_family["m1"] / "model.safetensors"), folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="only pickled weights.*allow_pickle"):
        open_source("p", str(folder))
    source = open_source("p", str(folder), allow_pickle=True)
    assert source.weight_format == "pickle" and len(source.tensor_names) == 21


def test_remote_code_is_refused_unless_trusted(tiny_family, tmp_path):
    folder = tmp_path / "custom"
    shutil.copytree(tiny_family["m1"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.Custom"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="trust_remote_code"):
        open_source("c", str(folder))
    assert open_source("c", str(folder), trust_remote_code=True).config["auto_map"]


# -- compatibility ---------------------------------------------------------------------------------


def test_compatible_family_has_no_problems(tiny_sources):
    assert compatibility_problems(list(tiny_sources.values())) == []


def test_bert_and_roberta_report_architecture_and_embedding_shapes(tmp_path):
    from transformers import BertConfig, BertModel, RobertaConfig, RobertaModel

    small = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    BertModel(BertConfig(vocab_size=100, **small)).save_pretrained(tmp_path / "bert-base-uncased")
    RobertaModel(RobertaConfig(vocab_size=120, **small)).save_pretrained(tmp_path / "roberta-base")
    sources = [
        open_source("bert-base-uncased", str(tmp_path / "bert-base-uncased")),
        open_source("roberta-base", str(tmp_path / "roberta-base")),
    ]
    with pytest.raises(IncompatibleModelsError) as info:
        check_compatible(sources)
    message = str(info.value)
    assert "bert-base-uncased and roberta-base cannot be merged weight-by-weight" in message
    assert "config model_type is 'bert' vs 'roberta'" in message
    assert "embeddings.word_embeddings.weight is [100, 16] vs [120, 16]" in message


def _variant(family, tmp_path, name, edit_config=None, edit_tensors=None, edit_tokenizer=None):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / name
    shutil.copytree(family["m1"], folder)
    if edit_config:
        config = json.loads((folder / "config.json").read_text())
        edit_config(config)
        (folder / "config.json").write_text(json.dumps(config))
    if edit_tensors:
        tensors = load_file(folder / "model.safetensors")
        edit_tensors(tensors)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    if edit_tokenizer:
        data = json.loads((folder / "tokenizer.json").read_text())
        edit_tokenizer(data)
        (folder / "tokenizer.json").write_text(json.dumps(data))
    return open_source(name, str(folder))


def test_every_mismatch_kind_is_reported_precisely(tiny_family, tiny_sources, tmp_path):
    m1 = tiny_sources["m1"]

    def drop(t):
        del t["model.layers.1.mlp.up_proj.weight"]

    def reshape(t):
        t["model.norm.weight"] = torch.ones(33)

    def swap(data):
        vocab = data["model"]["vocab"]
        a, b = sorted(vocab)[10:12]
        vocab[a], vocab[b] = vocab[b], vocab[a]

    def grow(data):
        data["model"]["vocab"]["zzzz-new"] = len(data["model"]["vocab"]) + 5

    cases = {
        "arch": (
            _variant(
                tiny_family, tmp_path, "arch", edit_config=lambda c: c.update(model_type="mistral")
            ),
            "config model_type is 'llama' vs 'mistral'",
        ),
        "missing": (
            _variant(tiny_family, tmp_path, "missing", edit_tensors=drop),
            "1 tensors only in m1 (e.g. model.layers.1.mlp.up_proj.weight)",
        ),
        "shape": (
            _variant(tiny_family, tmp_path, "shape", edit_tensors=reshape),
            "model.norm.weight is [32] vs [33]",
        ),
        "vocab": (
            _variant(tiny_family, tmp_path, "vocab", edit_tokenizer=swap),
            "tokenizer vocabularies differ (2 tokens",
        ),
        "size": (_variant(tiny_family, tmp_path, "size", edit_tokenizer=grow), "differ in size"),
    }
    for name, (other, expected) in cases.items():
        problems = compatibility_problems([m1, other])
        assert any(expected in p for p in problems), (name, problems)
        assert all(
            p.startswith(f"m1 and {name} cannot be merged weight-by-weight") for p in problems
        )


def test_different_layer_counts_are_fine_for_layer_stacking_only(
    tiny_family, tiny_tokenizer, tmp_path
):
    from conftest import save_tiny_llama

    deep = open_source(
        "deep", str(save_tiny_llama(tmp_path / "deep", tiny_tokenizer, seed=4, layers=3))
    )
    m1 = open_source("m1", str(tiny_family["m1"]))
    assert any("only in deep" in p for p in compatibility_problems([m1, deep]))
    assert compatibility_problems([m1, deep], layer_stacking=True) == []


def test_dtype_difference_is_a_warning_not_an_error(tiny_family, tmp_path, caplog):
    def to_bf16(t):
        for k in t:
            t[k] = t[k].to(torch.bfloat16)

    half = _variant(tiny_family, tmp_path, "half", edit_tensors=to_bf16)
    with caplog.at_level("WARNING"):
        check_compatible([open_source("m1", str(tiny_family["m1"])), half])
    assert "is float32 vs bfloat16" in caplog.text


LAZY = """
    import sys, psutil
    from agent_forge.evomerge.sources import open_source
    process = psutil.Process()
    before = process.memory_info().rss
    sources = [open_source(f"s{i}", path) for i, path in enumerate(sys.argv[1:])]
    for s in sources:
        for name in s.tensor_names:
            s.info(name)
    one = sources[0].get_tensor(sources[0].tensor_names[0])
    after = process.memory_info().rss
    print(after - before)
"""


def test_opening_three_sources_does_not_read_their_weights(tmp_path):
    from safetensors.torch import save_file

    paths = []
    total = 0
    for i in range(3):
        folder = tmp_path / f"big{i}"
        folder.mkdir()
        tensors = {
            f"model.layers.{k}.mlp.up_proj.weight": torch.full((1024, 4096), float(i))
            for k in range(16)
        }
        save_file(tensors, folder / "model.safetensors")
        total += sum(t.numel() * 4 for t in tensors.values())
        (folder / "config.json").write_text(
            json.dumps({"model_type": "llama", "num_hidden_layers": 16})
        )
        paths.append(str(folder))
        del tensors
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(LAZY), *paths],
        capture_output=True,
        text=True,
        check=True,
    )
    grown = int(result.stdout.strip())
    assert total > 700 * 2**20
    assert grown < 0.05 * total, (
        f"RSS grew {grown / 2**20:.0f} MiB for {total / 2**20:.0f} MiB of sources"
    )
    assert time.perf_counter() - start < 60
