"""Recipes: the one description of a candidate — a small tree that says how every tensor is
computed.

- :class:`Source` — a leaf: one of the input models (or the base model), by name.
- :class:`Merge` — a technique of the registry applied tensor by tensor to its inputs (each a
  recipe), with an optional base and, for randomised techniques, a seed.
- :class:`LayerStack` — the data-flow (DFS) merge: the output's layers are a path of
  ``(input, layer, scale)`` slots; embeddings, final norm and head come from ``embed_from``.
  ``scale`` multiplies the layer's residual-branch output projections.

Recipes are immutable, compare and hash by their canonical JSON (sorted keys, floats that
round-trip), and serialise to and from plain dicts. The same recipe always materialises to
the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from .exceptions import ConfigurationError
from .techniques import canonical_params, get_technique


class RecipeNode:
    """Shared behaviour of the three node types (canonical form, hashing, traversal)."""

    def to_dict(self) -> dict[str, Any]:  # pragma: no cover - overridden
        raise NotImplementedError

    @cached_property
    def canonical_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), allow_nan=False)

    @cached_property
    def hash(self) -> str:
        """Stable content hash (sha256 of the canonical JSON, hex)."""
        return hashlib.sha256(self.canonical_json.encode("utf-8")).hexdigest()

    @property
    def short_hash(self) -> str:
        return self.hash[:12]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RecipeNode) and self.canonical_json == other.canonical_json

    def __hash__(self) -> int:
        return hash(self.canonical_json)

    def children(self) -> tuple[RecipeNode, ...]:
        return ()

    def source_names(self) -> set[str]:
        if isinstance(self, Source):
            return {self.name}
        return set().union(*(child.source_names() for child in self.children()))

    def depth(self) -> int:
        return 0 if not self.children() else 1 + max(child.depth() for child in self.children())

    def size(self) -> int:
        """Number of nodes in the tree (shared subtrees counted each time)."""
        return 1 + sum(child.size() for child in self.children())


@dataclass(frozen=True, eq=False)
class Source(RecipeNode):
    """One input model by name (a name of the run's models or its base model)."""

    name: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigurationError(f"a source needs a non-empty model name, got {self.name!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"type": "source", "name": self.name}

    def __repr__(self) -> str:
        return f"Source({self.name!r})"


@dataclass(frozen=True, eq=False)
class Merge(RecipeNode):
    """``technique`` applied tensor by tensor to ``inputs`` (and ``base`` where it needs one).

    ``params`` are validated against the registry and stored in canonical form (defaults
    filled, per-input values expanded). ``seed`` matters only to randomised techniques and is
    dropped (None) for the others, so it never changes a deterministic recipe's hash.
    """

    technique: str
    inputs: tuple[RecipeNode, ...]
    params: Mapping[str, Any] = field(default_factory=dict)
    base: RecipeNode | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        tech = get_technique(self.technique)
        inputs = tuple(self.inputs)
        if not all(isinstance(i, RecipeNode) for i in inputs):
            raise ConfigurationError(f"{self.technique}: every input must be a recipe node")
        if tech.needs_base and self.base is None:
            raise ConfigurationError(
                f"{self.technique} needs a base model (task vectors are taken against it); "
                "set base_model"
            )
        object.__setattr__(self, "inputs", inputs)
        object.__setattr__(self, "params", canonical_params(tech, dict(self.params), len(inputs)))
        if self.seed is not None and not _integer(self.seed):
            raise ConfigurationError(f"{self.technique}: seed {self.seed!r} must be an integer")
        seed = (int(self.seed) if self.seed is not None else 0) if tech.randomized else None
        if seed is not None and not 0 <= seed < 2**63:
            raise ConfigurationError(f"{self.technique}: seed {seed} must be in [0, 2**63)")
        object.__setattr__(self, "seed", seed)

    def children(self) -> tuple[RecipeNode, ...]:
        return self.inputs + ((self.base,) if self.base is not None else ())

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "type": "merge",
            "technique": self.technique,
            "inputs": [i.to_dict() for i in self.inputs],
            "params": _plain(self.params),
        }
        if self.base is not None:
            out["base"] = self.base.to_dict()
        if self.seed is not None:
            out["seed"] = self.seed
        return out

    def __repr__(self) -> str:
        return (
            f"Merge({self.technique!r}, {list(self.inputs)!r}, base={self.base!r}, "
            f"#{self.short_hash})"
        )


@dataclass(frozen=True)
class LayerSlot:
    """One layer of a DFS path: layer ``layer`` of input ``input``, residual branches ×
    ``scale``."""

    input: int
    layer: int
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not (_integer(self.input) and _integer(self.layer)) or self.input < 0 or self.layer < 0:
            raise ConfigurationError(
                f"layer slot {self!r}: input and layer must be non-negative integers"
            )
        if isinstance(self.scale, bool) or not isinstance(self.scale, numbers.Real):
            raise ConfigurationError(f"layer slot {self!r}: scale must be a number")
        scale = float(self.scale)
        if not math.isfinite(scale) or abs(scale) > 1e3:
            raise ConfigurationError(
                f"layer slot {self!r}: scale must be a finite number within ±1000"
            )
        object.__setattr__(self, "input", int(self.input))
        object.__setattr__(self, "layer", int(self.layer))
        object.__setattr__(self, "scale", scale)


@dataclass(frozen=True, eq=False)
class LayerStack(RecipeNode):
    """The data-flow-space merge: a path of layer slots over ``inputs``.

    Embeddings come from ``inputs[embed_from]``; the final norm and head from
    ``inputs[head_from]`` (the same input unless given).
    """

    inputs: tuple[RecipeNode, ...]
    slots: tuple[LayerSlot, ...]
    embed_from: int = 0
    head_from: int | None = None

    def __post_init__(self) -> None:
        inputs = tuple(self.inputs)
        slots = tuple(s if isinstance(s, LayerSlot) else LayerSlot(*s) for s in self.slots)
        if not inputs:
            raise ConfigurationError("a layer stack needs at least one input")
        if not slots:
            raise ConfigurationError("a layer stack needs at least one layer slot")
        for slot in slots:
            if slot.input >= len(inputs):
                raise ConfigurationError(
                    f"layer slot {slot} names input {slot.input}, but there are {len(inputs)}"
                )
        for key in ("embed_from", "head_from"):
            index = getattr(self, key)
            if index is not None and not 0 <= index < len(inputs):
                raise ConfigurationError(
                    f"{key} {index} is not an input index (0..{len(inputs) - 1})"
                )
        if self.head_from == self.embed_from:
            object.__setattr__(self, "head_from", None)
        object.__setattr__(self, "inputs", inputs)
        object.__setattr__(self, "slots", slots)

    def children(self) -> tuple[RecipeNode, ...]:
        return self.inputs

    @property
    def head_input(self) -> int:
        return self.embed_from if self.head_from is None else self.head_from

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "type": "layer_stack",
            "inputs": [i.to_dict() for i in self.inputs],
            "slots": [[s.input, s.layer, s.scale] for s in self.slots],
            "embed_from": self.embed_from,
        }
        if self.head_from is not None:
            out["head_from"] = self.head_from
        return out

    def __repr__(self) -> str:
        return (
            f"LayerStack({len(self.slots)} layers over {len(self.inputs)} inputs, "
            f"#{self.short_hash})"
        )


