"""Benchmarks: merge throughput and memory, in-memory materialisation, evaluation speed.

Run ``python -m agent_forge.evomerge.benchmarks`` (``--help`` for options). Every figure is
measured side by side in one run and printed with its ratio to a floor measured on the same
machine at the same time (these machines are noisy; compare ratios, not seconds):

- ``merge``: a streaming three-model TIES merge (plus base) of generated Llama-shaped models
  (~100M parameters each by default, ``--size 1b`` for ~1B): wall time, peak RSS, MB/s (four
  inputs read and one output written), against reading the same files into a reused buffer
  and, with ``--mergekit``, against mergekit on the same files (``--rounds`` alternates them).
- ``materialize``: writing a candidate into a resident model, against copying the same bytes.
- ``evaluate``: seconds per candidate on the embedded default (fitness subset and test split).
- ``gpu``: each technique on a 7B-sized matrix against a device copy (needs CUDA).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SIZES = {  # hidden, intermediate, layers, vocab → parameters
    "tiny": (256, 704, 4, 8000),  # ~7M, for a quick look
    "100m": (768, 2048, 10, 16000),  # ~95M
    "1b": (2048, 5632, 16, 32000),  # ~1.1B
}

_PEAK_RSS = """
def peak_rss():
    # VmHWM: this process's own high-water mark. ru_maxrss also counts the parent's memory at
    # the spawn (the kernel carries the pre-exec address space's peak over), which inflated it
    # by the models a benchmark had just generated.
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
"""

CHILD_MERGE = """
import json, resource, sys, time
import torch
{peak_rss}torch.set_num_threads({threads})
from agent_forge.evomerge.sources import open_source
from agent_forge.evomerge.merger import AdvancedModelMerger
from agent_forge.evomerge.recipe import Merge, Source
root, out = sys.argv[1], sys.argv[2]
start = time.perf_counter()
sources = {{n: open_source(n, f"{{root}}/{{n}}") for n in ("base", "m1", "m2", "m3")}}
merger = AdvancedModelMerger(sources=sources, base="base")
recipe = Merge(
    "ties", [Source("m1"), Source("m2"), Source("m3")], {{"density": 0.5}}, Source("base")
)
merger.merge(recipe, out)
print(json.dumps({{"seconds": time.perf_counter() - start, "peak_rss": peak_rss()}}))
"""

CHILD_MERGEKIT = """
import json, resource, sys, time, yaml
import torch
{peak_rss}torch.set_num_threads({threads})
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
root, out = sys.argv[1], sys.argv[2]
config = {{"merge_method": "ties", "base_model": f"{{root}}/base", "dtype": "float32",
          "models": [{{"model": f"{{root}}/m{{i}}",
                      "parameters": {{"weight": 1.0, "density": 0.5}}}} for i in (1, 2, 3)]}}
start = time.perf_counter()
run_merge(MergeConfiguration.model_validate(config), out,
          MergeOptions(copy_tokenizer=False, quiet=True))
