"""Run configuration: which models, how to merge, how to evolve, how to evaluate.

Pydantic v2 models with ``extra="forbid"`` and assignment validation, so a typo or a bad
value fails at once with a message that names the field, the value and what is allowed.
Configurations load from and save to JSON or YAML::

    config = Configuration.load("run.yaml")
    config.evolution_settings.num_generations = 100   # validated on assignment
    config.save("run.json")
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .exceptions import ConfigurationError

logger = logging.getLogger(__name__)

#: Merge families the search understands besides the single techniques of the registry.
SEARCH_METHODS = ("mixed", "ps", "dfs", "ps_dfs")
DATA_DIR = Path(__file__).resolve().parent / "data"
DEFAULT_MANIFEST = DATA_DIR / "default_manifest.json"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelReference(_Strict):
    """A model by name and location: a local folder, a Hugging Face id, or a ``.gguf`` file."""

    name: str = Field(min_length=1)
    path: str = Field(min_length=1)

    def __init__(self, name: str | None = None, path: str | None = None, **data: Any) -> None:
        if name is not None:
            data["name"] = name
        if path is not None:
            data["path"] = path
        super().__init__(**data)


def unique_model_name(path: str, taken: Collection[str]) -> str:
    """A short model name from a path or hub id (``m1`` for ``org/m1`` or ``m1.gguf``),
    suffixed ``_2``, ``_3``, … until it is not among ``taken``."""
    stem = Path(path.rstrip("/")).name.removesuffix(".gguf") or "model"
    name, n = stem, 1
    while name in taken:
        n += 1
        name = f"{stem}_{n}"
    return name


class MergeSettings(_Strict):
    """How candidates are merged.

    ``merge_method`` is a technique of the registry (``linear``, ``ties``, ...) or a search
    family: ``mixed`` (every technique competes; the default), ``ps`` (per-layer weights and
    densities of ``ps_technique``), ``dfs`` (layer paths over the sources) or ``ps_dfs``
    (a PS search, then a DFS search over the PS result and the sources).
    """

    merge_method: str = "mixed"
    #: What the search may build (None: everything): technique names, ``ps`` (per-layer values)
    #: and ``dfs`` (layer stacks). It limits mixed's first generation, technique switches,
    #: per-layer refinement and the merging of weaker candidates; e.g. ``[linear, ties, slerp]``.
    techniques: list[str] | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    ps_technique: str = "dare_ties"
    ps_layer_groups: int | None = Field(default=None, ge=1)
    dfs_repetitions: int = Field(default=2, ge=1, le=4)
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    max_shard_size: str = "2GB"
    max_depth: int = Field(default=3, ge=1, le=16)
    fused_kernels: Literal["auto", "on", "off"] = "auto"
    allow_pickle: bool = False
    trust_remote_code: bool = False

    @field_validator("merge_method", "ps_technique")
    @classmethod
    def _known_method(cls, value: str, info: Any) -> str:
        from .techniques import MERGE_TECHNIQUES, closest_names

        allowed = list(MERGE_TECHNIQUES) + (
            list(SEARCH_METHODS) if info.field_name == "merge_method" else []
        )
        if value not in allowed:
            hint = closest_names(value, allowed)
            raise ValueError(f"unknown method {value!r}{hint}; allowed: {', '.join(allowed)}")
        if info.field_name == "ps_technique" and not MERGE_TECHNIQUES[value].needs_base:
            raise ValueError(
                f"{value!r} needs no base model; a PS merge needs a task-vector technique"
            )
        return value

    @field_validator("techniques")
    @classmethod
    def _known_techniques(cls, value: list[str] | None) -> list[str] | None:
        from .techniques import MERGE_TECHNIQUES, closest_names

        if value is None:
            return None
        if not value:
            raise ValueError("techniques is empty; name at least one, or leave it out for all")
        allowed = [t for t in MERGE_TECHNIQUES if t != "passthrough"] + ["ps", "dfs"]
        for name in value:
            if name not in allowed:
                hint = closest_names(name, allowed)
                raise ValueError(f"unknown technique {name!r}{hint}; allowed: {', '.join(allowed)}")
        return list(dict.fromkeys(value))

    @field_validator("max_shard_size")
    @classmethod
    def _shard_size(cls, value: str) -> str:
        parse_size(value)
        return value


class EvolutionSettings(_Strict):
    """How the population evolves (tournament GA by default, or CMA-ES).

    ``refine_generations`` adds a last stage: CMA-ES (step ``refine_sigma``) over the best merge's
    numeric values, one per layer group, started from that merge. It runs at most that many
    generations and no more than ``num_generations``; 0 turns it off.
    """

    strategy: Literal["tournament", "cmaes"] = "tournament"
    population_size: int = Field(default=8, ge=2, le=1024)
    num_generations: int = Field(default=30, ge=1, le=100_000)
    tournament_size: int = Field(default=3, ge=1)
    elite_size: int = Field(default=2, ge=0)
    mutation_rate: float = Field(default=0.5, ge=0.0, le=1.0)
    mutation_strength: float = Field(default=0.15, gt=0.0, le=1.0)
    technique_switch_rate: float = Field(default=0.1, ge=0.0, le=1.0)
    layer_refine_rate: float = Field(default=0.2, ge=0.0, le=1.0)
    lower_merge_count: int = Field(default=2, ge=0)
    patience: int = Field(default=10, ge=1)
    min_delta: float = Field(default=0.001, ge=0.0)
    cmaes_sigma: float = Field(default=0.2, gt=0.0, le=1.0)
    refine_generations: int = Field(default=10, ge=0)
    refine_sigma: float = Field(default=0.1, gt=0.0, le=1.0)

    @property
    def refine_stage_generations(self) -> int:
        """Generations the refine stage runs: ``refine_generations``, capped by
        ``num_generations``."""
        return min(self.refine_generations, self.num_generations)

    @model_validator(mode="after")
    def _sizes_fit(self) -> EvolutionSettings:
        # defaults shrink to fit a small population; values the user set are checked
        given = self.model_fields_set
        if "tournament_size" not in given and self.tournament_size > self.population_size:
            object.__setattr__(self, "tournament_size", self.population_size)
        if "elite_size" not in given and self.elite_size >= self.population_size:
            object.__setattr__(self, "elite_size", max(0, self.population_size - 1))
        if self.tournament_size > self.population_size:
            raise ValueError(
                f"tournament_size = {self.tournament_size} exceeds population_size = "
                f"{self.population_size}; use a tournament of at most the population"
            )
        if self.elite_size >= self.population_size:
            raise ValueError(
                f"elite_size = {self.elite_size} must be smaller than population_size = "
                f"{self.population_size}"
            )
        return self


class EvaluationSettings(_Strict):
    """Which tasks score a candidate and how much of the fitness split to use."""

    tasks: list[str] = Field(default_factory=list)
    fitness_sample_size: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=256, ge=1)


#: The fields that say where a run computes, not what: they may change when it is resumed (the
#: scores do not depend on them). The CLI's flags of the same names set them.
PLACEMENT_FIELDS = ("device", "backend", "workers")


class Configuration(_Strict):
    """A whole run: models, optional base, settings, output folder, device and seed."""

    models: list[ModelReference] = Field(default_factory=list)
    base_model: ModelReference | None = None
    merge_settings: MergeSettings = Field(default_factory=MergeSettings)
    evolution_settings: EvolutionSettings = Field(default_factory=EvolutionSettings)
    evaluation_settings: EvaluationSettings = Field(default_factory=EvaluationSettings)
    output_dir: str | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = Field(default=42, ge=0, lt=2**63)
    backend: Literal["serial", "ray"] = "serial"
    workers: int = Field(default=1, ge=1, le=1024)

    @field_validator("models")
    @classmethod
    def _unique_names(cls, models: list[ModelReference]) -> list[ModelReference]:
        names = [m.name for m in models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"model names must be unique; repeated: {', '.join(duplicates)}")
        return models

    # -- files -------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, origin: str = "configuration") -> Configuration:
        """Validate a plain mapping; raises ConfigurationError with one line per problem."""
        if not isinstance(data, dict):
            raise ConfigurationError(
                f"{origin}: expected a mapping at the top level, got {type(data).__name__}"
            )
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigurationError(describe_validation_error(exc, origin)) from None

    @classmethod
    def load(cls, path: str | Path) -> Configuration:
        """Load a JSON or YAML file (by extension; ``.yml``/``.yaml`` are YAML)."""
        from .storage import read_json_or_yaml

        data = read_json_or_yaml(
            path, what="configuration file", missing="pass an existing JSON or YAML file"
        )
        return cls.from_dict(data if data is not None else {}, origin=str(path))

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def save(self, path: str | Path) -> Path:
        """Write JSON or YAML (by extension) atomically."""
        from .storage import atomic_write_text

        path = Path(path)
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        else:
            text = json.dumps(self.to_dict(), indent=2) + "\n"
        atomic_write_text(path, text)
        return path


def describe_validation_error(exc: ValidationError, origin: str = "configuration") -> str:
    """Turn pydantic's report into lines of ``field = value: what is allowed``."""
    lines = []
    for err in exc.errors():
        field = ".".join(str(part) for part in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            parent = _model_at(err["loc"][:-1])
            allowed = ", ".join(parent.model_fields) if parent else ""
            lines.append(
                f"{origin}: unknown field '{field}'" + (f" (allowed: {allowed})" if allowed else "")
            )
            continue
        message = err["msg"].removeprefix("Value error, ")
        value = err.get("input")
        shown = json.dumps(value, default=str) if not isinstance(value, dict) else "{...}"
        lines.append(f"{origin}: {field} = {shown}: {message}")
    return "; ".join(lines)


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] = Configuration
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nested:
            args = [a for c in candidates for a in getattr(c, "__args__", ())]
            nested = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        if not nested:
            return None
        model = nested[0]
    return model


