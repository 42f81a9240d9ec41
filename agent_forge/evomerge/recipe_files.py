"""Recipe files: EvoMerge's own (JSON/YAML) and mergekit-style YAML, read into one recipe.

EvoMerge's document (written next to every merged model as ``evomerge_recipe.json``)::

    {"format": "evomerge-recipe", "version": 1, "sources": {"m1": "path/or/hub-id", ...},
     "base": "base", "dtype": "bfloat16", "recipe": {"type": "merge", ...}}

A mergekit YAML (``merge_method``, ``base_model``, ``models[].model``, ``models[].parameters``,
top-level ``parameters``, ``dtype``, ``out_dtype``, ``slices`` for passthrough stacking) is
translated: parameters it leaves out take the defaults mergekit documents for that method
(e.g. TIES density 1, DARE rescale by L1 norm), so the same file gives the same tensors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import unique_model_name
from .exceptions import ConfigurationError
from .recipe import LayerSlot, LayerStack, Merge, RecipeNode, Source, recipe_from_dict
from .storage import read_json_or_yaml
from .techniques import FILTERS

_DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class RecipeDocument:
    """A recipe with the locations of the models it names."""

    recipe: RecipeNode
    sources: dict[str, str]
    base: str | None = None
    dtype: str | None = None
    #: Per model, what the merge recorded of it: ``hub_id``, ``sha256`` of its weights,
    #: ``license`` (EvoMerge documents only; empty otherwise).
    source_info: dict[str, dict] = field(default_factory=dict)


def load_recipe_file(path: str | Path, *, layer_count: Any = None) -> RecipeDocument:
    """Read an EvoMerge or mergekit recipe file.

    Args:
        layer_count: callable ``path -> int`` used to expand mergekit per-layer gradients
            (the number of layers of a model); only needed for such files.

    Raises:
        ConfigurationError: unreadable file, unknown format, or an unsupported mergekit feature.
    """
    path = Path(path)
    data = read_json_or_yaml(
        path,
        what="recipe file",
        missing="pass an evomerge_recipe.json or a mergekit YAML",
        default_format="yaml",
    )
    if not isinstance(data, Mapping):
        raise ConfigurationError(f"{path}: a recipe file holds a mapping at the top level")
    if "merge_method" in data:
        return from_mergekit(data, origin=str(path), layer_count=layer_count)
    if "recipe" in data:
        sources = data.get("sources") or {}
        if not isinstance(sources, Mapping):
            raise ConfigurationError(f"{path}: 'sources' must map model names to paths")
        recipe = recipe_from_dict(data["recipe"], f"{path}: recipe")
        missing = sorted(recipe.source_names() - set(sources))
        if missing:
            raise ConfigurationError(
                f"{path}: the recipe names model {missing[0]!r} but 'sources' gives no path for it"
            )
        dtype = data.get("dtype")
        if dtype is not None and dtype not in _DTYPES:
            raise ConfigurationError(f"{path}: dtype {dtype!r}; allowed: {', '.join(_DTYPES)}")
        info = data.get("source_info") or {}
        if not isinstance(info, Mapping):
            raise ConfigurationError(f"{path}: 'source_info' must map model names to records")
        return RecipeDocument(
            recipe,
            {str(k): str(v) for k, v in sources.items()},
            data.get("base"),
            dtype,
            {str(k): dict(v) for k, v in info.items() if isinstance(v, Mapping)},
        )
    if "type" in data:
        return RecipeDocument(recipe_from_dict(data, f"{path}: recipe"), {})
    raise ConfigurationError(
        f"{path}: not a recipe (expected EvoMerge's 'recipe' and 'sources', "
        "or mergekit's 'merge_method')"
    )


# -- mergekit --------------------------------------------------------------------------------------

#: mergekit parameters EvoMerge reads and ignores (int8_mask: a storage option of mergekit's).
_IGNORED = ("int8_mask",)
_TOP_KEYS = {
    "merge_method",
    "base_model",
    "models",
    "parameters",
    "dtype",
    "out_dtype",
    "slices",
    "name",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
}


def mergekit_methods() -> list[str]:
    """The mergekit merge methods a mergekit YAML may name (the registry's entries that carry
    ``mergekit_defaults``)."""
    from .techniques import MERGE_TECHNIQUES

    return [name for name, t in MERGE_TECHNIQUES.items() if t.mergekit_defaults is not None]


class _Names:
    """Short unique source names for model paths (``m1`` for ``org/m1``, ``m1_2`` on a clash)."""

    def __init__(self) -> None:
        self.by_path: dict[str, str] = {}

    def __call__(self, path: str) -> str:
        if path not in self.by_path:
            self.by_path[path] = unique_model_name(path, self.by_path.values())
        return self.by_path[path]


def from_mergekit(
    data: Mapping[str, Any], *, origin: str = "mergekit YAML", layer_count: Any = None
) -> RecipeDocument:
    """Translate a mergekit configuration into a recipe (see the module docstring)."""
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise ConfigurationError(f"{origin}: unsupported mergekit key {unknown[0]!r}")
    method = data["merge_method"]
    supported = mergekit_methods()
    if method not in supported:
        raise ConfigurationError(
            f"{origin}: mergekit merge_method {method!r} is not supported; "
            f"supported: {', '.join(supported)}"
        )
    for key in ("tokenizer_source", "tokenizer"):
        if data.get(key) not in (None, "base"):
            raise ConfigurationError(
                f"{origin}: {key} {data[key]!r} is not supported "
                "(tokenizers are copied, not merged)"
            )
    names = _Names()
    dtype = data.get("out_dtype") or data.get("dtype")
    if dtype is not None and dtype not in _DTYPES:
        raise ConfigurationError(f"{origin}: dtype {dtype!r}; allowed: {', '.join(_DTYPES)}")
    if data.get("slices"):
        if method != "passthrough":
            raise ConfigurationError(
                f"{origin}: 'slices' are supported with merge_method passthrough only"
            )
        recipe = _slices_to_stack(data["slices"], names, origin)
        return RecipeDocument(recipe, {v: k for k, v in names.by_path.items()}, None, dtype)
    models = data.get("models") or []
    if not models:
        raise ConfigurationError(f"{origin}: 'models' lists no models")
    base_path = data.get("base_model")
    base = names(str(base_path)) if base_path else None
    entries = [
        (names(_model_of(m, f"{origin}: models[{i}]")), _parameters_of(m, f"{origin}: models[{i}]"))
        for i, m in enumerate(models)
    ]
    depth = _depth_of(layer_count, base_path or models[0]["model"])
    recipe = _merge_node(method, entries, base, data.get("parameters") or {}, depth, origin)
    return RecipeDocument(recipe, {v: k for k, v in names.by_path.items()}, base, dtype)


def _merge_node(
    method: str,
    entries: list[tuple[str, Mapping[str, Any]]],
    base: str | None,
    shared: Mapping[str, Any],
    depth: Any,
    origin: str,
) -> RecipeNode:
    from .techniques import MERGE_TECHNIQUES, get_technique

    tech = get_technique(method)
    if tech.base_first:
        if base is None:
            raise ConfigurationError(f"{origin}: {method} needs base_model (its first input)")
        others = [name for name, _ in entries if name != base]
        if len(others) != 1:
            raise ConfigurationError(
                f"{origin}: {method} merges base_model with exactly one other model"
            )
        inputs = [base, others[0]]
        entries = []
    elif tech.needs_base or (tech.base_optional and base is not None):
        if base is None:
            raise ConfigurationError(f"{origin}: {method} needs base_model")
        entries = [(n, p) for n, p in entries if n != base]
        inputs = [n for n, _ in entries]
    else:
        inputs = [n for n, _ in entries]
    own = {p.name: p for p in tech.params}
    known = {p.name for t in MERGE_TECHNIQUES.values() for p in t.params} | set(_IGNORED)
    params: dict[str, Any] = dict(tech.mergekit_defaults or {})
    for key, value in shared.items():
        if key not in known:
            raise ConfigurationError(f"{origin}: parameter {key!r} is not supported for {method}")
        if key not in own:  # another method's parameter: mergekit ignores it too
            continue
        method_default = params.get(key, _technique_default(tech, key))
        params[key] = _fall_back(
            key, _translate_value(key, value, depth, origin), method_default, origin
        )
    per_input = {name for name, p in own.items() if p.per_input}
    per_model_keys = {k for _, p in entries for k in p} | (set(params) & per_input)
    if "weight" in per_input:
        per_model_keys.add("weight")  # required by mergekit: a missing one is an error
    if method in ("slerp", "nearswap") and "t" not in params:
        raise ConfigurationError(
            f"{origin}: {method} needs parameters: {{t: …}} (mergekit requires it)"
        )
    for key in sorted(per_model_keys):
        if key not in known or (key in own and key not in per_input):
            raise ConfigurationError(
                f"{origin}: per-model parameter {key!r} is not supported for {method}"
            )
        if key not in own:
            continue
        fallback = params.get(key, 1.0 if key == "density" else None)
        values = []
        for name, given in entries:
            value = given.get(key, fallback)
            if value is None and key == "weight":
                raise ConfigurationError(
                    f"{origin}: model {name} has no weight, which mergekit requires for "
                    f"{method}; add parameters: {{weight: 1.0}} to it (or to the top level)"
                )
            translated = _translate_value(key, value, depth, origin)
            values.append(_fall_back(key, translated, fallback, origin))
        params[key] = values
    params = {k: v for k, v in params.items() if k in own}
    node_base = tech.base_for(Source(base)) if base is not None and not tech.base_first else None
    return Merge(method, [Source(n) for n in inputs], params, node_base, 0)


def _translate_value(key: str, value: Any, depth: Any, origin: str) -> Any:
    """mergekit value → EvoMerge value: scalars pass; ``rescale`` booleans map to l1/none;
    filters map to components; gradients expand to one value per position."""
    if key == "rescale":
        return "l1" if value else "none" if isinstance(value, bool) else value
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    if isinstance(value, Mapping):
        value = [value]
    if isinstance(value, Sequence) and all(isinstance(v, bool | int | float) for v in value):
        return _gradient(value, depth(), origin)
    if isinstance(value, Sequence) and all(isinstance(v, Mapping) for v in value):
        filters: list[list[Any]] = []
        default = None
        for cond in value:
            target = cond.get("filter")
            translated = _translate_value(key, cond.get("value"), depth, origin)
            if target in (None, "*", ""):  # matches every tensor: later conditions never do
                default = translated
                break
            filters.append([str(target), translated])
        return {FILTERS: filters, "default": default} if filters else default
    raise ConfigurationError(f"{origin}: cannot read the value of {key!r}: {value!r}")


def _fall_back(key: str, value: Any, fallback: Any, origin: str) -> Any:
    """Filters without a catch-all: tensors none of them matches take ``fallback`` (the
    top-level value, its filters in their order, then its catch-all; else the method's
    default), as mergekit falls back from a model's conditions to the top level's and then to
    the default."""
    if not (isinstance(value, Mapping) and value.get("default") is None):
        return value
    filters, default = list(value[FILTERS]), fallback
    if isinstance(fallback, Mapping):
        filters, default = filters + list(fallback[FILTERS]), fallback["default"]
    if default is None:
        raise ConfigurationError(
            f"{origin}: {key!r} has filters but no value for the tensors they do not match; "
            f"add a condition without a filter (a catch-all) after them"
        )
    return {FILTERS: filters, "default": default}


def _technique_default(tech: Any, key: str) -> Any:
    """EvoMerge's default for ``key``, except where mergekit has none (``t``: required)."""
    if key == "t":
        return None
    for param in tech.params:
        if param.name == key:
            return param.default
    return None


