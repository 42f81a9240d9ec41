"""Ablation of the search on the embedded default: which parts of it earn their keep.

Each row is a real ``--run`` (the package's CLI, default settings otherwise) over the same seeds;
the table gives the best candidate's mean test accuracy per seed and their mean, beside the
plain average, default TIES and the best input model of the same runs, and the wall time.

Rows:

- techniques only: ``mixed`` restricted to the registry's techniques, per-model values
  (``merge_settings.techniques`` without ``ps`` and ``dfs``), no refine stage;
- + per-layer PS: the same plus per-layer values (PS merges and per-layer refinement);
- + DFS: the tournament over everything, layer stacks included, still no refine stage;
- + refine: the full default (the tournament, then CMA-ES around its best merge);
- CMA-ES: ``--strategy cmaes`` with the default method (and its refine stage);
- ps_dfs: the staged method (a PS search, then a DFS search over its best, then refine).

Run::

    python scripts/ablate_search.py                     # seeds 42 1 2, about 40 minutes
    python scripts/ablate_search.py --seeds 42 --rows techniques full
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from agent_forge.evomerge.techniques import MERGE_TECHNIQUES

TECHNIQUES = [t for t in MERGE_TECHNIQUES if t != "passthrough"]

NO_REFINE = {"evolution_settings": {"refine_generations": 0}}
ROWS: dict[str, tuple[str, dict, list[str]]] = {
    "techniques": (
        "techniques only",
        {"merge_settings": {"techniques": TECHNIQUES}, **NO_REFINE},
        [],
    ),
    "ps": (
        "+ per-layer PS",
        {"merge_settings": {"techniques": [*TECHNIQUES, "ps"]}, **NO_REFINE},
        [],
    ),
    "dfs": ("+ DFS", NO_REFINE, []),
    "full": ("+ refine (the full default)", {}, []),
    "cmaes": ("CMA-ES", {}, ["--strategy", "cmaes"]),
    "ps_dfs": ("ps_dfs (staged)", {}, ["--method", "ps_dfs"]),
}


def run_once(config: dict, flags: list[str], seed: int, work: Path) -> dict:
    folder = work / f"run-{len(list(work.iterdir()))}"
    config_path = work / f"config-{folder.name}.json"
    config_path.write_text(json.dumps(config))
    command = [sys.executable, "-m", "agent_forge.evomerge.cli", "--run", "--quiet"]
    command += ["--config", str(config_path), "--seed", str(seed), "--output", str(folder), *flags]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    summary = json.loads((folder / "summary.json").read_text())
    test = summary["test"]
    inputs = [name for name in test if name not in ("best", "average", "ties")]
    recipe = json.loads((Path(summary["best_model"]) / "evomerge_recipe.json").read_text())
    return {
        "best": 100 * test["best"]["mean"],
        "average": 100 * test["average"]["mean"],
        "ties": 100 * test["ties"]["mean"],
        "best_input": 100 * max(test[name]["mean"] for name in inputs),
        "wall": wall,
        "recipe": recipe,
    }


def root_kind(recipe_file: dict) -> str:
    node = recipe_file.get("recipe", recipe_file)
    return node.get("technique") or node.get("type", "?")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2])
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--generations", type=int, help="override (for a quick look)")
    args = parser.parse_args()
    extra = ["--generations", str(args.generations)] if args.generations else []
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="evomerge-ablation-") as tmp:
        for key in args.rows:
            label, config, flags = ROWS[key]
            results[key] = []
            for seed in args.seeds:
                outcome = run_once(config, [*flags, *extra], seed, Path(tmp))
                results[key].append(outcome)
                print(
                    f"{label}, seed {seed}: {outcome['best']:.1f} ({outcome['wall']:.0f} s), "
                    f"best is {root_kind(outcome['recipe'])}",
                    flush=True,
                )
    first = next(iter(results.values()))[0]
    print(
        f"\nreferences: best input {first['best_input']:.1f}, plain average "
        f"{first['average']:.1f}, default TIES {first['ties']:.1f} (test mean, %)\n"
    )
    seeds = " | ".join(f"seed {s}" for s in args.seeds)
    print(f"| search | {seeds} | mean | over best input | mean wall |")
    print("|---" * (len(args.seeds) + 4) + "|")
    for key, outcomes in results.items():
        best = [o["best"] for o in outcomes]
        mean = sum(best) / len(best)
        wall = sum(o["wall"] for o in outcomes) / len(outcomes)
        cells = " | ".join(f"{b:.1f}" for b in best)
        print(
            f"| {ROWS[key][0]} | {cells} | {mean:.1f} | {mean - first['best_input']:+.1f} "
            f"| {wall:.0f} s |"
        )


if __name__ == "__main__":
    main()
