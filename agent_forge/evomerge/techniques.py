"""Merge techniques: small pure functions over the tensors of one parameter name, and their registry.

Every technique works on one stack of same-shaped tensors at a time, in float32 (angles in
float64). Techniques that need a base model receive *task vectors* ``δᵢ = θᵢ − θ_base``
(shape ``(M, *shape)``) and return the merged task vector; the caller adds the base. The
others receive the models' tensors ``θᵢ`` and return the merged tensor.

Randomised techniques (DARE, DELLA) take a ``torch.Generator``; they never touch the global
RNG, so a recipe gives the same bytes in any order, process or worker.

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

from .exceptions import ConfigurationError, MergeError

# -- registry ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """One parameter of a technique.

    ``low``/``high`` bound valid values (inclusive); ``search`` is the range the evolution
    explores (within the valid one). ``per_input`` parameters take one value per input model.
    """

    name: str
    default: Any
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] | None = None
    per_input: bool = False
    search: tuple[float, float] | None = None

    @property
    def is_numeric(self) -> bool:
        return self.choices is None and not isinstance(self.default, bool)

    def check(self, value: Any, technique: str) -> Any:
        """Return the value in canonical type, or raise ConfigurationError naming what is allowed."""
        where = f"{technique}: parameter '{self.name}'"
        if self.choices is not None:
            if value not in self.choices:
                raise ConfigurationError(f"{where} = {value!r}; allowed: {', '.join(map(repr, self.choices))}")
            return value
        if isinstance(self.default, bool):
            if not isinstance(value, bool):
                raise ConfigurationError(f"{where} = {value!r}; allowed: true or false")
            return value
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ConfigurationError(f"{where} = {value!r}; must be a finite number")
        value = float(value)
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            raise ConfigurationError(f"{where} = {value!r} is out of range [{self.low}, {self.high}]")
        return value


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

    def param(self, name: str) -> Param:
        for param in self.params:
            if param.name == name:
                return param
        raise ConfigurationError(
            f"{self.name}: unknown parameter '{name}'{closest_names(name, [p.name for p in self.params])}; "
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
) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Register a technique function under ``name`` (see the module docstring for the contract)."""

    def register(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        if name in MERGE_TECHNIQUES:
            raise ValueError(f"technique {name!r} registered twice")
        summary = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        MERGE_TECHNIQUES[name] = Technique(
            name, fn, tuple(params), needs_base, randomized, min_inputs, max_inputs, paper, summary, check
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


# -- building blocks ------------------------------------------------------------------------------


def keep_top_magnitude(delta: Tensor, density: float) -> Tensor:
    """Zero all but the ``int(density·numel)`` largest-magnitude entries (TIES "trim").

    At least one entry survives when ``density > 0``. Uses ``topk``, never ``kthvalue``
    (hundreds of times slower on CUDA).
    """
    if density >= 1.0:
        return delta
    count = delta.numel()
    if density <= 0.0 or count == 0:
        return torch.zeros_like(delta)
    keep = max(1, int(density * count))
    index = torch.topk(delta.abs().reshape(-1), keep, sorted=False).indices
    mask = torch.zeros(count, dtype=torch.bool, device=delta.device)
    mask[index] = True
    return delta * mask.view_as(delta)


def drop_outliers_and_small(delta: Tensor, density: float, gamma: float) -> Tensor:
    """Model Breadcrumbs: drop the largest ``gamma`` fraction, then the smallest, keeping ``int(density·n)``.

    When ``density + gamma > 1`` fewer outliers are dropped so that ``density`` still remains;
    ``gamma = 0`` drops no outliers (the result equals the TIES trim).
    """
    if density >= 1.0:
        return delta
    count = delta.numel()
    keep = int(density * count)
    top = int(gamma * count)
    bottom = max(0, count - keep - top)
    order = torch.sort(delta.abs().reshape(-1), stable=True).indices  # ascending magnitude
    mask = torch.zeros(count, dtype=torch.bool, device=delta.device)
    mask[order[bottom : bottom + keep]] = True
    return delta * mask.view_as(delta)


def random_keep_mask(delta: Tensor, density: float, generator: torch.Generator | None) -> Tensor:
    """DARE: keep each entry independently with probability ``density``."""
    draws = torch.rand(delta.shape, generator=generator, device=delta.device, dtype=torch.float32)
    return draws < density


def della_keep_probabilities(delta: Tensor, density: float, epsilon: float) -> Tensor:
    """DELLA (MagPrune): per row, keep probabilities rise linearly with magnitude rank.

    The smallest entry of a row gets ``density − ε``, the largest ``density + ε``; a 1-D
    tensor is one row.
    """
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    width = rows.shape[1]
    ranks = rows.abs().argsort(dim=1, stable=True).argsort(dim=1).to(torch.float32)  # 0 … width-1
    spread = ranks / (width - 1) if width > 1 else torch.full_like(ranks, 0.5)
    probs = (density - epsilon) + 2.0 * epsilon * spread
    return probs.reshape(delta.shape)


def rescale_kept(delta: Tensor, kept: Tensor, mode: str, keep_prob: Tensor | float) -> Tensor:
    """Rescale surviving entries: ``paper`` divides by the keep probability (DARE/DELLA papers),
    ``l1`` restores the task vector's L1 norm, ``none`` leaves them."""
    if mode == "paper":
        return kept / keep_prob
    if mode == "l1":
        before, after = delta.abs().sum(), kept.abs().sum()
        if before < 1e-7 or after < 1e-7:
            return kept
        return kept * (before / after)
    return kept


def elect_sign(weighted: Tensor) -> Tensor:
    """TIES sign election: the sign of the weighted sum per entry; a zero sum counts as positive."""
    return torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0).to(weighted.dtype)


def combine_task_vectors(
    deltas: Tensor, weights: Sequence[float], *, lam: float, normalize: bool, sign_consensus: bool
) -> Tensor:
    """The generalised task-arithmetic core shared by TA, TIES, DARE, breadcrumbs and DELLA.

    ``weighted = wᵢ·δᵢ``. With sign consensus only entries whose sign agrees with the elected
    sign count, and ``normalize`` divides by the sum of the agreeing weights (a zero divisor
    becomes 1); without it, ``normalize`` divides by ``Σwᵢ``. The result is scaled by λ.
    """
    w = torch.tensor(weights, dtype=deltas.dtype, device=deltas.device).reshape(-1, *([1] * (deltas.dim() - 1)))
    weighted = deltas * w  # (M, *shape)
    if sign_consensus:
        agree = weighted.sign() == elect_sign(weighted)  # (M, *shape) bool
        mixed = (weighted * agree).sum(dim=0)
        divisor = (w * agree).sum(dim=0)
        divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    else:
        mixed = weighted.sum(dim=0)
        total = float(sum(weights))
        divisor = torch.tensor(1.0 if abs(total) < 1e-8 else total, dtype=deltas.dtype, device=deltas.device)
    if normalize:
        mixed = mixed / divisor
    return mixed * lam if lam != 1.0 else mixed


def _stack(parts: Sequence[Tensor]) -> Tensor:
    return torch.stack(list(parts))


# -- parameter tables ------------------------------------------------------------------------------

_BIG = 1e6
WEIGHT = Param("weight", 1.0, -_BIG, _BIG, per_input=True, search=(0.0, 1.0))
DENSITY = Param("density", 0.5, 0.0, 1.0, per_input=True, search=(0.1, 1.0))
LAMBDA = Param("lambda", 1.0, -_BIG, _BIG, search=(0.2, 1.5))
GAMMA = Param("gamma", 0.01, 0.0, 1.0, per_input=True, search=(0.0, 0.1))
EPSILON = Param("epsilon", 0.15, 0.0, 0.5, per_input=True, search=(0.01, 0.2))
RESCALE = Param("rescale", "paper", choices=("paper", "l1", "none"))


def _normalize(default: bool) -> Param:
    return Param("normalize", default)


def _check_della(params: dict[str, Any], name: str) -> None:
    for density, epsilon in zip(_as_list(params["density"]), _as_list(params["epsilon"])):
        if density < 1.0 and not (0.0 < density - epsilon and density + epsilon < 1.0):
            raise ConfigurationError(
                f"{name}: density ± epsilon must lie inside (0, 1); got density {density}, epsilon {epsilon}"
            )


def _repair_della(params: dict[str, Any]) -> dict[str, Any]:
    """Shrink each epsilon so that density ± epsilon stays inside (0, 1) (used by the search)."""

    def fit(density: Any, epsilon: Any) -> Any:
        if isinstance(density, list) and isinstance(epsilon, list) and len(density) == len(epsilon):
            return [fit(d, e) for d, e in zip(density, epsilon)]
        if isinstance(density, list):
            return min(fit(d, epsilon) for d in density)
        if isinstance(density, float) and isinstance(epsilon, float) and density < 1.0:
            return max(0.0, min(epsilon, density - 0.01, 0.99 - density))
        return epsilon

    out = dict(params)
    if isinstance(params.get("density"), list) and isinstance(params.get("epsilon"), list):
        out["epsilon"] = [fit(d, e) for d, e in zip(params["density"], params["epsilon"])]
    return out


def repair_params(technique: str, params: dict[str, Any]) -> dict[str, Any]:
    """Params moved into the technique's joint constraints (e.g. DELLA's density ± epsilon)."""
    return _repair_della(params) if technique in ("della", "della_linear") else params


def _as_list(value: Any) -> list[float]:
    """Flatten a (possibly layer-dependent, possibly per-input) value into its leaf numbers."""
    if isinstance(value, Mapping):
        return [leaf for v in value.values() for leaf in _as_list(v)]
    if isinstance(value, list | tuple):
        return [leaf for v in value for leaf in _as_list(v)]
    return [value]


# -- techniques without a base ----------------------------------------------------------------------


@technique("linear", params=[WEIGHT, _normalize(True)], needs_base=False, min_inputs=1,
           paper="arXiv:2203.05482 (model soups)")
def linear(tensors: Tensor, *, weight: Sequence[float], normalize: bool) -> Tensor:
    """Weighted average: Σ wᵢθᵢ, divided by Σ wᵢ when ``normalize``."""
    total = float(sum(weight))
    if normalize and abs(total) < 1e-12:
        raise MergeError("linear: the weights sum to zero, so they cannot be normalised; "
                         "change the weights or set normalize: false")
    out = torch.zeros_like(tensors[0])
    for tensor, w in zip(tensors, weight):
        out.add_(tensor, alpha=w)
    return out / total if normalize else out


@technique("slerp", params=[Param("t", 0.5, 0.0, 1.0, search=(0.0, 1.0))], needs_base=False,
           min_inputs=2, max_inputs=2, paper="Shoemake 1985; used for model merging by mergekit")
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


@technique("passthrough", needs_base=False, min_inputs=1, max_inputs=1)
def passthrough(tensors: Tensor) -> Tensor:
    """The tensor of the one input, unchanged."""
    return tensors[0]


# -- task-vector techniques (need a base; receive δᵢ, return the merged δ) ----------------------------


@technique("task_arithmetic", params=[WEIGHT, LAMBDA, _normalize(False)], needs_base=True,
           paper="arXiv:2212.04089")
def task_arithmetic(deltas: Tensor, *, weight: Sequence[float], lam: float, normalize: bool) -> Tensor:
    """Task arithmetic: λ·Σ wᵢδᵢ (÷ Σ wᵢ when ``normalize``)."""
    return combine_task_vectors(deltas, weight, lam=lam, normalize=normalize, sign_consensus=False)


@technique("ties", params=[WEIGHT, DENSITY, LAMBDA, _normalize(True)], needs_base=True,
           paper="arXiv:2306.01708")
def ties(deltas: Tensor, *, weight: Sequence[float], density: Sequence[float], lam: float, normalize: bool) -> Tensor:
    """TIES: trim each task vector, elect a sign per entry, average the agreeing entries."""
    trimmed = _stack([keep_top_magnitude(d, k) for d, k in zip(deltas, density)])  # (M, *shape)
    return combine_task_vectors(trimmed, weight, lam=lam, normalize=normalize, sign_consensus=True)


def _dare(deltas: Tensor, density: Sequence[float], rescale: str, generator: torch.Generator | None) -> Tensor:
    parts = []
    for delta, keep in zip(deltas, density):
        if keep >= 1.0:
            parts.append(delta)
            continue
        kept = delta * random_keep_mask(delta, keep, generator)
        parts.append(rescale_kept(delta, kept, rescale, keep) if keep > 0 else torch.zeros_like(delta))
    return _stack(parts)


@technique("dare_linear", params=[WEIGHT, DENSITY, LAMBDA, _normalize(False), RESCALE], needs_base=True,
           randomized=True, paper="arXiv:2311.03099")
def dare_linear(deltas: Tensor, *, weight: Sequence[float], density: Sequence[float], lam: float,
                normalize: bool, rescale: str, generator: torch.Generator | None = None) -> Tensor:
    """DARE: drop entries at random (keep ``density``), rescale the rest, then task arithmetic."""
    dropped = _dare(deltas, density, rescale, generator)
    return combine_task_vectors(dropped, weight, lam=lam, normalize=normalize, sign_consensus=False)


@technique("dare_ties", params=[WEIGHT, DENSITY, LAMBDA, _normalize(True), RESCALE], needs_base=True,
           randomized=True, paper="arXiv:2311.03099")
def dare_ties(deltas: Tensor, *, weight: Sequence[float], density: Sequence[float], lam: float,
              normalize: bool, rescale: str, generator: torch.Generator | None = None) -> Tensor:
    """DARE-TIES: DARE's random drop and rescale, then TIES sign election."""
    dropped = _dare(deltas, density, rescale, generator)
    return combine_task_vectors(dropped, weight, lam=lam, normalize=normalize, sign_consensus=True)


@technique("breadcrumbs", params=[WEIGHT, Param("density", 0.9, 0.0, 1.0, per_input=True, search=(0.5, 1.0)),
                                  GAMMA, LAMBDA, _normalize(False)], needs_base=True, paper="arXiv:2312.06795")
def breadcrumbs(deltas: Tensor, *, weight: Sequence[float], density: Sequence[float], gamma: Sequence[float],
                lam: float, normalize: bool) -> Tensor:
    """Model Breadcrumbs: drop outliers and small entries of each task vector, then task arithmetic."""
    kept = _stack([drop_outliers_and_small(d, k, g) for d, k, g in zip(deltas, density, gamma)])
    return combine_task_vectors(kept, weight, lam=lam, normalize=normalize, sign_consensus=False)


@technique("breadcrumbs_ties", params=[WEIGHT, Param("density", 0.9, 0.0, 1.0, per_input=True, search=(0.5, 1.0)),
                                       GAMMA, LAMBDA, _normalize(True)], needs_base=True, paper="arXiv:2312.06795")
def breadcrumbs_ties(deltas: Tensor, *, weight: Sequence[float], density: Sequence[float],
                     gamma: Sequence[float], lam: float, normalize: bool) -> Tensor:
    """Model Breadcrumbs with TIES sign election."""
    kept = _stack([drop_outliers_and_small(d, k, g) for d, k, g in zip(deltas, density, gamma)])
    return combine_task_vectors(kept, weight, lam=lam, normalize=normalize, sign_consensus=True)


def _della(deltas: Tensor, density: Sequence[float], epsilon: Sequence[float], rescale: str,
           generator: torch.Generator | None) -> Tensor:
    parts = []
    for delta, keep, eps in zip(deltas, density, epsilon):
        if keep >= 1.0:
            parts.append(delta)
            continue
        probs = della_keep_probabilities(delta, keep, eps)
        draws = torch.rand(delta.shape, generator=generator, device=delta.device, dtype=torch.float32)
        kept = delta * (draws < probs)
        parts.append(rescale_kept(delta, kept, rescale, probs))
    return _stack(parts)


_DELLA_PARAMS = [WEIGHT, DENSITY, EPSILON, LAMBDA]


@technique("della", params=[*_DELLA_PARAMS, _normalize(True), RESCALE], needs_base=True, randomized=True,
           paper="arXiv:2406.11617", check=_check_della)
def della(deltas: Tensor, *, weight: Sequence[float], density: Sequence[float], epsilon: Sequence[float],
          lam: float, normalize: bool, rescale: str, generator: torch.Generator | None = None) -> Tensor:
    """DELLA: magnitude-ranked random drop (rescaled by 1/pᵢ), then TIES sign election."""
    kept = _della(deltas, density, epsilon, rescale, generator)
    return combine_task_vectors(kept, weight, lam=lam, normalize=normalize, sign_consensus=True)


@technique("della_linear", params=[*_DELLA_PARAMS, _normalize(False), RESCALE], needs_base=True,
           randomized=True, paper="arXiv:2406.11617", check=_check_della)
def della_linear(deltas: Tensor, *, weight: Sequence[float], density: Sequence[float],
                 epsilon: Sequence[float], lam: float, normalize: bool, rescale: str,
                 generator: torch.Generator | None = None) -> Tensor:
    """DELLA without sign election: magnitude-ranked random drop, then task arithmetic."""
    kept = _della(deltas, density, epsilon, rescale, generator)
    return combine_task_vectors(kept, weight, lam=lam, normalize=normalize, sign_consensus=False)


@technique("model_stock", params=[Param("filter_wise", False)], needs_base=True, min_inputs=2,
           paper="arXiv:2403.19522")
def model_stock(deltas: Tensor, *, filter_wise: bool) -> Tensor:
    """Model Stock: move from the base towards the mean by t = N·cos / (1 + (N−1)·cos).

    ``cos`` is the mean pairwise cosine of the task vectors (per row with ``filter_wise``).
    The result is ``t·mean(θᵢ) + (1−t)·θ_base``, returned here as ``t·mean(δᵢ)``. When
    ``cos ≤ 0`` the task vectors share no direction and the formula would step away from the
    base (or divide by zero at cos = −1/(N−1)); we then take t = 0 and keep the base.
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
    cos = torch.stack(cosines).mean(dim=0).clamp(min=0.0)  # (rows,)
    t = count * cos / (1 + (count - 1) * cos)
    mean = deltas.mean(dim=0)
    return t.reshape(-1, *([1] * (mean.dim() - 1))) * mean


# -- parameter values that vary by layer ------------------------------------------------------------

COMPONENTS = ("embeddings", "attention", "mlp", "norms", "head")


@dataclass(frozen=True)
class TensorLocation:
    """Where a tensor sits in the model, for layer-dependent parameters.

    ``position`` runs 0 (embeddings) … ``layers + 1`` (final norm and head); layer ``i`` is
    position ``i + 1``.
    """

    component: str
    position: int
    layers: int

    def group(self, groups: int) -> int:
        """Index of this tensor's group when the positions are split into ``groups`` equal runs."""
        return min(groups - 1, self.position * groups // (self.layers + 2))


def resolve_value(value: Any, location: TensorLocation | None) -> Any:
    """The scalar a layer-dependent value takes at ``location``.

    A value is a scalar; a list over layer groups (``[v_0, …, v_{n-1}]`` splits the positions
    into n equal runs); or a mapping from component (``embeddings``, ``attention``, ``mlp``,
    ``norms``, ``head``, ``default``) to one of those.
    """
    if isinstance(value, Mapping):
        key = location.component if location is not None else "default"
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
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(COMPONENTS) - {"default"})
        if unknown:
            raise ConfigurationError(
                f"{technique_name}: parameter '{param.name}' has unknown component {unknown[0]!r}; "
                f"allowed: {', '.join(COMPONENTS)}, default"
            )
        return {k: check_value(param, v, technique_name) for k, v in sorted(value.items())}
    if isinstance(value, list | tuple):
        if not value:
            raise ConfigurationError(f"{technique_name}: parameter '{param.name}' is an empty list")
        return [param.check(v, technique_name) for v in value]
    return param.check(value, technique_name)


def canonical_params(tech: Technique, params: Mapping[str, Any], n_inputs: int, *, joint_check: bool = True
                     ) -> dict[str, Any]:
    """Validate ``params`` for ``n_inputs`` inputs, fill defaults, expand per-input scalars.

    Per-input parameters become a list of one (possibly layer-dependent) value per input;
    a top-level list for a per-input parameter is always read as one entry per input.

    Raises:
        ConfigurationError: unknown parameter, wrong count, or a value out of range.
    """
    if n_inputs < tech.min_inputs or (tech.max_inputs is not None and n_inputs > tech.max_inputs):
        wanted = (f"exactly {tech.min_inputs}" if tech.min_inputs == tech.max_inputs
                  else f"at least {tech.min_inputs}" + (f" and at most {tech.max_inputs}" if tech.max_inputs else ""))
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
                        f"{tech.name}: parameter '{param.name}' has {len(value)} values for {n_inputs} "
                        "input models; give one per input (or one value for all)"
                    )
                out[param.name] = [check_value(param, v, tech.name) for v in value]
            else:
                out[param.name] = [check_value(param, value, tech.name)] * n_inputs
        else:
            out[param.name] = check_value(param, value, tech.name)
    if tech.check is not None and joint_check:
        tech.check(out, tech.name)
    return out


def apply_technique(
    tech: Technique,
    stack: Tensor,
    params: Mapping[str, Any],
    location: TensorLocation | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Run ``tech`` on a stack ``(M, *shape)`` (task vectors if it needs a base) with canonical params."""
    kwargs: dict[str, Any] = {}
    for param in tech.params:
        value = params[param.name]
        key = "lam" if param.name == "lambda" else param.name
        kwargs[key] = ([resolve_value(v, location) for v in value] if param.per_input
                       else resolve_value(value, location))
    if tech.randomized:
        kwargs["generator"] = generator
    return tech.fn(stack, **kwargs)
