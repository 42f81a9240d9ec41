"""The CLI's operations: each ``cmd_*`` takes the parsed arguments and returns an exit code.

Kept apart from ``cli.py`` so that ``--help`` and argument errors stay fast (no torch import).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .config import (
    PLACEMENT_FIELDS,
    Configuration,
    ModelReference,
    create_default_config,
    load_default_manifest,
    unique_model_name,
)
from .exceptions import ConfigurationError

logger = logging.getLogger("agent_forge.evomerge.cli")


def _console(args: argparse.Namespace) -> Any:
    from rich.console import Console

    return Console(file=sys.stdout, highlight=False, soft_wrap=True)


# -- configuration from flags ----------------------------------------------------------------------

# Every run-setting flag, declared once: where its value lands in the configuration. On --resume
# the flags that say what the run computes must equal the run's own settings (a difference is
# refused, naming the field); the placement flags (where it runs) are honoured; any other flag
# that means nothing to a resumed run is refused, naming it.
CONFIG_FLAGS: dict[str, tuple[str | None, str]] = {
    "generations": ("evolution_settings", "num_generations"),
    "population": ("evolution_settings", "population_size"),
    "strategy": ("evolution_settings", "strategy"),
    "method": ("merge_settings", "merge_method"),
    "fitness_sample_size": ("evaluation_settings", "fitness_sample_size"),
    "seed": (None, "seed"),
    "device": (None, "device"),
    "workers": (None, "workers"),
    "backend": (None, "backend"),
}
RUN_DEFINING_FLAGS = (
    "config",
    "model1",
    "model2",
    "model3",
    "base",
    *(flag for flag in CONFIG_FLAGS if flag not in PLACEMENT_FIELDS),
)
RESUME_ALSO_TAKES = frozenset({"resume", "export_gguf", "outtype", "verbose", "quiet", "log_file"})


def flag_name(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def build_config(args: argparse.Namespace) -> Configuration:
    """The configuration file (or the embedded default) with the command line's overrides."""
    config = Configuration.load(args.config) if args.config else create_default_config()
    given = {i: getattr(args, f"model{i}") for i in (1, 2, 3) if getattr(args, f"model{i}")}
    models_from = "the configuration"
    base_is_default = not args.config or config.base_model is None
    if args.config and (not config.models or not config.evaluation_settings.tasks):
        default = create_default_config()
        if not config.models:
            models_from = "the embedded default models"
            if not given:
                logger.info("the configuration names no models; using the embedded default models")
            config.models, config.base_model = (
                default.models,
                config.base_model or default.base_model,
            )
        if not config.evaluation_settings.tasks:
            logger.info("the configuration names no tasks; using the embedded default tasks")
            config.evaluation_settings.tasks = default.evaluation_settings.tasks
    elif not args.config:
        models_from = "the embedded default models"
    if given:
        slots = list(config.models) + [None] * (3 - len(config.models))
        taken = set()
        for i, path in sorted(given.items()):
            slots[i - 1] = ModelReference(unique_model_name(path, taken), path)
            taken.add(slots[i - 1].name)
        for i, ref in enumerate(slots, start=1):
            if i not in given and ref is not None:
                if ref.name in taken:
                    ref = ModelReference(unique_model_name(ref.path, taken), ref.path)
                slots[i - 1] = ref
                taken.add(ref.name)
                logger.info(
                    "model%d not given: using %s (%s) from %s", i, ref.name, ref.path, models_from
                )
        config.models = [ref for ref in slots if ref is not None]
        if len(given) == len(config.models) and base_is_default and not args.base:
            # the embedded base belongs to the embedded models, not to the ones given
            config.base_model = None
            logger.info(
                "no --base: merging without a base model (TIES, DARE, task arithmetic and "
                "the other task-vector techniques need one; give --base MODEL)"
            )
    if args.base:
        config.base_model = ModelReference(
            unique_model_name(args.base, {m.name for m in config.models}), args.base
        )
    data = config.to_dict()
    for flag, (section, key) in CONFIG_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            (data[section] if section else data)[key] = value
    if args.population is not None:
        # --population shrinks the tournament and the elite to fit, unless the file set them
        # (then a misfit is refused, naming both)
        evo, chosen = data["evolution_settings"], config.evolution_settings.model_fields_set
        if "tournament_size" not in chosen:
            evo["tournament_size"] = min(evo["tournament_size"], args.population)
        if "elite_size" not in chosen:
            evo["elite_size"] = min(evo["elite_size"], max(0, args.population - 1))
    return Configuration.from_dict(data, origin="command line")


# -- progress --------------------------------------------------------------------------------------