def _gradient(values: Sequence[float], layers: int, origin: str) -> list[float]:
    """mergekit's gradient: layer i of L takes the value interpolated at t = i / (L − 1); tensors
    before and after the layers take t = 0. Returned as one value per position (L + 2)."""

    def at(t: float) -> float:
        scaled = t * (len(values) - 1)
        low = int(scaled)
        high = min(len(values) - 1, low + 1)
        frac = scaled - low
        return float((1 - frac) * values[low] + frac * values[high])

    per_layer = [at(i / (layers - 1) if layers > 1 else 1.0) for i in range(layers)]
    return [at(0.0), *per_layer, at(0.0)]


def _depth_of(layer_count: Any, model: str) -> Any:
    def depth() -> int:
        if layer_count is None:
            raise ConfigurationError(
                "this mergekit file uses per-layer gradients; the models' layer count is needed"
            )
        return int(layer_count(model))

    return depth


def _model_of(entry: Any, where: str) -> str:
    if not isinstance(entry, Mapping) or not entry.get("model"):
        raise ConfigurationError(f"{where}: each entry needs 'model' (a path or Hugging Face id)")
    return str(entry["model"])


def _parameters_of(entry: Mapping[str, Any], where: str) -> Mapping[str, Any]:
    parameters = entry.get("parameters") or {}
    if not isinstance(parameters, Mapping):
        raise ConfigurationError(f"{where}: 'parameters' must be a mapping")
    return parameters


