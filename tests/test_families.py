"""Model families other than Llama, end to end through the CLI with tiny random models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import save_perturbed_family

QUICK = ["--generations", "1", "--population", "4", "--fitness-sample-size", "8", "--quiet"]


def save_gpt2_family(root: Path, tokenizer) -> dict[str, Path]:
    """A tiny GPT-2 (``n_layer``, ``h.N`` blocks, Conv1D weights, tied head) and three seeded
    perturbations of it."""
    from transformers import GPT2Config

    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=64,
        n_embd=32,
        n_layer=3,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
    )
    return save_perturbed_family(root, tokenizer, config)


def test_gpt2_runs_ps_dfs_and_reloads(tmp_path, tiny_tokenizer):
    """GPT-2 names its layer count ``n_layer`` (``num_hidden_layers`` is only an alias): the
    search reads it (3 layers, 5 PS groups), and the best model reloads with transformers."""
    from transformers import AutoModelForCausalLM

    folders = save_gpt2_family(tmp_path / "models", tiny_tokenizer)
    out = tmp_path / "run"
    models = [f"--model{i}={folders[f'm{i}']}" for i in (1, 2, 3)]
    result = subprocess.run(
        [sys.executable, "-m", "agent_forge.evomerge.cli", "--run", "--method", "ps_dfs",
         *models, "--base", str(folders["base"]), *QUICK, "--output", str(out)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (out / "evaluations.jsonl").read_text().splitlines()]
    ps = [r["recipe"] for r in records if r["stage"] == "ps"]
    per_layer = [w for r in ps for w in r["params"].get("weight", []) if isinstance(w, list)]
    assert per_layer and all(len(w) == 3 + 2 for w in per_layer)
    assert any(r["stage"] == "dfs" for r in records)
    best = AutoModelForCausalLM.from_pretrained(out / "best")
    saved = json.loads((out / "best" / "config.json").read_text())
    assert best.config.n_layer == saved["n_layer"] == len(best.transformer.h)
    ids = torch.tensor([[2, 3, 4, 5]])
    assert torch.isfinite(best(ids).logits).all()


@pytest.mark.parametrize("key", ["n_layer", "num_layers"])
def test_layer_count_is_read_from_the_key_the_config_uses(key):
    from agent_forge.evomerge.exceptions import ConfigurationError
    from agent_forge.evomerge.layout import source_layers

    assert source_layers({key: 7, "vocab_size": 10}) == 7
    with pytest.raises(ConfigurationError, match="no layer count"):
        source_layers({"vocab_size": 10})