Recipe = RecipeNode


def _plain(value: Any) -> Any:
    """Params as JSON-ready data (tuples → lists, mappings → dicts)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def recipe_from_dict(data: Any, where: str = "recipe") -> RecipeNode:
    """Parse the canonical dict form (as written by ``to_dict``), validating every node.

    Raises:
        ConfigurationError: naming the node's position (e.g. ``recipe.inputs[1]``) and the problem.
    """
    if not isinstance(data, Mapping) or "type" not in data:
        raise ConfigurationError(
            f"{where}: expected a mapping with a 'type' (source, merge or layer_stack)"
        )
    kind = data["type"]
    allowed = {
        "source": {"type", "name"},
        "merge": {"type", "technique", "inputs", "params", "base", "seed"},
        "layer_stack": {"type", "inputs", "slots", "embed_from", "head_from"},
    }
    if kind not in allowed:
        raise ConfigurationError(
            f"{where}: unknown node type {kind!r}; allowed: source, merge, layer_stack"
        )
    unknown = sorted(set(data) - allowed[kind])
    if unknown:
        raise ConfigurationError(f"{where}: unknown key {unknown[0]!r} for a {kind} node")
    try:
        if kind == "source":
            return Source(data.get("name", ""))
        inputs = data.get("inputs")
        if not isinstance(inputs, Sequence) or isinstance(inputs, str):
            raise ConfigurationError("'inputs' must be a list of recipes")
        parsed = tuple(
            recipe_from_dict(item, f"{where}.inputs[{i}]") for i, item in enumerate(inputs)
        )
        if kind == "merge":
            base = data.get("base")
            if not isinstance(data.get("params") or {}, Mapping):
                raise ConfigurationError("'params' must be a mapping of parameter names to values")
            return Merge(
                technique=data.get("technique", ""),
                inputs=parsed,
                params=data.get("params") or {},
                base=recipe_from_dict(base, f"{where}.base") if base is not None else None,
                seed=data.get("seed"),
            )
        if not isinstance(data.get("slots") or (), Sequence) or isinstance(data.get("slots"), str):
            raise ConfigurationError("'slots' must be a list of layer slots")
        slots = tuple(_slot(s) for s in data.get("slots") or ())
        embed, head = data.get("embed_from", 0), data.get("head_from")
        for key, index in (("embed_from", embed), ("head_from", head)):
            if index is not None and not _integer(index):
                raise ConfigurationError(f"'{key}' must be an input index, not {index!r}")
        return LayerStack(parsed, slots, int(embed), int(head) if head is not None else None)
    except ConfigurationError as exc:
        message = str(exc)
        raise ConfigurationError(
            message if message.startswith(where) else f"{where}: {message}"
        ) from None


def _integer(value: Any) -> bool:
    """An integer (numpy's too), and not a bool (JSON ``true`` is no index)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _slot(value: Any) -> LayerSlot:
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - {"input", "layer", "scale"})
        if unknown:
            raise ConfigurationError(
                f"layer slot {dict(value)!r}: unknown key {unknown[0]!r}; use input, layer, scale"
            )
        return LayerSlot(value.get("input", -1), value.get("layer", -1), value.get("scale", 1.0))
    if isinstance(value, Sequence) and len(value) in (2, 3):
        return LayerSlot(*value)
    raise ConfigurationError(
        f"layer slot {value!r}: write [input, layer, scale] or {{input, layer, scale}}"
    )