def _slices_to_stack(slices: Sequence[Mapping[str, Any]], names: _Names, origin: str) -> LayerStack:
    inputs: list[str] = []
    slots: list[LayerSlot] = []
    for i, entry in enumerate(slices):
        sources = entry.get("sources") or []
        if len(sources) != 1:
            raise ConfigurationError(
                f"{origin}: slice {i} has {len(sources)} sources; passthrough takes one per slice"
            )
        where = f"{origin}: slice {i}"
        if not isinstance(sources[0], Mapping):
            raise ConfigurationError(
                f"{where}: a source is a mapping with 'model' and 'layer_range'"
            )
        model = names(_model_of(sources[0], where))
        if model not in inputs:
            inputs.append(model)
        if sources[0].get("parameters") or entry.get("parameters"):
            raise ConfigurationError(
                f"{origin}: slice {i}: passthrough parameters are not supported"
            )
        layer_range = sources[0].get("layer_range")
        if (
            not isinstance(layer_range, Sequence)
            or len(layer_range) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in layer_range)
            or not 0 <= layer_range[0] < layer_range[1]
        ):
            raise ConfigurationError(
                f"{where}: layer_range must be [start, stop] with 0 ≤ start < stop, "
                f"not {layer_range!r}"
            )
        start, stop = layer_range
        slots += [
            LayerSlot(inputs.index(model), layer, 1.0) for layer in range(int(start), int(stop))
        ]
    first = inputs.index(names(str(slices[0]["sources"][0]["model"])))
    last = inputs.index(names(str(slices[-1]["sources"][0]["model"])))
    return LayerStack(tuple(Source(n) for n in inputs), tuple(slots), first, last)
