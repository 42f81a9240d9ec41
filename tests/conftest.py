"""Shared fixtures: tiny real Llama models (saved with save_pretrained) and a tiny BPE tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]


def train_tiny_tokenizer(vocab_size: int = 300):
    """A byte-level BPE tokenizer (GPT-2 style) trained on a few lines, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    text = [
        "the quick brown fox jumps over the lazy dog",
        "12+34=46",
        "abc>cba",
        "hello world",
    ] * 50
    tok.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        bos_token="<|endoftext|>",
    )


def tiny_llama_config(vocab_size: int, layers: int = 2, tie: bool = False):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
    )


def save_tiny_llama(
    path: Path,
    tokenizer,
    *,
    seed: int,
    layers: int = 2,
    tie: bool = False,
    from_model=None,
    noise: float = 0.0,
    dtype=torch.float32,
) -> Path:
    """Save a tiny Llama: fresh weights from ``seed``, or ``from_model`` plus seeded noise (a
    "fine-tune").

    The noise has a part shared by every fine-tune (as real fine-tunes of one base move in
    partly the same direction) and a part of its own.
    """
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    if from_model is None:
        model = LlamaForCausalLM(tiny_llama_config(len(tokenizer), layers, tie))
    else:
        model = LlamaForCausalLM(from_model.config)
        model.load_state_dict(from_model.state_dict())
        own = torch.Generator().manual_seed(seed)
        shared = torch.Generator().manual_seed(1234)
        with torch.no_grad():
            for param in model.parameters():
                common = torch.randn(param.shape, generator=shared)
                param.add_((common + torch.randn(param.shape, generator=own)) * noise)
    model = model.to(dtype)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_perturbed_family(root: Path, tokenizer, config, names=("m1", "m2", "m3")) -> dict:
    """A base of any architecture (random weights from ``config``, seed 0) and seeded
    perturbations of it (N(0, 0.02²) per entry), saved as Hugging Face folders."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config)
    folders = {}
    for index, name in enumerate(("base", *names)):
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(base.state_dict())
        if index > 0:
            noise = torch.Generator().manual_seed(index)
            with torch.no_grad():
                for param in model.parameters():
                    param.add_(torch.randn(param.shape, generator=noise) * 0.02)
        folders[name] = root / name
        model.save_pretrained(folders[name])
        tokenizer.save_pretrained(folders[name])
    return folders


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return train_tiny_tokenizer()


def save_tiny_family(
    root: Path, tokenizer, names: list[str], *, seed: int, tie: bool = False
) -> dict[str, Path]:
    """A base and "fine-tunes" of it (base + different seeded noise), two layers each."""
    from transformers import LlamaForCausalLM

    base_dir = save_tiny_llama(root / "base", tokenizer, seed=seed, tie=tie)
    base = LlamaForCausalLM.from_pretrained(base_dir)
    family = {"base": base_dir}
    for i, name in enumerate(names, start=seed + 1):
        family[name] = save_tiny_llama(root / name, tokenizer, seed=i, from_model=base, noise=0.02)
    return family


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory, tiny_tokenizer) -> dict[str, Path]:
    """A base and three "fine-tunes" of it, two layers each."""
    root = tmp_path_factory.mktemp("tiny_family")
    return save_tiny_family(root, tiny_tokenizer, ["m1", "m2", "m3"], seed=0)


@pytest.fixture(scope="session")
def tiny_sources(tiny_family):
    """The tiny family opened as sources (lazily)."""
    from agent_forge.evomerge.sources import open_source

    return {name: open_source(name, str(path)) for name, path in tiny_family.items()}