def recipe_from_json(text: str) -> RecipeNode:
    return recipe_from_dict(json.loads(text))


# -- depth bounding -------------------------------------------------------------------------------


def _scalar_linear(node: RecipeNode) -> bool:
    return (
        isinstance(node, Merge)
        and node.technique == "linear"
        and all(isinstance(w, float) for w in node.params["weight"])
    )


def collapse_linear(recipe: RecipeNode) -> RecipeNode:
    """Fold linear-of-linear nodes into one linear node over the leaves (exact algebraically).

    An input ``X = Σ aᵢXᵢ (÷ Σa when normalised)`` with outer weight ``u`` becomes the inputs
    ``Xᵢ`` with weights ``u·aᵢ (÷ Σa)``; repeated inputs have their weights added. Applies only
    to linear nodes with scalar weights, and not to an unnormalised input of a normalised node
    (its weights would change the outer divisor); other nodes are rebuilt with collapsed
    children.
    """
    if isinstance(recipe, Source):
        return recipe
    if isinstance(recipe, LayerStack):
        return LayerStack(
            tuple(collapse_linear(i) for i in recipe.inputs),
            recipe.slots,
            recipe.embed_from,
            recipe.head_from,
        )
    assert isinstance(recipe, Merge)
    inputs = tuple(collapse_linear(i) for i in recipe.inputs)
    base = collapse_linear(recipe.base) if recipe.base is not None else None
    if not _scalar_linear(recipe):
        return Merge(recipe.technique, inputs, recipe.params, base, recipe.seed)
    terms: list[tuple[RecipeNode, float]] = []
    for child, weight in zip(inputs, recipe.params["weight"], strict=True):
        inner = child.params["weight"] if _scalar_linear(child) else None  # type: ignore[attr-defined]
        if inner is None or (child.params["normalize"] and sum(inner) == 0):  # type: ignore[attr-defined]
            inner = None
        elif recipe.params["normalize"] and not child.params["normalize"]:  # type: ignore[attr-defined]
            inner = None  # its weights would join the outer divisor: not the same model
        if inner is not None:
            scale = 1.0 / sum(inner) if child.params["normalize"] else 1.0
            terms.extend(
                (grandchild, weight * w * scale)
                for grandchild, w in zip(child.inputs, inner, strict=True)
            )
        else:
            terms.append((child, weight))
    merged: dict[str, tuple[RecipeNode, float]] = {}
    for node, weight in terms:
        previous = merged.get(node.hash)
        merged[node.hash] = (node, weight + (previous[1] if previous else 0.0))
    leaves = list(merged.values())
    params = {"weight": [w for _, w in leaves], "normalize": recipe.params["normalize"]}
    return Merge("linear", tuple(n for n, _ in leaves), params, base)
