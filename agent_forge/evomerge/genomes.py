"""Genomes: fixed-length vectors in [0, 1]ⁿ that decode to recipes, for continuous search (CMA-ES).

- :class:`ParamsGenome` — the parameter-space (PS) search of the Sakana paper: every numeric
  parameter of one technique over fixed inputs, per input model and, optionally, per layer
  group (embeddings, each layer, final norm + head when the groups are per layer).
- :class:`LayerPathGenome` — the data-flow-space (DFS) search: an indicator array over r
  repetitions of the inputs' layers (a slot is kept where its coordinate exceeds 0.5) plus one
  residual scale per slot, mapped log-uniformly into ``scale_range``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .recipe import LayerSlot, LayerStack, Merge, RecipeNode
from .techniques import Param, get_technique, searched_params


@dataclass(frozen=True)
class Gene:
    """One coordinate: parameter ``param`` of input ``input`` (None: shared) in layer group
    ``group``."""

    param: str
    input: int | None
    group: int | None
    low: float
    high: float


@dataclass
class ParamsGenome:
    """Every searchable numeric parameter of ``technique`` as one coordinate each.

    With ``groups``, the per-input parameters take one coordinate per layer group (the PS space);
    with ``shared_by_group`` too, the shared ones (SLERP's ``t``, ``lambda``) do as well.
    """

    technique: str
    inputs: Sequence[RecipeNode]
    base: RecipeNode | None
    groups: int | None = None
    fixed: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    shared_by_group: bool = False

    def __post_init__(self) -> None:
        tech = get_technique(self.technique)
        self.genes: list[Gene] = []
        for param in tech.params:
            if not param.is_numeric or param.search is None or param.name in self.fixed:
                continue
            owners = range(len(self.inputs)) if param.per_input else [None]
            by_group = self.groups and (param.per_input or self.shared_by_group)
            groups = range(self.groups) if by_group else [None]
            for owner in owners:
                for group in groups:
                    self.genes.append(Gene(param.name, owner, group, *_search_range(param)))

    @property
    def size(self) -> int:
        return len(self.genes)

    def decode(self, x: Sequence[float]) -> Merge:
        values: dict[str, Any] = dict(self.fixed)
        for gene, u in zip(self.genes, x, strict=True):
            value = gene.low + float(np.clip(u, 0.0, 1.0)) * (gene.high - gene.low)
            if gene.input is None:
                if gene.group is None:
                    values[gene.param] = value
                else:
                    values.setdefault(gene.param, [0.0] * (self.groups or 1))[gene.group] = value
                continue
            per_input = values.setdefault(gene.param, [None] * len(self.inputs))
            if gene.group is None:
                per_input[gene.input] = value
            else:
                if per_input[gene.input] is None:
                    per_input[gene.input] = [0.0] * (self.groups or 1)
                per_input[gene.input][gene.group] = value
        values = searched_params(get_technique(self.technique), values, len(self.inputs))
        return Merge(self.technique, tuple(self.inputs), values, self.base, self.seed)

    def initial(self) -> np.ndarray:
        """The technique's defaults (clipped into the searched ranges)."""
        tech = get_technique(self.technique)
        return np.array([_unit(tech.param(g.param).default, g) for g in self.genes], dtype=float)

    def encode(self, params: dict[str, Any]) -> np.ndarray:
        """The point whose decoding is nearest ``params`` (canonical params of a recipe of this
        technique over these inputs): a scalar or per-group value lands on its coordinates,
        clipped into the searched range. Component mappings are read at their ``default``."""
        x = []
        for gene in self.genes:
            value = params[gene.param]
            if gene.input is not None:
                value = value[gene.input]
            if isinstance(value, dict):
                value = value.get("default", next(iter(value.values())))
            if isinstance(value, list):
                value = value[(gene.group or 0) * len(value) // (self.groups or 1)]
            x.append(_unit(float(value), gene))
        return np.array(x, dtype=float)


def _search_range(param: Param) -> tuple[float, float]:
    assert param.search is not None
    return float(param.search[0]), float(param.search[1])


def _unit(value: float, gene: Gene) -> float:
    return float(np.clip((value - gene.low) / (gene.high - gene.low), 0.0, 1.0))


@dataclass
class LayerPathGenome:
    """Indicator array over ``repetitions`` passes of every input's layers, plus a scale per
    slot."""

    inputs: Sequence[RecipeNode]
    layer_counts: Sequence[int]
    repetitions: int = 2
    scale_range: tuple[float, float] = (0.5, 2.0)
    embed_from: int = 0

    def __post_init__(self) -> None:
        self.candidates = [
            (i, layer)
            for _ in range(self.repetitions)
            for i, count in enumerate(self.layer_counts)
            for layer in range(count)
        ]

    @property
    def size(self) -> int:
        return 2 * len(self.candidates)

    def scale(self, u: float) -> float:
        low, high = self.scale_range
        return float(low * (high / low) ** float(np.clip(u, 0.0, 1.0)))

    def decode(self, x: Sequence[float]) -> LayerStack:
        count = len(self.candidates)
        kept = [k for k in range(count) if x[k] > 0.5] or [int(np.argmax(np.asarray(x[:count])))]
        slots = tuple(
            LayerSlot(*self.candidates[k], scale=round(self.scale(x[count + k]), 6)) for k in kept
        )
        return LayerStack(tuple(self.inputs), slots, self.embed_from)

    def initial(self) -> np.ndarray:
        """The identity path of ``inputs[embed_from]`` (its layers once, in order), scales 1."""
        count = len(self.candidates)
        bits = [
            0.75 if (k < sum(self.layer_counts) and i == self.embed_from) else 0.25
            for k, (i, _) in enumerate(self.candidates)
        ]
        low, high = self.scale_range
        unit_scale = math.log(1.0 / low) / math.log(high / low)
        return np.array(bits + [unit_scale] * count, dtype=float)