class RunProgress:
    """A live display of generations and candidates (rich), silent when not a terminal or quiet."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.enabled = sys.stderr.isatty() and not args.quiet
        self.progress: Any = None
        self.generations: Any = None
        self.candidates: Any = None

    def __enter__(self) -> RunProgress:
        if self.enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[status]}"),
                console=Console(file=sys.stderr),
                transient=False,
            )
            self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.stop()

    def __call__(self, kind: str, **info: Any) -> None:
        if kind == "generation_done":
            logger.debug(
                "generation %d: best %.4f, mean %.4f",
                info["generation"],
                info["best"],
                info["mean"],
            )
        if self.progress is None:
            if kind == "generation_done":
                logger.info(
                    "generation %d done: best fitness %.4f (generation best %.4f, mean %.4f)",
                    info["generation"],
                    info["best"],
                    info["generation_best"],
                    info["mean"],
                )
            elif kind == "finishing":
                logger.info("%s …", info["step"])
            return
        if kind == "generation":
            if self.generations is None:
                self.generations = self.progress.add_task(
                    "generations", total=info["total"], status=""
                )
            self.progress.update(self.generations, total=info["total"])
            if self.candidates is not None:
                self.progress.remove_task(self.candidates)
            self.candidates = self.progress.add_task(
                f"  generation {info['generation']}", total=info["candidates"], status=""
            )
        elif kind == "candidate" and self.candidates is not None:
            self.progress.update(self.candidates, advance=1, status=f"best {info['best']:.4f}")
        elif kind == "generation_done" and self.generations is not None:
            if self.candidates is not None:
                self.progress.update(self.candidates, completed=self.progress.tasks[-1].total)
            self.progress.update(self.generations, advance=1, status=f"best {info['best']:.4f}")
        elif kind == "finishing":
            self.progress.console.print(f"{info['step']} …")


def print_summary(summary: dict[str, Any], task_names: list[str], console: Any) -> None:
    from rich.table import Table

    from .report import UNWEIGHTED_NOTE, score_table

    weights = summary.get("task_weights", {})
    rows = score_table(summary["test"], task_names, weights)
    table = Table(title="test split (%)")
    for header in rows[0]:
        table.add_column(header, justify="left" if header == "model" else "right")
    for row in rows[1:]:
        table.add_row(*row, style="bold" if row[0] == "best" else None)
    console.print(table)
    if "verdict" in summary:
        console.print(f"verdict: {summary['verdict']}")
    if 0 in weights.values():
        console.print(UNWEIGHTED_NOTE)
    console.print(f"fitness–test gap of the best: {summary['fitness_test_gap']:+.4f}")
    console.print(f"best model: {summary['best_model']}")


# -- operations ------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    config = build_config(args)
    if args.output:
        config.output_dir = args.output
    return _run(args, config, resume=None)


def cmd_resume(args: argparse.Namespace) -> int:
    """Continue a run. Flags that define the run must match it; ``--device``, ``--backend`` and
    ``--workers`` move it (the scores do not depend on where they are computed)."""
    given = set(getattr(args, "given_flags", ()))
    refused = sorted(given - set(RUN_DEFINING_FLAGS) - set(PLACEMENT_FIELDS) - RESUME_ALSO_TAKES)
    if refused:
        hint = (
            "a resumed run keeps its folder; copy the folder first to continue elsewhere"
            if refused[0] == "output"
            else "drop it"
        )
        raise ConfigurationError(f"{flag_name(refused[0])} does not apply to --resume; {hint}")
    saved = Path(args.resume) / "config.json"
    stored = Configuration.load(saved) if saved.is_file() else None
    config = None
    if any(getattr(args, flag) is not None for flag in RUN_DEFINING_FLAGS):
        config = build_config(args)
    elif stored is not None and any(getattr(args, f) is not None for f in PLACEMENT_FIELDS):
        config = stored.model_copy(deep=True)
    if config is not None and stored is not None:
        for flag in PLACEMENT_FIELDS:
            value = getattr(args, flag)
            setattr(config, flag, value if value is not None else getattr(stored, flag))
        config.output_dir = stored.output_dir
    return _run(args, config, resume=args.resume)


def _run(args: argparse.Namespace, config: Configuration | None, resume: str | None) -> int:
    import json

    from .evolutionary_tournament import run_evolutionary_tournament

    console = _console(args)
    with RunProgress(args) as progress:
        best = run_evolutionary_tournament(config, resume=resume, progress=progress)
    run_dir = Path(best).parent
    summary = json.loads((run_dir / "summary.json").read_text())
    names = [k for k in summary["test"]["best"] if k != "mean"]
    print_summary(summary, names, console)
    console.print(f"run folder: {run_dir}  (report: {run_dir / 'report.md'})")
    if args.export_gguf:
        _export(Path(best), run_dir / f"best-{args.outtype}.gguf", args.outtype, console)
    return 0


def _export(model_dir: Path, out: Path, outtype: str, console: Any) -> None:
    from .gguf_utils import export_gguf

    path = export_gguf(model_dir, out, outtype)
    console.print(f"GGUF ({outtype}): {path}")


def _evaluation_config(args: argparse.Namespace) -> Configuration:
    config = Configuration.load(args.config) if args.config else Configuration()
    if not config.evaluation_settings.tasks:
        config.evaluation_settings.tasks = load_default_manifest()["tasks"]
    if args.device:
        config.device = args.device
    return config


def cmd_evaluate(args: argparse.Namespace) -> int:
    from rich.table import Table

    from .utils import evaluate_model, load_model_for_inference

    config = _evaluation_config(args)
    model, tokenizer = load_model_for_inference(args.evaluate, config)
    scores = evaluate_model(model, tokenizer, config, split="test")
    table = Table(title=f"{args.evaluate} — test split")
    table.add_column("task")
    table.add_column("score", justify="right")
    for task, value in scores.per_task.items():
        table.add_row(task, f"{100 * value:.1f}%")
    table.add_row("mean", f"{100 * scores.aggregate:.1f}%", style="bold")
    _console(args).print(table)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    if args.prompt is None:
        raise ConfigurationError("--generate needs --prompt TEXT")
    if args.max_length < 1:
        raise ConfigurationError(f"--max-length {args.max_length}: give at least 1 token")
    from .utils import generate_text, load_model_for_inference

    model, tokenizer = load_model_for_inference(args.generate, _evaluation_config(args))
    text = generate_text(
        model,
        tokenizer,
        args.prompt,
        max_length=args.max_length,
        temperature=args.temperature,
        top_k=args.top_k,
        seed=args.seed or 0,
    )
    print(args.prompt + text)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from .layout import source_layers
    from .merger import AdvancedModelMerger
    from .recipe_files import load_recipe_file
    from .sources import check_compatible, open_source

    if not args.output:
        raise ConfigurationError("--merge needs --output DIR (a new folder for the merged model)")
    config = (
        build_config(args)
        if (args.config or any(getattr(args, f"model{i}") for i in (1, 2, 3)))
        else None
    )

    def layer_count(path: str) -> int:
        return source_layers(open_source("probe", path).config)

    document = load_recipe_file(args.merge, layer_count=layer_count)
    sources = dict(document.sources)
    if not sources:
        if config is None:
            raise ConfigurationError(
                f"{args.merge} names no model paths; give them with --config or --model1..3"
            )
        sources = {
            ref.name: ref.path for ref in [*config.models, *filter(None, [config.base_model])]
        }
    recipe_dir = Path(args.merge).resolve().parent
    sources = {name: _relative_to(path, recipe_dir) for name, path in sources.items()}
    sources.update(_moved_sources(args.source or [], sources))
    settings = config.merge_settings if config is not None else None
    opened = {
        name: open_source(
            name,
            path,
            allow_pickle=bool(settings and settings.allow_pickle),
            trust_remote_code=bool(settings and settings.trust_remote_code),
        )
        for name, path in sources.items()
    }
    check_compatible(list(opened.values()), layer_stacking=_has_layer_stack(document.recipe))
    for name, recorded in document.source_info.items():
        expected = recorded.get("sha256")
        found = opened[name].content_hash() if name in opened and expected else expected
        if found != expected:
            logger.warning(
                "model %s (%s) is not the one the recipe was made from (weights SHA-256 %s…, "
                "recorded %s…): the merge will differ from the original",
                name,
                sources[name],
                found[:12],
                expected[:12],
            )
    merger = AdvancedModelMerger(config, sources=opened, base=document.base)
    if document.dtype:
        merger.settings = merger.settings.model_copy(update={"dtype": document.dtype})
    out = merger.merge(document.recipe, args.output, source_paths=sources)
    console = _console(args)
    console.print(f"merged model: {out}")
    if args.export_gguf:
        _export(out, out.with_name(f"{out.name}-{args.outtype}.gguf"), args.outtype, console)
    return 0


def _moved_sources(given: list[str], sources: Mapping[str, str]) -> dict[str, str]:
    """``--source NAME=PATH`` flags as ``{name: path}``, each naming one of the recipe's
    models."""
    moved = {}
    for item in given:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigurationError(f"--source {item!r}: write it as NAME=PATH")
        if name not in sources:
            raise ConfigurationError(
                f"--source {name}=…: the recipe has no model {name!r}; "
                f"its models: {', '.join(sorted(sources))}"
            )
        moved[name] = path
    return moved


def _relative_to(path: str, folder: Path) -> str:
    """Paths in a recipe file that are relative and exist next to it are read from there."""
    candidate = folder / path
    return str(candidate) if not Path(path).is_absolute() and candidate.exists() else path


def _has_layer_stack(recipe: Any) -> bool:
    from .recipe import LayerStack

    return isinstance(recipe, LayerStack) or any(_has_layer_stack(c) for c in recipe.children())
