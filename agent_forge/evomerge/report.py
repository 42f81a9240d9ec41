"""The run report: a per-skill table (parents, plain average, evolved), fitness per generation and
the lineage of the best candidate, as ``report.md`` with PNG plots."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .storage import atomic_write_text

logger = logging.getLogger(__name__)


UNWEIGHTED_NOTE = "* reported only: weight 0, not part of the mean"


def score_table(
    test: Mapping[str, Mapping[str, float]],
    task_names: Sequence[str],
    weights: Mapping[str, float] | None = None,
) -> list[list[str]]:
    """Rows ``[model, task1, …, mean]`` with percentages, for markdown and the terminal.

    Tasks of weight 0 (reported, not in the fitness) are marked ``*`` in the header.
    """
    weights = weights or {}
    header = [f"{t}*" if weights.get(t, 1.0) == 0 else t for t in task_names]
    rows = [["model", *header, "mean"]]
    for model, scores in test.items():
        rows.append(
            [
                model,
                *(f"{100 * scores.get(t, float('nan')):.1f}" for t in task_names),
                f"{100 * scores['mean']:.1f}",
            ]
        )
    return rows


def verdict(test: Mapping[str, Mapping[str, float]], inputs: Sequence[str]) -> str:
    """One line on what the search earned, in test-split points: the best against the plain
    average, the best input model and (when scored) default TIES — or plainly that it did not."""
    best = test["best"]["mean"]
    top = max(inputs, key=lambda name: test[name]["mean"])
    over_average = 100 * (best - test["average"]["mean"])
    over_input = 100 * (best - test[top]["mean"])
    ties = f"; default TIES {100 * (best - test['ties']['mean']):+.1f}" if "ties" in test else ""
    if over_average > 0 and over_input > 0:
        return (
            f"best beats the plain average by {over_average:.1f} points and the best input "
            f"model ({top}) by {over_input:.1f}{ties}"
        )
    return (
        f"best does not beat {'the plain average' if over_average <= 0 else 'the best input'}: "
        f"{over_average:+.1f} points against the plain average, {over_input:+.1f} against the "
        f"best input model ({top}){ties}"
    )


def markdown_table(rows: Sequence[Sequence[str]]) -> str:
    header, *body = rows
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def plot_fitness(
    history: Sequence[Mapping[str, Any]],
    path: Path,
    references: Mapping[str, float] | None = None,
) -> Path:
    """Best and mean fitness per generation, with a dashed line per reference (the best input
    model, the plain average, default TIES) on the same fitness split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    generations = [h["generation"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(generations, [h["best"] for h in history], marker="o", label="best so far")
    ax.plot(
        generations,
        [h["generation_best"] for h in history],
        linestyle=":",
        label="best of generation",
    )
    ax.plot(generations, [h["mean"] for h in history], linestyle="--", label="generation mean")
    colors = ("tab:gray", "tab:green", "tab:purple", "tab:brown")
    for (name, value), color in zip((references or {}).items(), colors, strict=False):
        ax.axhline(value, color=color, linestyle="-.", linewidth=1, label=f"{name} {value:.3f}")
    ax.set_xlabel("generation")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("fitness")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def lineage(
    best_hash: str, records: Mapping[str, Mapping[str, Any]], limit: int = 60
) -> list[tuple[str, str]]:
    """Parent → child edges leading to ``best_hash`` (breadth first, at most ``limit`` nodes)."""
    edges, queue, seen = [], [best_hash], {best_hash}
    while queue and len(seen) < limit:
        child = queue.pop(0)
        for parent in records.get(child, {}).get("parents", []):
            if parent in records and parent != child:
                edges.append((parent, child))
                if parent not in seen:
                    seen.add(parent)
                    queue.append(parent)
    return edges


def plot_lineage(best_hash: str, records: Mapping[str, Mapping[str, Any]], path: Path) -> Path:
    """The ancestry of the best: one column per generation, nodes labelled to their right (the
    figure grows with the widest generation, so labels never overlap), stages shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = lineage(best_hash, records)
    nodes = {best_hash} | {h for edge in edges for h in edge}
    by_generation: dict[int, list[str]] = {}
    for node in sorted(nodes, key=lambda h: (records[h]["generation"], h)):
        by_generation.setdefault(records[node]["generation"], []).append(node)
    columns = sorted(by_generation)
    column = {gen: k for k, gen in enumerate(columns)}
    position = {
        node: (float(column[gen]), float(i))
        for gen, group in by_generation.items()
        for i, node in enumerate(group)
    }
    tallest = max(len(group) for group in by_generation.values())
    fig, ax = plt.subplots(figsize=(2.0 + 1.6 * len(columns), 1.2 + 0.45 * tallest), dpi=100)
    stages: dict[str, list[float]] = {}
    for node, (x, _) in position.items():
        stages.setdefault(str(records[node].get("stage", "")), []).append(x)
    shades = ("#f2f2f2", "#e3ecf7")
    for k, (stage, xs) in enumerate(sorted(stages.items(), key=lambda item: min(item[1]))):
        if len(stages) > 1 and stage:
            ax.axvspan(min(xs) - 0.4, max(xs) + 0.9, color=shades[k % 2], zorder=0)
            ax.text(min(xs) - 0.35, tallest - 0.4, f"stage: {stage}", fontsize=8, va="top")
    for parent, child in edges:
        (x0, y0), (x1, y1) = position[parent], position[child]
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0), arrowprops={"arrowstyle": "->", "alpha": 0.4})
    for node, (x, y) in position.items():
        record = records[node]
        ax.scatter([x], [y], color="tab:red" if node == best_hash else "tab:blue", zorder=3)
        ax.annotate(
            f"{record['label']} {record['fitness']:.3f}",
            (x, y),
            textcoords="offset points",
            xytext=(5, 4),
            va="bottom",
            fontsize=7,
            zorder=4,
        )
    ax.set_xticks(range(len(columns)), [str(g) for g in columns])
    ax.set_xlim(-0.5, len(columns) - 0.1)
    ax.set_ylim(-0.7, tallest - 0.2)
    ax.set_xlabel("generation")
    ax.set_yticks([])
    ax.set_title("lineage of the best candidate")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(
    run_dir: Path,
    summary: Mapping[str, Any],
    history: Sequence[Mapping[str, Any]],
    records: Mapping[str, Mapping[str, Any]],
    task_names: Sequence[str],
    best_description: str,
) -> Path:
    """Write ``report.md`` and its plots into ``run_dir``; returns the report's path."""
    fitness_png = (
        plot_fitness(history, run_dir / "fitness.png", summary.get("reference_fitness"))
        if history
        else None
    )
    lineage_png = plot_lineage(summary["best_recipe_hash"], records, run_dir / "lineage.png")
    timings = summary["timings"]
    lines = [
        "# EvoMerge run report",
        "",
        f"Best candidate `{summary['best_recipe_hash'][:12]}` — "
        f"fitness {summary['best_fitness']:.4f} "
        f"on the fitness split, {summary['test']['best']['mean']:.4f} on the test split "
        f"(gap {summary['fitness_test_gap']:+.4f}).",
        "",
        "## Test split, per skill (%)",
        "",
        markdown_table(score_table(summary["test"], task_names, summary.get("task_weights"))),
        "",
        *([f"**Verdict:** {summary['verdict']}.", ""] if "verdict" in summary else []),
        *([UNWEIGHTED_NOTE, ""] if 0 in summary.get("task_weights", {}).values() else []),
        "## Fitness per generation",
        "",
    ]
    if fitness_png:
        lines += [f"![fitness per generation]({fitness_png.name})", ""]
    lines += [
        "## Lineage of the best",
        "",
        f"![lineage]({lineage_png.name})",
        "",
        "## Recipe of the best",
        "",
        best_description.rstrip(),
        "",
        "## Timings",
        "",
        f"- candidates evaluated: {timings['candidates']}",
        f"- evolution: {timings['evolution_seconds']:.1f} s "
        f"(materialise {timings['mean_merge_seconds'] * 1000:.1f} ms, "
        f"evaluate {timings['mean_eval_seconds'] * 1000:.1f} ms per candidate)",
        f"- writing the best model: {timings['write_seconds']:.1f} s",
        f"- test-split evaluation: {timings['test_seconds']:.1f} s",
        f"- total: {timings['total_seconds']:.1f} s",
        "",
    ]
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path
