"""The run report's verdict and plots, from hand-made summaries."""

from __future__ import annotations

from agent_forge.evomerge.report import plot_fitness, plot_lineage, verdict


def table(**means: float) -> dict[str, dict[str, float]]:
    return {name: {"mean": value} for name, value in means.items()}


def test_verdict_says_by_how_much_the_best_beats_the_average_and_the_best_input():
    test = table(a=0.40, b=0.55, base=0.50, average=0.70, ties=0.65, best=0.88)
    line = verdict(test, ["a", "b", "base"])
    assert line == (
        "best beats the plain average by 18.0 points and the best input model (b) by 33.0; "
        "default TIES +23.0"
    )


def test_verdict_says_plainly_when_the_best_does_not_beat_the_average():
    test = table(a=0.40, base=0.50, average=0.70, best=0.69)
    line = verdict(test, ["a", "base"])
    assert line.startswith("best does not beat the plain average: -1.0 points")
    assert "+19.0 against the best input model (base)" in line


def test_fitness_plot_and_lineage_over_two_stages(tmp_path):
    history = [
        {"generation": g, "best": 0.5 + g / 10, "generation_best": 0.5, "mean": 0.4}
        for g in range(4)
    ]
    path = plot_fitness(history, tmp_path / "f.png", {"plain average": 0.55, "default TIES": 0.5})
    assert path.stat().st_size > 1000
    records = {
        "p": {"generation": 0, "stage": "ps", "label": "dare_ties", "fitness": 0.6, "parents": []},
        "q": {
            "generation": 1,
            "stage": "ps",
            "label": "dare_ties",
            "fitness": 0.7,
            "parents": ["p"],
        },
        "r": {"generation": 2, "stage": "dfs", "label": "dfs(5)", "fitness": 0.8, "parents": ["q"]},
    }
    assert plot_lineage("r", records, tmp_path / "l.png").stat().st_size > 1000
