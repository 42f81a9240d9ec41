"""Merge techniques: small pure functions over the tensors of one parameter name, and their
registry.

Every technique works on one stack of same-shaped tensors at a time, in float32 (angles in
float64). Techniques that need a base model receive *task vectors* ``δᵢ = θᵢ − θ_base``
(shape ``(M, *shape)``) and return the merged task vector; the caller adds the base. The
others receive the models' tensors ``θᵢ`` and return the merged tensor.

Randomised techniques (DARE, DELLA) take a ``torch.Generator``; they never touch the global
RNG, so a recipe gives the same bytes in any order, process or worker.

Techniques read their stack and never write to it. *Segmented* techniques (the element-wise
family: linear, task arithmetic, TIES, DARE, breadcrumbs) also accept a stack ``(M, N)`` whose
rows hold several consecutive tensors, with ``segments=`` their sizes (and, when randomised,
one generator per segment), and write into ``out=``; per-tensor steps (trim thresholds,
random draws) run per segment, so a batch gives the same bits as its tensors one by one.
Magnitude trims also accept ``ranked=``: the stack's magnitudes sorted within each segment,
which the resident pool keeps so that a candidate's thresholds are lookups. The building
blocks live in :mod:`.sparsify` and :mod:`.combine`.

The registry :data:`MERGE_TECHNIQUES` records each technique's parameters (defaults, valid and
searched ranges, whether per input model), whether it needs a base, and whether it is
randomised. Parameter names follow what users already write in merge recipes: ``weight``,
``density``, ``gamma``, ``epsilon``, ``lambda``, ``normalize``, ``rescale``, ``t``.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .combine import Sparsifier, combine_task_vectors
from .exceptions import ConfigurationError, MergeError
from .sparsify import (
    MagnitudeBand,
    dare_drop,
    dare_weights,
    della_keep_probabilities,
    drop_outliers_and_small,
    keep_count,
    keep_top_magnitude,
    magnitude_cut,
    outlier_band_counts,
    rescale_kept,
    segment_starts,
    uniforms,
)

__all__ = [
    "MERGE_TECHNIQUES",
    "Param",
    "Technique",
    "TensorLocation",
    "apply_technique",
    "canonical_params",
    "resolved_params",
    "combine_task_vectors",
    "della_keep_probabilities",
    "drop_outliers_and_small",
    "get_technique",
    "keep_top_magnitude",
    "resolve_value",
    "searched_params",
    "technique",
]

#: Sizes of consecutive tensors flattened into one stack row (None: the row is one tensor).
Segments = Sequence[int] | None
#: One generator, or one per segment.
Generators = torch.Generator | Sequence[torch.Generator] | None

# -- registry ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """One parameter of a technique.

    ``low``/``high`` bound valid values (inclusive); ``search`` is the range the evolution
    explores (within the valid one). ``per_input`` parameters take one value per input model.
    ``sparsity`` parameters decide which entries of a task vector survive (trims and drops)
    rather than how much of it enters; the refine stage keeps them as the search left them.
    """

    name: str
    default: Any
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] | None = None
    per_input: bool = False
    search: tuple[float, float] | None = None
    sparsity: bool = False

    @property
    def is_numeric(self) -> bool:
        return self.choices is None and not isinstance(self.default, bool)

    def check(self, value: Any, technique: str) -> Any:
        """Return the value in canonical type, or raise ConfigurationError naming what is
        allowed."""
        where = f"{technique}: parameter '{self.name}'"
        if self.choices is not None:
            if value not in self.choices:
                raise ConfigurationError(
                    f"{where} = {value!r}; allowed: {', '.join(map(repr, self.choices))}"
                )
            return value
        if isinstance(self.default, bool):
            if not isinstance(value, bool):
                raise ConfigurationError(f"{where} = {value!r}; allowed: true or false")
            return value
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise ConfigurationError(f"{where} = {value!r}; must be a finite number")
        value = float(value)
        if (self.low is not None and value < self.low) or (
            self.high is not None and value > self.high
        ):
            raise ConfigurationError(
                f"{where} = {value!r} is out of range [{self.low}, {self.high}]"
            )
        return value


@dataclass(frozen=True)
class Fusion:
    """How the fused kernel (:mod:`.fused`) computes a technique.

    ``trim``: which entries of each task vector count: ``none`` (all), ``magnitude`` (TIES's
    top share by magnitude, cut per row) or ``random`` (DARE's seeded draws, fused only with
    ``rescale`` ``paper`` or ``none``). ``consensus``: TIES's sign election and disjoint mean.
    """

    trim: str = "none"
    consensus: bool = False


@dataclass(frozen=True)
class Technique:
    name: str
    fn: Callable[..., Tensor]
    params: tuple[Param, ...]
    needs_base: bool
    randomized: bool
    min_inputs: int
    max_inputs: int | None
    paper: str
    summary: str
    check: Callable[[dict[str, Any], str], None] | None = None
    segmented: bool = False
    ranked: bool = False
    #: Moves search-made params into the joint constraints ``check`` enforces (None: none).
    repair: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    #: How the fused kernel computes it (None: eager only).
    fusion: Fusion | None = None
    #: The defaults mergekit 0.1.x documents for its method of this name, where they differ
    #: from EvoMerge's (None: mergekit has no such method; a mergekit YAML naming it is refused).
    mergekit_defaults: Mapping[str, Any] | None = None
    #: Works on task vectors when the recipe gives a base and on the models' tensors when it
    #: does not (mergekit's optional base: multislerp, nuslerp). Only with ``needs_base=False``.
    base_optional: bool = False
    #: A mergekit YAML's ``base_model`` is the first input, not a base (slerp's t = 0 end,
    #: arcee_fusion's reference).
    base_first: bool = False

    @property
    def takes_base(self) -> bool:
        """Whether a base given to the recipe enters the computation."""
        return self.needs_base or self.base_optional

    def base_for(self, base: Any) -> Any:
        """The base a recipe node of this technique carries: ``base`` where it enters, else
        None."""
        return base if self.takes_base else None

    def param(self, name: str) -> Param:
        for param in self.params:
            if param.name == name:
                return param
        raise ConfigurationError(
            f"{self.name}: unknown parameter '{name}'"
            f"{closest_names(name, [p.name for p in self.params])}; "
            f"allowed: {', '.join(p.name for p in self.params) or '(none)'}"
        )

    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.params}


MERGE_TECHNIQUES: dict[str, Technique] = {}


def technique(
    name: str,
    *,
    params: Sequence[Param] = (),
    needs_base: bool,
    randomized: bool = False,
    min_inputs: int = 1,
    max_inputs: int | None = None,
    paper: str = "",
    check: Callable[[dict[str, Any], str], None] | None = None,
    segmented: bool = False,
    ranked: bool = False,
    repair: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    fusion: Fusion | None = None,
    mergekit_defaults: Mapping[str, Any] | None = None,
    base_optional: bool = False,
    base_first: bool = False,
) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Register a technique function under ``name`` (see the module docstring for the contract).

    ``segmented`` techniques also take ``segments=`` and ``out=``; ``ranked`` ones take
    ``ranked=``, their inputs' magnitudes sorted per segment (see the module docstring);
    ``fusion`` says how the fused kernel computes it (see :class:`Fusion`).
    """

    def register(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        if name in MERGE_TECHNIQUES:
            raise ValueError(f"technique {name!r} registered twice")
        if base_optional and needs_base:
            raise ValueError(f"technique {name!r}: base_optional needs needs_base=False")
        summary = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        MERGE_TECHNIQUES[name] = Technique(
            name,
            fn,
            tuple(params),
            needs_base,
            randomized,
            min_inputs,
            max_inputs,
            paper,
            summary,
            check,
            segmented,
            ranked,
            repair,
            fusion,
            mergekit_defaults,
            base_optional,
            base_first,
        )
        return fn

    return register


def closest_names(name: str, names: Sequence[str]) -> str:
    """``" (did you mean 'ties'?)"`` or ``""``."""
    close = difflib.get_close_matches(name, list(names), n=2, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


def get_technique(name: str) -> Technique:
    try:
        return MERGE_TECHNIQUES[name]
    except KeyError:
        raise ConfigurationError(
            f"unknown merge technique {name!r}{closest_names(name, list(MERGE_TECHNIQUES))}; "
            f"allowed: {', '.join(MERGE_TECHNIQUES)}"
        ) from None


def _stack(parts: Sequence[Tensor]) -> Tensor:
    return torch.stack(list(parts))


def technique_pair(
    variants: Mapping[str, bool],
    *,
    params: Callable[[Param], list[Param]],
    summaries: Mapping[str, str],
    mergekit_defaults: Mapping[str, Mapping[str, Any]],
    fused_trim: str | None = None,
    **common: Any,
) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Register the two variants of a task-vector technique that differ only in TIES's sign
    election: ``variants`` maps each name (in registration order) to whether it elects signs.

    The decorated ``impl(deltas, *, sign_consensus, **values)`` computes both. Each variant's
    ``normalize`` defaults to its ``sign_consensus`` (TIES divides by the agreeing weights; the
    plain sums do not divide), and ``params`` places that parameter among the others.
    """

    def register(impl: Callable[..., Tensor]) -> Callable[..., Tensor]:
        for name, consensus in variants.items():

            def variant(deltas: Tensor, *, _consensus: bool = consensus, **values: Any) -> Tensor:
                return impl(deltas, sign_consensus=_consensus, **values)

            variant.__doc__ = summaries[name]
            variant.__name__ = variant.__qualname__ = name
            fusion = None if fused_trim is None else Fusion(trim=fused_trim, consensus=consensus)
            technique(
                name,
                params=params(_normalize(consensus)),
                fusion=fusion,
                mergekit_defaults=mergekit_defaults[name],
                **common,
            )(variant)
        return impl

    return register


# -- parameter tables ------------------------------------------------------------------------------

_BIG = 1e6
WEIGHT = Param("weight", 1.0, -_BIG, _BIG, per_input=True, search=(0.0, 1.0))
DENSITY = Param("density", 0.5, 0.0, 1.0, per_input=True, search=(0.1, 1.0), sparsity=True)
LAMBDA = Param("lambda", 1.0, -_BIG, _BIG, search=(0.2, 1.5))
GAMMA = Param("gamma", 0.01, 0.0, 1.0, per_input=True, search=(0.0, 0.1), sparsity=True)
EPSILON = Param("epsilon", 0.15, 0.0, 0.5, per_input=True, search=(0.01, 0.2), sparsity=True)
RESCALE = Param("rescale", "paper", choices=("paper", "l1", "none"))


def _normalize(default: bool) -> Param:
    return Param("normalize", default)


def _groups(value: Any) -> bool:
    """Whether ``value`` is a list over layer groups (not a name filter's [substring, value])."""
    return isinstance(value, list) and not any(isinstance(v, str) for v in value)


def _della_pairs(density: Any, epsilon: Any) -> list[tuple[float, float]]:
    """The (density, epsilon) pairs one input's values can meet at some tensor: matching
    positions when both are lists of one length, else every combination (conservative)."""
    if _groups(density) and _groups(epsilon) and len(density) == len(epsilon):
        return [pair for d, e in zip(density, epsilon, strict=True) for pair in _della_pairs(d, e)]
    return [(d, e) for d in _as_list(density) for e in _as_list(epsilon)]


def _check_della(params: dict[str, Any], name: str) -> None:
    for density, epsilon in zip(params["density"], params["epsilon"], strict=True):  # per input
        for d, e in _della_pairs(density, epsilon):
            if d < 1.0 and not (0.0 < d - e and d + e < 1.0):
                raise ConfigurationError(
                    f"{name}: density ± epsilon must lie inside (0, 1); "
                    f"got density {d}, epsilon {e}"
                )


_DELLA_MARGIN = 0.01


def _della_epsilon_bound(density: float) -> float:
    """The largest epsilon (less a margin) with density ± epsilon inside (0, 1)."""
    return max(0.0, min(density - _DELLA_MARGIN, 0.99 - density))


def _fit_epsilon(density: Any, epsilon: Any) -> Any:
    """``epsilon`` shrunk to fit every density it can meet (as :func:`_della_pairs` pairs them)."""
    if _groups(density) and _groups(epsilon) and len(density) == len(epsilon):
        return [_fit_epsilon(d, e) for d, e in zip(density, epsilon, strict=True)]
    if isinstance(epsilon, Mapping):
        return {k: _fit_epsilon(density, v) for k, v in epsilon.items()}
    if isinstance(epsilon, list):
        return [_fit_epsilon(density, e) for e in epsilon]
    if isinstance(epsilon, str):  # a name filter's substring
        return epsilon
    bounds = [_della_epsilon_bound(d) for d in _as_list(density) if d < 1.0]
    return min([float(epsilon), *bounds])


def _lift_density(density: Any) -> Any:
    """Densities of 0 (or within the margin of it) raised so that some epsilon fits."""
    if isinstance(density, Mapping):
        return {k: _lift_density(v) for k, v in density.items()}
    if isinstance(density, list):
        return [_lift_density(d) for d in density]
    if isinstance(density, str):  # a name filter's substring
        return density
    return max(float(density), 2 * _DELLA_MARGIN)


def _repair_della(params: dict[str, Any]) -> dict[str, Any]:
    """DELLA's joint rule made to hold: each input's epsilon shrinks until density ± epsilon
    lies inside (0, 1) wherever the two meet, whatever mix of scalars, per-layer lists and
    component mappings they are (used by the search, which perturbs one value at a time)."""
    out = dict(params)
    densities = [_lift_density(d) for d in params["density"]]
    out["density"] = densities
    out["epsilon"] = [_fit_epsilon(d, e) for d, e in zip(densities, params["epsilon"], strict=True)]
    return out


def _as_list(value: Any) -> list[float]:
    """Flatten a (possibly layer-dependent, possibly per-input) value into its leaf numbers."""
    if isinstance(value, Mapping):
        return [leaf for v in value.values() for leaf in _as_list(v)]
    if isinstance(value, list | tuple):
        return [leaf for v in value for leaf in _as_list(v)]
    if isinstance(value, str):  # a name filter's substring
        return []
    return [value]


# -- techniques without a base ---------------------------------------------------------------------


@technique(
    "linear",
    params=[WEIGHT, _normalize(True)],
    needs_base=False,
    min_inputs=1,
    paper="arXiv:2203.05482 (model soups)",
    segmented=True,
    fusion=Fusion(),
    mergekit_defaults={"normalize": True},
)
def linear(
    tensors: Tensor,
    *,
    weight: Sequence[float],
    normalize: bool,
    segments: Segments = None,
    out: Tensor | None = None,
) -> Tensor:
    """Weighted average: Σ wᵢθᵢ, divided by Σ wᵢ when ``normalize``."""
    if normalize and abs(float(sum(weight))) < 1e-8:
        raise MergeError(
            "linear: the weights sum to zero, so they cannot be normalised; "
            "change the weights or set normalize: false"
        )
    return combine_task_vectors(
        tensors, weight, lam=1.0, normalize=normalize, sign_consensus=False, out=out
    )


@technique(
    "slerp",
    params=[Param("t", 0.5, 0.0, 1.0, search=(0.0, 1.0))],
    needs_base=False,
    min_inputs=2,
    max_inputs=2,
    paper="Shoemake 1985; used for model merging by mergekit",
    mergekit_defaults={},
    base_first=True,
)
def slerp(tensors: Tensor, *, t: float, dot_threshold: float = 0.9995, eps: float = 1e-8) -> Tensor:
    """Spherical interpolation of two tensors, flattened; linear when nearly collinear or ~0."""
    first, second = tensors[0], tensors[1]
    if t == 0.0:
        return first.clone()
    if t == 1.0:
        return second.clone()
    a, b = first.reshape(-1).double(), second.reshape(-1).double()
    norm_a, norm_b = a.norm(), b.norm()
    if norm_a < eps or norm_b < eps:
        return (1 - t) * first + t * second
    dot = float(((a / norm_a) * (b / norm_b)).sum().clamp(-1.0, 1.0))
    if abs(dot) > dot_threshold:  # collinear or anti-parallel: the angle is ill-conditioned
        return (1 - t) * first + t * second
    theta = math.acos(dot)
    sin_theta = math.sin(theta)
    coef_a = math.sin((1 - t) * theta) / sin_theta
    coef_b = math.sin(t * theta) / sin_theta
    return (coef_a * a + coef_b * b).to(first.dtype).reshape(first.shape)


@technique("passthrough", needs_base=False, min_inputs=1, max_inputs=1, mergekit_defaults={})
def passthrough(tensors: Tensor) -> Tensor:
    """The tensor of the one input, unchanged."""
    return tensors[0]


# -- task-vector techniques (need a base; receive δᵢ, return the merged δ) -------------------------


@technique(
    "task_arithmetic",
    params=[WEIGHT, LAMBDA, _normalize(False)],
    needs_base=True,
    paper="arXiv:2212.04089",
    segmented=True,
    fusion=Fusion(),
    mergekit_defaults={"normalize": False, "lambda": 1.0},
)
def task_arithmetic(
    deltas: Tensor,
    *,
    weight: Sequence[float],
    lam: float,
    normalize: bool,
    segments: Segments = None,
    out: Tensor | None = None,
) -> Tensor:
    """Task arithmetic: λ·Σ wᵢδᵢ (÷ Σ wᵢ when ``normalize``)."""
    return combine_task_vectors(
        deltas, weight, lam=lam, normalize=normalize, sign_consensus=False, out=out
    )


@technique(
    "ties",
    params=[WEIGHT, DENSITY, LAMBDA, _normalize(True)],
    needs_base=True,
    paper="arXiv:2306.01708",
    segmented=True,
    ranked=True,
    fusion=Fusion(trim="magnitude", consensus=True),
    mergekit_defaults={"normalize": True, "density": 1.0, "lambda": 1.0},
)
def ties(
    deltas: Tensor,
    *,
    weight: Sequence[float],
    density: Sequence[float],
    lam: float,
    normalize: bool,
    segments: Segments = None,
    out: Tensor | None = None,
    ranked: Tensor | None = None,
) -> Tensor:
    """TIES: trim each task vector, elect a sign per entry, average the agreeing entries.

    Each tensor of each δᵢ keeps exactly ``max(1, int(densityᵢ·numel))`` entries (none at
    density 0, see :func:`.sparsify.keep_count`); ties at the threshold magnitude keep the
    lowest flat indices first. ``ranked`` (optional, ``(M, N)``): the magnitudes sorted within
    each segment, which make the thresholds lookups.
    """
    flat = deltas.reshape(deltas.shape[0], -1)  # (M, N)
    parts = segment_starts(flat.shape[1], segments)
    trims = [
        _trim(row, [keep_count(d, size) for _, size in parts], parts, _row(ranked, i))
        for i, (row, d) in enumerate(zip(flat, density, strict=True))
    ]
    return combine_task_vectors(
        deltas,
        weight,
        lam=lam,
        normalize=normalize,
        sign_consensus=True,
        sparsifiers=trims,
        out=out,
    )


def _trim(
    row: Tensor, keeps: Sequence[int], parts: Sequence[tuple[int, int]], ranked: Tensor | None
) -> Sparsifier | None:
    if all(keep >= size for keep, (_, size) in zip(keeps, parts, strict=True)):
        return None
    return magnitude_cut(row, keeps, parts, ranked).apply


def _row(matrix: Tensor | None, index: int) -> Tensor | None:
    return None if matrix is None else matrix[index]


def _dare(
    deltas: Tensor,
    weight: Sequence[float],
    density: Sequence[float],
    lam: float,
    normalize: bool,
    rescale: str,
    generator: Generators,
    segments: Segments,
    out: Tensor | None,
    sign_consensus: bool,
) -> Tensor:
    """DARE's drop, then the task-vector sum with the ``paper`` rescale in the weights and the
    weights themselves as the normaliser (:func:`.sparsify.dare_weights`)."""
    flat = deltas.reshape(deltas.shape[0], -1)
    parts = segment_starts(flat.shape[1], segments)
    generators = list(generator) if isinstance(generator, Sequence) else [generator] * len(parts)
    dropped = dare_drop(flat, density, rescale, generators, parts).view_as(deltas)
    return combine_task_vectors(
        dropped,
        dare_weights(weight, density, rescale),
        shares=weight,
        lam=lam,
        normalize=normalize,
        sign_consensus=sign_consensus,
        out=out,
    )


_DARE_MERGEKIT = {"normalize": False, "density": 1.0, "rescale": "l1", "lambda": 1.0}


@technique_pair(
    {"dare_linear": False, "dare_ties": True},
    params=lambda normalize: [WEIGHT, DENSITY, LAMBDA, normalize, RESCALE],
    summaries={
        "dare_linear": "DARE: drop entries at random (keep ``density``), rescale the rest, "
        "then task arithmetic.",
        "dare_ties": "DARE-TIES: DARE's random drop and rescale, then TIES sign election.",
    },
    mergekit_defaults={"dare_linear": _DARE_MERGEKIT, "dare_ties": _DARE_MERGEKIT},
    fused_trim="random",
    needs_base=True,
    randomized=True,
    paper="arXiv:2311.03099",
    segmented=True,
)
def _dare_variants(
    deltas: Tensor,
    *,
    weight: Sequence[float],
    density: Sequence[float],
    lam: float,
    normalize: bool,
    rescale: str,
    sign_consensus: bool,
    generator: Generators = None,
    segments: Segments = None,
    out: Tensor | None = None,
) -> Tensor:
    return _dare(
        deltas, weight, density, lam, normalize, rescale, generator, segments, out, sign_consensus
    )


def _breadcrumbs(
    deltas: Tensor,
    density: Sequence[float],
    gamma: Sequence[float],
    segments: Segments,
    ranked: Tensor | None,
) -> list[Sparsifier | None]:
    flat = deltas.reshape(deltas.shape[0], -1)
    parts = segment_starts(flat.shape[1], segments)
    bands: list[Sparsifier | None] = []
    for i, (row, keep, outliers) in enumerate(zip(flat, density, gamma, strict=True)):
        if keep >= 1.0:
            bands.append(None)
            continue
        counts = [outlier_band_counts(keep, outliers, size) for _, size in parts]
        outer = magnitude_cut(row, [skip + kept for skip, kept in counts], parts, _row(ranked, i))
        inner = magnitude_cut(row, [skip for skip, _ in counts], parts, _row(ranked, i))
        bands.append(MagnitudeBand(outer, inner).apply)
    return bands


_CRUMB_DENSITY = Param("density", 0.9, 0.0, 1.0, per_input=True, search=(0.5, 1.0), sparsity=True)


_CRUMBS_MERGEKIT = {"normalize": False, "density": 1.0, "gamma": 0.01, "lambda": 1.0}


@technique_pair(
    {"breadcrumbs": False, "breadcrumbs_ties": True},
    params=lambda normalize: [WEIGHT, _CRUMB_DENSITY, GAMMA, LAMBDA, normalize],
    summaries={
        "breadcrumbs": "Model Breadcrumbs: drop outliers and small entries per task vector, "
        "then task arithmetic.",
        "breadcrumbs_ties": "Model Breadcrumbs with TIES sign election.",
    },
    mergekit_defaults={"breadcrumbs": _CRUMBS_MERGEKIT, "breadcrumbs_ties": _CRUMBS_MERGEKIT},
    needs_base=True,
    paper="arXiv:2312.06795",
    segmented=True,
    ranked=True,
)
def _breadcrumbs_variants(
    deltas: Tensor,
    *,
    weight: Sequence[float],
    density: Sequence[float],
    gamma: Sequence[float],
    lam: float,
    normalize: bool,
    sign_consensus: bool,
    segments: Segments = None,
    out: Tensor | None = None,
    ranked: Tensor | None = None,
) -> Tensor:
    bands = _breadcrumbs(deltas, density, gamma, segments, ranked)
    return combine_task_vectors(
        deltas,
        weight,
        lam=lam,
        normalize=normalize,
        sign_consensus=sign_consensus,
        sparsifiers=bands,
        out=out,
    )


def _della(
    deltas: Tensor,
    density: Sequence[float],
    epsilon: Sequence[float],
    rescale: str,
    generator: torch.Generator | None,
) -> Tensor:
    parts = []
    for delta, keep, eps in zip(deltas, density, epsilon, strict=True):
        # every input draws, whatever its density (as DARE): an input's draws do not depend on
        # the others' densities, so candidates that differ in densities share them
        draws = uniforms(delta.shape, generator, delta.device)
        if keep >= 1.0:
            parts.append(delta)
            continue
        probs = della_keep_probabilities(delta, keep, eps)
        kept = delta * (draws < probs)
        parts.append(rescale_kept(delta, kept, rescale, probs))
    return _stack(parts)


def _della_mergekit(normalize: bool) -> dict[str, Any]:
    return {"normalize": normalize, "density": 1.0, "epsilon": 0.15, "rescale": "l1", "lambda": 1.0}


@technique_pair(
    {"della": True, "della_linear": False},
    params=lambda normalize: [WEIGHT, DENSITY, EPSILON, LAMBDA, normalize, RESCALE],
    summaries={
        "della": "DELLA: magnitude-ranked random drop (rescaled by 1/pᵢ), then TIES sign election.",
        "della_linear": "DELLA without sign election: magnitude-ranked random drop, then task "
        "arithmetic.",
    },
    mergekit_defaults={"della": _della_mergekit(True), "della_linear": _della_mergekit(False)},
    needs_base=True,
    randomized=True,
    paper="arXiv:2406.11617",
    check=_check_della,
    repair=_repair_della,
)
def _della_variants(
    deltas: Tensor,
    *,
    weight: Sequence[float],
    density: Sequence[float],
    epsilon: Sequence[float],
    lam: float,
    normalize: bool,
    rescale: str,
    sign_consensus: bool,
    generator: torch.Generator | None = None,
) -> Tensor:
    kept = _della(deltas, density, epsilon, rescale, generator)
    return combine_task_vectors(
        kept, weight, lam=lam, normalize=normalize, sign_consensus=sign_consensus
    )


@technique(
    "model_stock",
    params=[Param("filter_wise", False), Param("clamp_cosine", False)],
    needs_base=True,
    min_inputs=2,
    paper="arXiv:2403.19522",
    mergekit_defaults={"filter_wise": False},
)
def model_stock(deltas: Tensor, *, filter_wise: bool, clamp_cosine: bool = False) -> Tensor:
    """Model Stock: move from the base towards the mean by t = N·cos / (1 + (N−1)·cos).

    ``cos`` is the mean pairwise cosine of the task vectors (per row with ``filter_wise``).
    The result is ``t·mean(θᵢ) + (1−t)·θ_base``, returned here as ``t·mean(δᵢ)``; t = 0 (the
    base) where the denominator is within 1e-6 of 0, as in mergekit. With a negative ``cos``
    the formula steps *away* from the models' mean (t < 0: the task vectors share no
    direction, so the paper's geometry does not hold); ``clamp_cosine`` takes cos ≤ 0 as 0
    there, which keeps the base instead.
    """
    count = deltas.shape[0]
    rows = deltas.shape[1] if filter_wise and deltas.dim() > 2 else 1
    flat = deltas.reshape(count, rows, -1)  # (M, rows, cols)
    norms = flat.norm(dim=-1)  # (M, rows)
    cosines = []
    for i in range(count):
        for j in range(i + 1, count):
            dot = (flat[i] * flat[j]).sum(dim=-1)
            cosines.append((dot / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1.0, 1.0))
    cos = torch.stack(cosines).mean(dim=0)  # (rows,)
    if clamp_cosine:
        cos = cos.clamp(min=0.0)
    denominator = 1 + (count - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, 0.0, count * cos / torch.where(singular, 1.0, denominator))
    mean = deltas.mean(dim=0)
    return t.reshape(-1, *([1] * (mean.dim() - 1))) * mean


@technique(
    "nearswap",
    params=[Param("t", 1e-4, 0.0, _BIG, search=(0.0, 0.01))],
    needs_base=True,
    min_inputs=1,
    max_inputs=1,
    paper="huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001 (NearSwap)",
    mergekit_defaults={},
)
def nearswap(deltas: Tensor, *, t: float) -> Tensor:
    """NearSwap: the model's value where it lies within ``t`` of the base, else a step of ``t``.

    Each entry moves from the base towards the model by ``min(1, t / |δ|)`` of its task vector
    (|δ| floored at 1e-6): small differences are taken whole, large ones by ``t`` only.
    """
    delta = deltas[0]
    return (t / delta.abs().clamp(min=1e-6)).clamp(max=1.0) * delta


@technique(
    "sce",
    params=[Param("select_topk", 1.0, 0.0, 1.0, search=(0.1, 1.0), sparsity=True)],
    needs_base=True,
    paper="arXiv:2408.07990 (FuseChat: select, calculate, erase)",
    mergekit_defaults={"select_topk": 1.0},
)
def sce(deltas: Tensor, *, select_topk: float) -> Tensor:
    """SCE: keep the entries where the task vectors disagree most, weight each model by its
    task vector's energy, drop the minority sign, average what is left.

    *Select*: with ``select_topk`` < 1 only the ``int(select_topk · n)`` entries of largest
    variance across the models (n: entries of non-zero variance) are kept, in every model.
    *Calculate*: model i's weight is the mean of its (selected) δᵢ², over the whole tensor,
    as a share of the models' sum (equal shares when that sum is below 1e-6). *Erase*: an entry
    counts only where its sign matches the sign of the entries' sum (≥ 0 counts as +). The
    result is Σ wᵢ·δᵢ over the counted entries divided by Σ wᵢ over them (floored at 1e-6).
    """
    if select_topk < 1.0:
        keep = torch.zeros(deltas.shape[1:], dtype=torch.bool, device=deltas.device)
        spread = deltas.var(dim=0, unbiased=False)
        count = int(int(torch.count_nonzero(spread)) * select_topk) if select_topk > 0 else 0
        if count > 0:
            keep.view(-1)[spread.reshape(-1).topk(count).indices] = True
        deltas = deltas * keep
    energy = deltas.reshape(deltas.shape[0], -1).square().mean(dim=1)
    total = float(energy.sum())
    shares = energy / total if abs(total) >= 1e-6 else torch.full_like(energy, 1 / len(energy))
    majority = torch.where(deltas.sum(dim=0) >= 0, 1.0, -1.0).to(deltas.dtype)
    counted = (deltas.sign() == majority) * shares.reshape(-1, *[1] * (deltas.dim() - 1))
    return (deltas * counted).sum(dim=0) / counted.sum(dim=0).clamp(min=1e-6)


@technique(
    "karcher",
    params=[Param("max_iter", 10, 1, 10_000), Param("tol", 1e-5, 0.0, 1.0)],
    needs_base=False,
    min_inputs=1,
    paper="arXiv:2603.04972 (Karcher mean merging)",
    mergekit_defaults={},
)
def karcher(tensors: Tensor, *, max_iter: float, tol: float) -> Tensor:
    """Karcher mean: the point on the unit sphere closest, by angle, to every model's direction,
    scaled by the models' mean norm.

    Each flattened tensor is split into norm and direction; directions of norm ≤ ``tol`` are
    left out. From their normalised mean, up to ``max_iter`` Riemannian gradient steps move the
    estimate along the mean of the log maps θᵢ·(uᵢ − cos θᵢ·m)/sin θᵢ (terms with θᵢ < ``tol``
    are zero), stopping when that step is shorter than ``tol``. Computed in float64.
    """
    count = tensors.shape[0]
    if count == 1:
        return tensors[0].clone()
    flat = tensors.reshape(count, -1).double()
    norms = flat.norm(dim=1)
    valid = norms > tol
    if not bool(valid.any()):
        return torch.zeros_like(tensors[0])
    units = flat[valid] / norms[valid, None]
    mean = units.mean(dim=0)
    mean = units[0].clone() if float(mean.norm()) < tol else mean / mean.norm()
    for _ in range(int(max_iter)):
        cosines = (units @ mean).clamp(-1.0, 1.0)
        angles = torch.arccos(cosines)
        gains = torch.where(angles < tol, 0.0, angles / torch.sin(angles).clamp(min=1e-300))
        step = (gains[:, None] * (units - cosines[:, None] * mean)).mean(dim=0)
        length = float(step.norm())
        if length < tol:
            break
        mean = math.cos(length) * mean + math.sin(length) * step / length
        mean = mean / mean.norm()
    return (norms.mean() * mean).to(tensors.dtype).reshape(tensors.shape[1:])


@technique(
    "multislerp",
    params=[WEIGHT, Param("normalize_weights", True), Param("eps", 1e-8, 0.0, 1.0)],
    needs_base=False,
    base_optional=True,
    paper="goddard.blog/posts/multislerp-wow-what-a-cool-idea (Multi-SLERP)",
    mergekit_defaults={},
)
def multislerp(
    tensors: Tensor, *, weight: Sequence[float], normalize_weights: bool, eps: float
) -> Tensor:
    """Multi-SLERP: the weighted mean direction of any number of tensors (task vectors where
    there is a base), scaled by their weighted mean norm.

    Each flattened tensor becomes a direction uᵢ = xᵢ / (‖xᵢ‖ + eps); the result is
    Σ wᵢ‖xᵢ‖ · m with m = Σ wᵢuᵢ / ‖Σ wᵢuᵢ‖, weights divided by their sum when
    ``normalize_weights``. (mergekit also maps the weighted mean of the tangent parts
    uᵢ − (uᵢ·m)m back through the exponential map at m; that mean is zero by construction, so
    the step changes nothing beyond rounding.) Where the directions cancel (‖Σ wᵢuᵢ‖ < eps,
    e.g. tensors no model changed) the result is Σ wᵢxᵢ; mergekit raises there for three or
    more models.
    """
    count = tensors.shape[0]
    if count == 1:
        return tensors[0].clone()
    flat = tensors.reshape(count, -1)
    weights = torch.tensor(weight, dtype=flat.dtype, device=flat.device)
    if normalize_weights:
        weights = weights / weights.sum()
    norms = flat.norm(dim=1)
    mean = (weights[:, None] * flat / (norms[:, None] + eps)).sum(dim=0)
    mean_norm = float(mean.norm())
    if mean_norm < eps:
        return (weights[:, None] * flat).sum(dim=0).reshape(tensors.shape[1:])
    return ((norms * weights).sum() / mean_norm * mean).reshape(tensors.shape[1:])


@technique(
    "nuslerp",
    params=[WEIGHT, Param("nuslerp_row_wise", False), Param("nuslerp_flatten", True)],
    needs_base=False,
    base_optional=True,
    min_inputs=2,
    max_inputs=2,
    paper="mergekit's NuSLERP (SLERP with t = w₂ / (w₁ + w₂), rows or columns optional)",
    mergekit_defaults={},
)
def nuslerp(
    tensors: Tensor,
    *,
    weight: Sequence[float],
    nuslerp_row_wise: bool,
    nuslerp_flatten: bool,
) -> Tensor:
    """NuSLERP: spherical interpolation of two tensors (task vectors where there is a base) at
    t = w₂ / (w₁ + w₂) (0.5 when the weights sum to ~0), over the whole tensor, or row by row
    (``nuslerp_flatten`` false), or column by column (``nuslerp_row_wise`` too).

    sin((1−t)θ)/sin θ · a + sin(tθ)/sin θ · b with θ the angle between a and b (their norms
    floored at 1e-7); linear where 1 − cos²θ ≤ 1e-16.
    """
    total = float(weight[0]) + float(weight[1])
    t = 0.5 if abs(total) < 1e-6 else float(weight[1]) / total
    first, second = tensors[0], tensors[1]
    if nuslerp_flatten:
        first, second = first.reshape(-1), second.reshape(-1)
    elif nuslerp_row_wise and first.dim() > 1:
        first, second = first.transpose(0, -1), second.transpose(0, -1)
    unit_a = first / first.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    unit_b = second / second.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    cosine = (unit_a * unit_b).sum(dim=-1, keepdim=True).clamp(-1.0, 1.0)
    collinear = (1 - cosine.square()) <= 1e-16
    theta = torch.acos(torch.where(collinear, 0.0, cosine))
    curved = (torch.sin((1 - t) * theta) * first + torch.sin(t * theta) * second) / torch.sin(theta)
    result = torch.where(collinear, (1 - t) * first + t * second, curved)
    if not nuslerp_flatten and nuslerp_row_wise and tensors.dim() > 2:
        result = result.transpose(0, -1)
    return result.reshape(tensors.shape[1:])


def _quantile_at(values: Tensor, q_num: int, q_den: int) -> Tensor:
    """The entry at index ⌊q·(n − 1)⌋ of ``values`` sorted (q = q_num / q_den, exact)."""
    flat = values.reshape(-1)
    return flat.kthvalue(q_num * (flat.numel() - 1) // q_den + 1).values


@technique(
    "arcee_fusion",
    needs_base=False,
    min_inputs=2,
    max_inputs=2,
    base_first=True,
    paper="arcee.ai (Arcee Fusion: importance = |δ| · KL of the rows' softmax)",
    mergekit_defaults={},
)
def arcee_fusion(tensors: Tensor) -> Tensor:
    """Arcee Fusion: the first input (the reference) with the second's changes where they
    matter most.

    An entry's importance is |θ₂ − θ₁| times its row's KL(softmax(θ₂) ‖ softmax(θ₁)) (rows:
    the last dimension, 1e-8 added to both distributions). Changes whose importance reaches
    median + 1.5 · (q₃ − q₁) of the tensor's importances are kept, the rest dropped. Quartiles
    are exact order statistics (mergekit samples a million entries of larger tensors at
    random, so its result there is not reproducible).
    """
    reference, model = tensors[0], tensors[1]
    p = torch.softmax(model, dim=-1) + 1e-8
    q = torch.softmax(reference, dim=-1) + 1e-8
    divergence = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    importance = (model - reference).abs() * divergence
    q1, median, q3 = (_quantile_at(importance, k, 4) for k in (1, 2, 3))
    keep = importance >= median + 1.5 * (q3 - q1)
    return reference + (model - reference) * keep


def _ram_masks(deltas: Tensor, epsilon: float) -> tuple[Tensor, Tensor, Tensor]:
    """RAM's masks: where each task vector moves more than ``epsilon``, how many do at each
    entry, and where exactly one does."""
    moved = deltas.abs() > epsilon
    movers = moved.sum(dim=0)
    return moved, movers, movers == 1


@technique(
    "ram",
    params=[Param("epsilon", 1e-5, 0.0, 1.0)],
    needs_base=True,
    paper="arXiv:2601.13572 (Reinforced Agent Merging)",
    mergekit_defaults={},
)
def ram(deltas: Tensor, *, epsilon: float) -> Tensor:
    """RAM: each entry is the mean of the task vectors that move it (by more than
    ``epsilon``); an entry one model alone moves keeps that model's change whole."""
    moved, movers, _ = _ram_masks(deltas, epsilon)
    return (deltas * moved).sum(dim=0) / movers.clamp(min=1)


@technique(
    "ramplus_tl",
    params=[
        Param("r", 0.1, 0.0, _BIG, search=(0.0, 0.5)),
        Param("alpha", 0.2, 0.0, _BIG, search=(0.0, 1.0)),
        Param("epsilon", 1e-5, 0.0, 1.0),
    ],
    needs_base=True,
    paper="arXiv:2601.13572 (RAM+, tensor-local)",
    mergekit_defaults={},
)
def ramplus_tl(deltas: Tensor, *, r: float, alpha: float, epsilon: float) -> Tensor:
    """RAM+ (tensor-local): RAM, with each model's unique changes amplified by
    λᵢ = 1 + r · clamp(ρᵢ, 0, alpha), ρᵢ = (its moved entries others move too) / (its moved
    entries no other moves, floored at ``epsilon``), counted over the tensor."""
    moved, movers, unique = _ram_masks(deltas, epsilon)
    shared = movers > 1
    flat_moved = moved.reshape(moved.shape[0], -1)
    shared_counts = (flat_moved & shared.reshape(1, -1)).sum(dim=1)
    unique_counts = (flat_moved & unique.reshape(1, -1)).sum(dim=1)
    rho = shared_counts / unique_counts.clamp(min=epsilon)
    gains = (1 + r * rho.clamp(min=0.0, max=alpha)).to(deltas.dtype)
    moved_deltas = deltas * moved
    gains = gains.reshape(-1, *[1] * (deltas.dim() - 1))
    return (moved_deltas * (unique * gains + shared / movers.clamp(min=1))).sum(dim=0)


# -- parameter values that vary by layer -----------------------------------------------------------

COMPONENTS = ("embeddings", "attention", "mlp", "norms", "head")
#: A mixture-of-experts MLP's parts: a mapping that does not name one gives it ``mlp``'s value.
MLP_PARTS = ("experts", "router", "shared_experts")
#: The key of a value given by name filters (see :func:`resolve_value`).
FILTERS = "filters"


@dataclass(frozen=True)
class TensorLocation:
    """Where a tensor sits in the model, for layer-dependent parameters.

    ``position`` runs 0 (embeddings) … ``layers + 1`` (final norm and head); layer ``i`` is
    position ``i + 1``. ``name`` is the tensor's name, which name filters match.
    """

    component: str
    position: int
    layers: int
    name: str = ""

    def group(self, groups: int) -> int:
        """Index of this tensor's group when the positions are split into ``groups`` equal runs."""
        return min(groups - 1, self.position * groups // (self.layers + 2))


def resolve_value(value: Any, location: TensorLocation | None) -> Any:
    """The scalar a layer-dependent value takes at ``location``.

    A value is a scalar; a list over layer groups (``[v_0, …, v_{n-1}]`` splits the positions
    into n equal runs); a mapping from component (``embeddings``, ``attention``, ``mlp``,
    ``norms``, ``head``, ``default``; an MoE's ``experts``, ``router`` and ``shared_experts``
    take ``mlp``'s value unless named) to one of those; or name filters,
    ``{"filters": [[substring, v], …], "default": v}``: the first pair whose substring occurs
    in the tensor's name gives the value, else ``default`` (mergekit's filter semantics).
    """
    if isinstance(value, Mapping) and FILTERS in value:
        name = location.name if location is not None else ""
        chosen = next((v for sub, v in value[FILTERS] if sub in name), value["default"])
        return resolve_value(chosen, location)
    if isinstance(value, Mapping):
        key = location.component if location is not None else "default"
        if key in MLP_PARTS and key not in value:
            key = "mlp"
        if key not in value:
            key = "default"
        return resolve_value(value[key], location)
    if isinstance(value, list | tuple):
        if location is None:
            raise MergeError("a layer-dependent parameter needs the tensor's location")
        return resolve_value(value[location.group(len(value))], location)
    return value


def check_value(param: Param, value: Any, technique_name: str) -> Any:
    """Validate a (possibly layer-dependent) value; returns it in canonical form."""
    if isinstance(value, Mapping) and FILTERS in value:
        return _check_filters(param, value, technique_name)
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(COMPONENTS) - set(MLP_PARTS) - {"default"})
        if unknown:
            raise ConfigurationError(
                f"{technique_name}: parameter '{param.name}' has unknown component {unknown[0]!r}; "
                f"allowed: {', '.join((*COMPONENTS, *MLP_PARTS))}, default"
            )
        if "default" not in value and not set(COMPONENTS) <= set(value):
            raise ConfigurationError(
                f"{technique_name}: parameter '{param.name}' maps components "
                f"{', '.join(sorted(value))} but has no 'default' for the other tensors; "
                f'add "default": VALUE'
            )
        return {k: check_value(param, v, technique_name) for k, v in sorted(value.items())}
    if isinstance(value, list | tuple):
        if not value:
            raise ConfigurationError(f"{technique_name}: parameter '{param.name}' is an empty list")
        return [param.check(v, technique_name) for v in value]
    return param.check(value, technique_name)


def _check_filters(param: Param, value: Mapping[str, Any], technique_name: str) -> dict:
    where = f"{technique_name}: parameter '{param.name}'"
    if set(value) != {FILTERS, "default"}:
        raise ConfigurationError(
            f"{where}: name filters take exactly 'filters' and 'default'; got {sorted(value)}"
        )
    pairs = value[FILTERS]
    if not isinstance(pairs, list | tuple) or not all(
        isinstance(p, list | tuple) and len(p) == 2 and isinstance(p[0], str) and p[0]
        for p in pairs
    ):
        raise ConfigurationError(
            f"{where}: 'filters' must be a list of [substring, value] pairs (non-empty substrings)"
        )
    return {
        FILTERS: [[sub, check_value(param, v, technique_name)] for sub, v in pairs],
        "default": check_value(param, value["default"], technique_name),
    }


def canonical_params(
    tech: Technique, params: Mapping[str, Any], n_inputs: int, *, joint_check: bool = True
) -> dict[str, Any]:
    """Validate ``params`` for ``n_inputs`` inputs, fill defaults, expand per-input scalars.

    Per-input parameters become a list of one (possibly layer-dependent) value per input;
    a top-level list for a per-input parameter is always read as one entry per input.

    Raises:
        ConfigurationError: unknown parameter, wrong count, or a value out of range.
    """
    if n_inputs < tech.min_inputs or (tech.max_inputs is not None and n_inputs > tech.max_inputs):
        wanted = (
            f"exactly {tech.min_inputs}"
            if tech.min_inputs == tech.max_inputs
            else f"at least {tech.min_inputs}"
            + (f" and at most {tech.max_inputs}" if tech.max_inputs else "")
        )
        raise ConfigurationError(f"{tech.name} takes {wanted} input models, got {n_inputs}")
    for name in params:
        tech.param(name)  # raises for unknown names
    out: dict[str, Any] = {}
    for param in tech.params:
        value = params.get(param.name, param.default)
        if param.per_input:
            if isinstance(value, list | tuple):
                if len(value) != n_inputs:
                    raise ConfigurationError(
                        f"{tech.name}: parameter '{param.name}' has {len(value)} values "
                        f"for {n_inputs} input models; give one per input (or one value for all)"
                    )
                out[param.name] = [check_value(param, v, tech.name) for v in value]
            else:
                out[param.name] = [check_value(param, value, tech.name)] * n_inputs
        else:
            out[param.name] = check_value(param, value, tech.name)
    if tech.check is not None and joint_check:
        tech.check(out, tech.name)
    return out


def searched_params(tech: Technique, params: Mapping[str, Any], n_inputs: int) -> dict[str, Any]:
    """Canonical params for a recipe the search made: defaults filled, the technique's
    ``repair`` applied, then every rule checked (a failure here is a bug in the search, not the
    user's mistake)."""
    fixed = canonical_params(tech, params, n_inputs, joint_check=False)
    if tech.repair is not None:
        fixed = tech.repair(fixed)
    return canonical_params(tech, fixed, n_inputs)


def resolved_params(
    tech: Technique, params: Mapping[str, Any], location: TensorLocation | None
) -> dict[str, Any]:
    """Canonical ``params`` resolved for one tensor location, keyed as the technique's function
    takes them (``lambda`` as ``lam``)."""
    kwargs: dict[str, Any] = {}
    for param in tech.params:
        value = params[param.name]
        key = "lam" if param.name == "lambda" else param.name
        kwargs[key] = (
            [resolve_value(v, location) for v in value]
            if param.per_input
            else resolve_value(value, location)
        )
    return kwargs


def apply_technique(
    tech: Technique,
    stack: Tensor,
    params: Mapping[str, Any],
    location: TensorLocation | None = None,
    generator: Generators = None,
    *,
    segments: Segments = None,
    out: Tensor | None = None,
    ranked: Tensor | None = None,
) -> Tensor:
    """Run ``tech`` on a stack ``(M, *shape)`` (task vectors if it needs a base) with canonical
    params.

    ``segments`` (segmented techniques only) splits the flattened rows into consecutive
    tensors; ``out`` receives the result when given; ``ranked`` (used by magnitude trims) holds
    the stack's magnitudes sorted within each segment.
    """
    kwargs = resolved_params(tech, params, location)
    if tech.randomized:
        kwargs["generator"] = generator
    if tech.ranked:
        kwargs["ranked"] = ranked
    if tech.segmented:
        return tech.fn(stack, segments=segments, out=out, **kwargs)
    if segments is not None and len(segments) > 1:
        raise ValueError(
            f"{tech.name} works on one tensor at a time, not on {len(segments)} segments"
        )
    result = tech.fn(stack, **kwargs)
    if out is None:
        return result
    return out.copy_(result.reshape(out.shape))