print(json.dumps({{"seconds": time.perf_counter() - start, "peak_rss": peak_rss()}}))
"""


def make_models(root: Path, size: str, seed: int = 0) -> int:
    """Write a base and three fine-tune-like variants (base + small noise) as HF folders; returns
    bytes/model."""
    import torch
    from safetensors.torch import save_file

    hidden, inter, layers, vocab = SIZES[size]
    shapes = {
        "model.embed_tokens.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
        "lm_head.weight": (vocab, hidden),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (hidden, hidden),
                p + "self_attn.k_proj.weight": (hidden, hidden),
                p + "self_attn.v_proj.weight": (hidden, hidden),
                p + "self_attn.o_proj.weight": (hidden, hidden),
                p + "mlp.gate_proj.weight": (inter, hidden),
                p + "mlp.up_proj.weight": (inter, hidden),
                p + "mlp.down_proj.weight": (hidden, inter),
                p + "input_layernorm.weight": (hidden,),
                p + "post_attention_layernorm.weight": (hidden,),
            }
        )
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": hidden // 64,
        "num_key_value_heads": hidden // 64,
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "hidden_act": "silu",
    }
    generator = torch.Generator().manual_seed(seed)
    base = {name: torch.randn(shape, generator=generator) * 0.02 for name, shape in shapes.items()}
    for name, noise in (("base", 0.0), ("m1", 0.002), ("m2", 0.002), ("m3", 0.002)):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {
            k: (v + torch.randn(v.shape, generator=generator) * noise) if noise else v
            for k, v in base.items()
        }
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(config))
    return sum(t.numel() * 4 for t in base.values())


def _child(code: str, *args: str) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True
    )
    if result.returncode != 0:
        raise RuntimeError(
            result.stderr.strip().splitlines()[-1] if result.stderr else "child failed"
        )
    return json.loads(result.stdout.strip().splitlines()[-1])


def _read_floor(root: Path) -> float:
    """Seconds to read the four source files into one reused buffer (from the page cache)."""
    buffer = memoryview(bytearray(64 * 2**20))
    start = time.perf_counter()
    for name in ("base", "m1", "m2", "m3"):
        with open(root / name / "model.safetensors", "rb", buffering=0) as handle:
            while handle.readinto(buffer):
                pass
    return time.perf_counter() - start


def bench_merge(
    size: str, work: Path, threads: int, mergekit: bool, rounds: int = 1
) -> dict[str, Any]:
    """Our streaming TIES merge and, with ``mergekit``, mergekit's, alternating for ``rounds``.

    Each contender's figure is its best round (medians too); ratios compare the bests.
    """
    root = work / f"models-{size}"
    if not (root / "m3" / "model.safetensors").is_file():
        make_models(root, size)
    model_bytes = (root / "m1" / "model.safetensors").stat().st_size
    _read_floor(root)  # warm the page cache: every contender reads from memory
    floor = min(_read_floor(root) for _ in range(3))
    children = {"evomerge": CHILD_MERGE} | ({"mergekit": CHILD_MERGEKIT} if mergekit else {})
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in children}
    result: dict[str, Any] = {"size": size, "model_mb": model_bytes / 1e6, "read_floor_s": floor}
    for _ in range(rounds):
        for name, code in children.items():
            out = work / f"out-{name}"
            shutil.rmtree(out, ignore_errors=True)
            try:
                runs[name].append(
                    _child(code.format(threads=threads, peak_rss=_PEAK_RSS), str(root), str(out))
                )
            except (RuntimeError, json.JSONDecodeError) as exc:
                result[f"{name}_error"] = str(exc)
            shutil.rmtree(out, ignore_errors=True)
    for name, measured in runs.items():
        if measured:
            seconds = [m["seconds"] for m in measured]
            result[name] = {
                "seconds": min(seconds),
                "median_seconds": _median(seconds),
                "peak_rss": _median([m["peak_rss"] for m in measured]),
                "mb_per_s": 5 * model_bytes / 1e6 / min(seconds),
            }
    if "evomerge" in result:
        result["evomerge_to_read_floor"] = result["evomerge"]["seconds"] / floor
    if "evomerge" in result and "mergekit" in result:
        result["time_ratio"] = result["evomerge"]["seconds"] / result["mergekit"]["seconds"]
        result["rss_ratio"] = result["evomerge"]["peak_rss"] / result["mergekit"]["peak_rss"]
    return result


def bench_materialize(
    rounds: int = 30, models: str = "default", workdir: Path | None = None
) -> dict[str, Any]:
    """Resident materialisation, eager and fused, against copying the same bytes.

    ``models``: ``default`` (the embedded default) or a size of generated models (``100m``...,
    written under ``workdir``). The contenders run interleaved, one call each per round, so a
    busy machine slows them alike; each figure is the best round (the median is given too).
    Besides one fixed recipe per technique, three fused contenders change every call as a
    search does: TIES and DARE-TIES with new weights and densities, and DARE-TIES with a new
    seed (its draws are made afresh). ``fused_compiles`` counts the kernels compiled during
    the timed rounds (0: new values reuse the compiled kernels).
    """
    import numpy as np
    import torch

    from .config import create_default_config
    from .merger import AdvancedModelMerger
    from .recipe import Merge, Source
    from .sources import open_source

    if models == "default":
        config = create_default_config()
        merger = AdvancedModelMerger(_with_fused(config, "on"), resident=True)
        names = [m.name for m in config.models]
    else:
        assert workdir is not None
        make_models(workdir, models)
        sources = {n: open_source(n, str(workdir / n)) for n in ("base", "m1", "m2", "m3")}
        merger = AdvancedModelMerger(
            sources=sources, base="base", resident=True, fused_kernels="on"
        )
        names = ["m1", "m2", "m3"]
    kernels = merger.graph.fused

    def materialize(recipe: Any, fused: bool) -> None:
        merger.graph.fused = kernels if fused else None
        merger.materialize(recipe)

    inputs, base = [Source(n) for n in names], Source("base")
    recipes = {
        "linear": Merge("linear", inputs, {}),
        "task_arithmetic": Merge("task_arithmetic", inputs, {"lambda": 0.5}, base),
        "ties": Merge("ties", inputs, {"density": 0.5}, base),
        "dare_ties": Merge("dare_ties", inputs, {"density": 0.5}, base, seed=1),
    }
    model = merger.materialize(recipes["linear"])
    params = list(model.parameters())
    copies = [p.detach().clone() for p in params]

    def copy_floor() -> None:
        with torch.no_grad():
            for target, source in zip(params, copies, strict=True):
                target.copy_(source)

    rng = np.random.default_rng(0)
    seeds = iter(range(2, 1 << 62))

    def new_values() -> dict[str, Any]:
        weight = rng.uniform(0.2, 1.0, len(inputs)).tolist()
        return {
            "weight": weight,
            "density": rng.uniform(0.2, 0.8, len(inputs)).tolist(),
        }

    searching = {
        "ties (fused, new values)": lambda: Merge("ties", inputs, new_values(), base),
        "dare_ties (fused, new values)": lambda: Merge(
            "dare_ties", inputs, new_values(), base, seed=1
        ),
        "dare_ties (fused, new seed)": lambda: Merge(
            "dare_ties", inputs, {"density": 0.5}, base, seed=next(seeds)
        ),
    }
    compile_seconds = {}
    for name, recipe in recipes.items():  # the one-off compile of each fused variant
        start = time.perf_counter()
        materialize(recipe, fused=True)
        compile_seconds[name] = time.perf_counter() - start
    for _ in range(3):  # compile the variants' dynamic versions (shapes and values)
        for make in searching.values():
            materialize(make(), fused=True)
    contenders: dict[str, Any] = {"copy": copy_floor}
    contenders.update(
        {name: (lambda r=recipe: materialize(r, False)) for name, recipe in recipes.items()}
    )
    contenders.update(
        {
            f"{name} (fused)": (lambda r=recipe: materialize(r, True))
            for name, recipe in recipes.items()
        }
    )
    contenders.update(
        {name: (lambda m=make: materialize(m(), True)) for name, make in searching.items()}
    )
    compiled = kernels.compiles if kernels else 0
    times = _interleaved(contenders, rounds)
    floor = min(times["copy"])
    out: dict[str, Any] = {
        "copy_floor_ms": floor * 1e3,
        "copy_floor_median_ms": _median(times["copy"]) * 1e3,
        "model_mb": sum(p.numel() * 4 for p in params) / 1e6,
        "fused_compile_s": compile_seconds,
        "fused_compiles": (kernels.compiles - compiled) if kernels else None,
        "fused_still_on": bool(kernels and kernels.enabled),
    }
    for name in [n for n in contenders if n != "copy"]:
        best = min(times[name])
        out[name] = {
            "ms": best * 1e3,
            "median_ms": _median(times[name]) * 1e3,
            "ratio_to_copy": best / floor,
            "median_ratio_to_copy": _median(times[name]) / _median(times["copy"]),
        }
    return out


def _with_fused(config: Any, setting: str) -> Any:
    merge = config.merge_settings.model_copy(update={"fused_kernels": setting})
    return config.model_copy(update={"merge_settings": merge})


def _interleaved(contenders: dict[str, Any], rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each contender, one call each per round (after one warm-up round)."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for round_ in range(rounds + 1):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            if round_:
                times[name].append(time.perf_counter() - start)
    return times


def _median(values: Sequence[float]) -> float:
    return sorted(values)[len(values) // 2]


def bench_evaluate(repeats: int = 3) -> dict[str, Any]:
    from .config import create_default_config
    from .executors import CandidateScorer
    from .recipe import Merge, Source

    config = create_default_config()
    scorer = CandidateScorer(config, threads=1)
    recipe = Merge(
        "ties", [Source(m.name) for m in config.models], {"density": 0.5}, Source("base")
    )
    scorer.score(recipe)
    fitness = min(scorer.score(recipe).eval_seconds for _ in range(repeats))
    test = scorer.score(recipe, split="test").eval_seconds
    sizes = {t.name: len(t.examples("fitness")) for t in scorer.evaluator.tasks}
    return {"fitness_seconds": fitness, "test_seconds": test, "fitness_examples": sizes}


def bench_gpu(repeats: int = 10) -> dict[str, Any]:
    """Each technique on one 7B-sized matrix (14336 × 4096, bf16 inputs), three models plus a
    base."""
    import torch

    from .techniques import MERGE_TECHNIQUES, apply_technique, canonical_params

    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    shape = (14336, 4096)
    gen = torch.Generator(device="cuda").manual_seed(0)
    base = torch.randn(shape, device="cuda", generator=gen, dtype=torch.bfloat16)
    models = [
        base + 0.01 * torch.randn(shape, device="cuda", generator=gen, dtype=torch.bfloat16)
        for _ in range(3)
    ]

    def cuda_time(fn: Any) -> float:
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(repeats):
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[len(times) // 2]

    scratch = torch.empty_like(base)
    copy_ms = cuda_time(lambda: scratch.copy_(base))
    out: dict[str, Any] = {"copy_ms": copy_ms, "device": torch.cuda.get_device_name(0)}
    for name, tech in MERGE_TECHNIQUES.items():
        inputs = models[: tech.max_inputs or 3]
        params = canonical_params(tech, {}, len(inputs))
        generator = torch.Generator().manual_seed(1)  # on the CPU, as recipes draw

        def run(
            tech: Any = tech, inputs: Any = inputs, params: Any = params, generator: Any = generator
        ) -> Any:
            stack = torch.stack([t.float() for t in inputs])
            if tech.needs_base:
                return (
                    base.float()
                    + apply_technique(tech, stack - base.float(), params, None, generator)
                ).to(base.dtype)
            return apply_technique(tech, stack, params, None, generator).to(base.dtype)

        ms = cuda_time(run)
        out[name] = {"ms": ms, "ratio_to_copy": ms / copy_ms}
    deltas = torch.stack([m.float() - base.float() for m in models])
    result = torch.empty(shape, device="cuda", dtype=torch.float32)
    fp32_copy_ms = cuda_time(lambda: result.copy_(deltas[0]))
    out["copy_fp32_ms"] = fp32_copy_ms
    for name, run in fused_contenders(base.float(), deltas, result).items():
        ms = cuda_time(run)
        out[f"{name} (fused)"] = {"ms": ms, "ratio_to_fp32_copy": ms / fp32_copy_ms}
    return out


def fused_contenders(base: Any, deltas: Any, out: Any) -> dict[str, Any]:
    """Task arithmetic, TIES and DARE-TIES as the fused kernel runs them (:mod:`.fused`) on
    one large tensor: ``deltas`` ``(M, *shape)`` against ``base``, into ``out`` (float32, any
    device). TIES takes its thresholds from the magnitude order and runs on rows, as for a
    resident tensor.
    """
    import torch

    from .fused import TrimRows, magnitude_order, merge_kernel, plan_for
    from .sparsify import draw_words, word_rows

    kernel = torch.compile(merge_kernel)
    flat = deltas.reshape(deltas.shape[0], -1)
    size = flat.shape[1]
    rows = TrimRows.of([size])
    orders = torch.stack([magnitude_order(row) for row in flat]).int()
    count = flat.shape[0]
    draws = draw_words(  # as the resident pool keeps a seed's draws
        torch.empty(word_rows(count), size, dtype=torch.int32, device=flat.device),
        [(0, size)],
        [torch.Generator(flat.device).manual_seed(0)],
    )
    common = {"weight": [1.0] * count, "lam": 1.0}
    density = [0.5] * count
    plans = {
        "task_arithmetic": plan_for("task_arithmetic", {**common, "normalize": False}),
        "ties": plan_for(
            "ties",
            {**common, "density": density, "normalize": True},
            rows.cuts(orders, flat, density),
        ),
        "dare_ties": plan_for(
            "dare_ties",
            {**common, "density": density, "normalize": True, "rescale": "paper"},
        ),
    }

    def runner(plan: Any) -> Any:
        if plan.cuts is None:
            operands = (flat, base.reshape(-1), draws, out.view(-1))
        else:
            shape = (-1, rows.width)
            operands = (flat.unflatten(1, shape), base.view(shape), None, out.view(shape))
        return lambda: kernel(*operands, *plan.arguments())

    return {name: runner(plan) for name, plan in plans.items() if plan is not None}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m agent_forge.evomerge.benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--what",
        default="merge,materialize,evaluate",
        help="comma-separated: merge, materialize, evaluate, gpu (default: all but gpu)",
    )
    parser.add_argument(
        "--size", choices=sorted(SIZES), default="100m", help="model size for the merge benchmark"
    )
    parser.add_argument(
        "--mergekit",
        action="store_true",
        help="also time mergekit on the same files (needs mergekit)",
    )
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="torch threads for the merges"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="merge benchmark: alternate the contenders this many times, keep each one's best",
    )
    parser.add_argument(
        "--materialize-models",
        choices=["default", *sorted(SIZES)],
        default="default",
        help="models for the materialize benchmark: the embedded default or generated ones",
    )
    parser.add_argument("--workdir", help="where generated models go (default: a temporary folder)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="evomerge-bench-"))
    results: dict[str, Any] = {}
    for what in args.what.split(","):
        if what == "merge":
            results["merge"] = bench_merge(
                args.size, work, args.threads, args.mergekit, args.rounds
            )
        elif what == "materialize":
            if args.materialize_models == "default":
                results["materialize"] = bench_materialize()
            else:
                results["materialize"] = bench_materialize(
                    args.rounds, args.materialize_models, work / "materialize"
                )
        elif what == "evaluate":
            results["evaluate"] = bench_evaluate()
        elif what == "gpu":
            results["gpu"] = bench_gpu()
        else:
            parser.error(f"unknown benchmark {what!r}")
        print(json.dumps({what: results[what]}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
