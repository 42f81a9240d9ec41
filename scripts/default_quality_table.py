"""Print the embedded default's quality table: parents and simple merges, per skill, on a split.

Rows: the base, each specialist, the plain average of the specialists, task arithmetic
(θ_base + λ·Σδᵢ) at λ = 1 and 0.5, TIES (density 0.5, λ = 1) and, with ``--search N``, the best
of N candidates of a small (1+1) evolution strategy over task-arithmetic weights per model and
per layer group (embeddings, each layer, final norm + head), chosen on the fitness split.
Merges use the package's own techniques (``agent_forge.evomerge.techniques``).

Run::

    python scripts/default_quality_table.py                 # test split, no search
    python scripts/default_quality_table.py --search 150    # plus the searched merge
"""

from __future__ import annotations

import argparse
import random
import re
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from agent_forge.evomerge.config import load_default_manifest
from agent_forge.evomerge.evaluation import TaskEvaluator, configure_torch_threads, load_tasks
from agent_forge.evomerge.techniques import linear, task_arithmetic, ties

StateDict = dict[str, torch.Tensor]


def _merge(
    base: StateDict,
    models: list[StateDict],
    fn: Callable[..., torch.Tensor],
    deltas: bool = True,
    **params: object,
) -> StateDict:
    """Apply a technique tensor by tensor (to task vectors when ``deltas``)."""
    out = {}
    for name, b in base.items():
        stack = torch.stack([m[name] - b if deltas else m[name] for m in models])
        merged = fn(stack, **params)
        out[name] = b + merged if deltas else merged
    return out


def _layer_group(name: str, layers: int) -> int:
    """0: embeddings, 1..layers: each decoder layer, layers + 1: final norm and head."""
    found = re.search(r"layers\.(\d+)\.", name)
    if found:
        return 1 + int(found.group(1))
    return 0 if "embed" in name else layers + 1


def _grouped_ta(
    base: StateDict, models: list[StateDict], weights: list[list[float]], layers: int
) -> StateDict:
    """θ_base + Σᵢ w[i][group(tensor)]·δᵢ."""
    return {
        n: b
        + sum(w[_layer_group(n, layers)] * (m[n] - b) for w, m in zip(weights, models, strict=True))
        for n, b in base.items()
    }


def _search(
    score: Callable[[StateDict], float],
    base: StateDict,
    models: list[StateDict],
    layers: int,
    budget: int,
    seed: int = 0,
) -> list[list[float]]:
    """(1+1)-ES over per-model, per-layer-group weights, from the best uniform λ."""
    rng = random.Random(seed)
    groups = layers + 2
    best_w, best = [[0.0] * groups for _ in models], -1.0
    for lam in (0.2, 0.3, 0.4, 0.5, 0.7):
        w = [[lam] * groups for _ in models]
        if (f := score(_grouped_ta(base, models, w, layers))) > best:
            best_w, best = w, f
    for _ in range(budget):
        w = [[min(1.5, max(0.0, x + rng.gauss(0, 0.15))) for x in row] for row in best_w]
        if (f := score(_grouped_ta(base, models, w, layers))) > best:
            best_w, best = w, f
    return best_w


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", default="test")
    parser.add_argument("--search", type=int, default=0, help="ES steps on the fitness split")
    args = parser.parse_args()
    configure_torch_threads()
    manifest = load_default_manifest()
    names = [m["name"] for m in manifest["models"]]
    base_path = Path(manifest["base"]["path"])
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    model = LlamaForCausalLM.from_pretrained(base_path).eval()
    layers = model.config.num_hidden_layers
    base = {k: v.clone() for k, v in model.state_dict().items()}
    parents = [LlamaForCausalLM.from_pretrained(m["path"]).state_dict() for m in manifest["models"]]
    tasks = load_tasks(manifest["tasks"])
    evaluator = TaskEvaluator(tasks)
    skills = [t.name for t in tasks if t.weight > 0]

    def evaluate(state: StateDict, split: str):
        model.load_state_dict(state)
        return evaluator.evaluate(model, tokenizer, split)

    ones = [1.0] * len(parents)
    rows: dict[str, StateDict] = {"base": base, **dict(zip(names, parents, strict=True))}
    rows["average"] = _merge(base, parents, linear, deltas=False, weight=ones, normalize=True)
    for lam in (1.0, 0.5):
        rows[f"task arithmetic λ={lam}"] = _merge(
            base, parents, task_arithmetic, weight=ones, lam=lam, normalize=False
        )
    rows["TIES d=0.5 λ=1"] = _merge(
        base, parents, ties, weight=ones, density=[0.5] * 3, lam=1.0, normalize=True
    )
    if args.search:
        start = time.perf_counter()
        weights = _search(
            lambda s: evaluate(s, "fitness").aggregate, base, parents, layers, args.search
        )
        print(
            f"search: {args.search} steps in {time.perf_counter() - start:.0f}s; weights "
            f"(model x group): {[[round(x, 2) for x in row] for row in weights]}"
        )
        rows["searched (per layer group)"] = _grouped_ta(base, parents, weights, layers)
    print(f"| model ({args.split} split) | " + " | ".join(skills) + " | mean |")
    print("|---" * (len(skills) + 2) + "|")
    for label, state in rows.items():
        scores = evaluate(state, args.split)
        cells = " | ".join(f"{100 * scores.per_task[s]:.1f}" for s in skills)
        print(f"| {label} | {cells} | {100 * scores.aggregate:.1f} |")


if __name__ == "__main__":
    main()