_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
}


def parse_size(text: str | int) -> int:
    """``"2GB"`` → 2_000_000_000; ``"512MiB"`` → 536_870_912; ints pass through."""
    if isinstance(text, int):
        return text
    value = text.strip().upper()
    number = value.rstrip("KMGIB")
    unit = value[len(number) :]
    try:
        size = int(float(number) * _SIZE_UNITS[unit])
    except (KeyError, ValueError):
        raise ValueError(f"cannot read size {text!r}; write e.g. '2GB' or '512MiB'") from None
    if size <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return size


def load_default_manifest() -> dict[str, Any]:
    """The embedded default's models and tasks, with absolute paths."""
    if not DEFAULT_MANIFEST.is_file():
        raise ConfigurationError(
            f"the embedded default models are missing ({DEFAULT_MANIFEST}); reinstall the package "
            "or run scripts/build_default_models.py"
        )
    manifest = json.loads(DEFAULT_MANIFEST.read_text(encoding="utf-8"))
    return {
        "base": {
            "name": manifest["base"]["name"],
            "path": str(DATA_DIR / manifest["base"]["path"]),
        },
        "models": [
            {"name": m["name"], "path": str(DATA_DIR / m["path"])} for m in manifest["models"]
        ],
        "tasks": [str(DATA_DIR / t) for t in manifest["tasks"]],
    }


def create_default_config() -> Configuration:
    """The embedded default: three small specialists, their base, and the tasks that measure them.

    Runs offline on a laptop CPU in minutes.
    """
    manifest = load_default_manifest()
    return Configuration(
        models=[ModelReference(**m) for m in manifest["models"]],
        base_model=ModelReference(**manifest["base"]),
        evaluation_settings=EvaluationSettings(tasks=manifest["tasks"]),
    )
