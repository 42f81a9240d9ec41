"""Fused kernels for resident task-vector merges (task arithmetic, TIES, DARE, DARE-TIES).

Evaluating a candidate writes its tensors into a resident model (:meth:`.merger.
AdvancedModelMerger.materialize`). Done with eager torch, TIES is some twenty passes over the
task vectors plus a threshold search per tensor, and DARE draws fresh random numbers for every
entry; here each candidate is **one** element-wise pass per batch of tensors, compiled by
``torch.compile`` into a single loop (C++/OpenMP on CPUs, Triton on GPUs), over inputs
prepared once per run:

- **Trim rows** (TIES). The pool keeps each task vector's magnitude order per tensor
  (:func:`magnitude_order`), so a tensor's trim threshold at any density is a lookup. A batch
  of tensors is laid out as rows of a width that divides every tensor's size
  (:class:`TrimRows`), each row inside one tensor, and the kernel takes a threshold (and a
  tie bound) per row and input: one call for many tensors of different thresholds, reading
  nothing per entry but the task vectors and the base. (One call per tensor cost ~2× more on
  a 95M-parameter model: call overheads and short loops.)
- **Draws** (DARE). A randomised merge draws from generators keyed by its seed and inputs, not
  by its parameters (:func:`.graph.draw_hash`), so the draws of a seed are computed once and
  reused by every candidate that differs only in weights or densities. They are 10-bit levels,
  three inputs to an int32 word (:func:`.sparsify.draw_words`): 4 bytes per entry to read for
  three inputs, where float32 uniforms would take 12, and the ``paper`` rescale is a factor of
  the weight (:func:`.sparsify.dare_weights`), not a division per entry.

The kernel mirrors the streaming code's arithmetic (:mod:`.combine`, :func:`.sparsify.
dare_drop`) operation for operation: every step is an exactly rounded float32 operation in the
same order, and inductor compiles without FMA contraction or unsafe math, so the fused result
equals the streamed one bit for bit. Because that rests on a compiler, :class:`FusedKernels`
checks it: the first call of every kernel variant, and every call that compiled a graph, is
compared with the eager path, and any difference (or a compiler that is missing or fails)
turns fusion off for the run with one warning. The check has caught one real fault: on torch
2.13, AOTAutograd's on-disk cache handed back a kernel variant that no longer wrote into
``out`` (a view of the resident model) — so kernels are compiled with that cache off
(inductor's own code cache stays on). ``fused_kernels: auto`` fuses where the one-off compile
(seconds) pays back: on GPUs and for resident models of at least :data:`AUTO_MIN_ELEMENTS`
parameters.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .sparsify import dare_weights, keep_count, keep_level, level_of
from .techniques import get_technique

logger = logging.getLogger(__name__)

#: ``fused_kernels: auto`` fuses on CPUs from this many resident parameters per model.
AUTO_MIN_ELEMENTS = 32_000_000
#: Compiled variants of the kernel (modes, normalisation, consensus, shapes) kept at once.
_VARIANTS = 64

# -- TIES trims by row -------------------------------------------------------------------------

#: Rows of the TIES kernel's layout hold at least this many entries where the tensors allow
#: (one AVX-512 vector), and at most :data:`MAX_ROW` (so that even one tensor has rows to
#: share among threads: inductor parallelises over rows).
MIN_ROW = 16
MAX_ROW = 4096


def magnitude_order(values: Tensor) -> Tensor:
    """Flat indices of 1-D float32 ``values`` by descending magnitude, equal magnitudes by
    ascending index.

    Sorts the negated bit patterns of ``|values|`` (for non-negative floats the bit pattern
    orders like the value) ascending and stable, which torch does ~8× faster than a
    descending stable sort of the floats.
    """
    return torch.sort(torch.neg(values.abs().view(torch.int32)), stable=True).indices


def row_pieces(sizes: Sequence[int]) -> list[tuple[int, int]]:
    """Consecutive tensors of ``sizes`` grouped into ``(first, stop)`` runs whose sizes share
    a divisor of at least :data:`MIN_ROW` (a tensor smaller than that stays alone), so each
    run is one kernel call over whole rows."""
    pieces: list[tuple[int, int]] = []
    common = 0
    for index, size in enumerate(sizes):
        joined = math.gcd(common, size)
        if pieces and joined >= MIN_ROW:
            pieces[-1] = (pieces[-1][0], index + 1)
            common = joined
        else:
            pieces.append((index, index + 1))
            common = size
    return pieces


@functools.lru_cache(maxsize=256)
def row_width(common: int, total: int) -> int:
    """The row length for tensors whose sizes share the divisor ``common``, ``total`` entries
    in all: the largest divisor of ``common`` up to :data:`MAX_ROW` that leaves at least two
    rows, preferring one of at least :data:`MIN_ROW`."""
    fitting = [d for d in range(1, min(common, MAX_ROW) + 1) if common % d == 0]
    two_rows = [d for d in fitting if total // d >= 2] or [1]
    wide = [d for d in two_rows if d >= MIN_ROW]
    return max(wide or two_rows)


@dataclass(frozen=True)
class TrimRows:
    """One kernel call's TIES layout: consecutive tensors as ``(R, width)`` rows, each row
    inside one tensor, so a trim threshold per row and input is a trim per tensor.

    The per-tensor arithmetic is numpy (a few µs an operation, where torch takes ~15 µs on
    tensors this small): only the lookups into the task vectors and orders, and the finished
    per-row tables, touch the device.
    """

    width: int
    #: The tensors' sizes, each one's first column in the run, its number of rows and its
    #: first row (int64).
    sizes: np.ndarray
    starts: np.ndarray
    rows: np.ndarray
    first_rows: np.ndarray
    #: For each row, the flat index (within its tensor) of its first entry.
    row_starts: np.ndarray

    @classmethod
    def of(cls, sizes: Sequence[int]) -> TrimRows:
        total = sum(sizes)
        width = row_width(functools.reduce(math.gcd, sizes), total)
        size_array = np.asarray(sizes, dtype=np.int64)
        counts = size_array // width
        first_rows = np.cumsum(counts) - counts
        return cls(
            width=width,
            sizes=size_array,
            starts=np.cumsum(size_array) - size_array,
            rows=counts,
            first_rows=first_rows,
            row_starts=(np.arange(total // width) - np.repeat(first_rows, counts)) * width,
        )

    def cuts(self, orders: Tensor, values: Tensor, density: Sequence[float]) -> TrimCuts:
        """TIES's trim of every tensor by input at ``density`` (one per input), from the
        task vectors ``values`` ``(M, N)`` and their per-tensor :func:`magnitude_order`
        ``orders`` ``(M, N)`` (indices within each tensor), as thresholds per row.

        A tensor keeps its ``keep`` largest entries: those of magnitude ≥ t, the ``keep``-th
        largest. Where the next entry in the order has magnitude t too, the tie is split (equal
        magnitudes stay by lowest index): the rows up to the last kept entry's keep ``≥ t``, the
        rows after it ``> t`` (``≥`` the next float32). Only when a dropped equal entry shares
        the last kept entry's row does a row need the per-column bound (``cut_tie``). A tie at
        t = 0 splits nothing that matters: kept zeros add nothing and are never counted as
        agreeing, so every zero may stay.
        """
        sizes, starts = self.sizes, self.starts
        keep = np.array([[keep_count(d, int(n)) for n in sizes] for d in density], np.int64)
        last = sizes - 1
        picked = _lookup(orders, starts + np.maximum(keep - 1, 0)).astype(np.int64)
        following = _lookup(orders, starts + np.minimum(keep, last)).astype(np.int64)
        found = np.abs(_lookup(values, np.concatenate([starts + picked, starts + following], 1)))
        threshold, next_size = np.split(found, 2, axis=1)
        split = (keep > 0) & (keep < sizes) & (threshold > 0) & (next_size == threshold)
        threshold[keep >= sizes] = 0.0  # keep all: no cut
        threshold[keep == 0] = np.inf  # keep none
        per_row = np.repeat(threshold, self.rows, axis=1)
        if split.any():
            last_row = picked // self.width
            if (split & (following // self.width == last_row)).any():  # a split inside a row
                bound = np.where(keep == 0, -1, np.where(split, picked, last))
                bounds = np.repeat(bound, self.rows, axis=1) - self.row_starts
                return TrimCuts(_table(per_row, values), _table(bounds.astype(np.int32), values))
            above = np.nextafter(threshold, np.float32(np.inf))
            for i, t in zip(*np.nonzero(split), strict=True):  # the rows after the last kept
                after = self.first_rows[t] + last_row[i, t] + 1
                per_row[i, after : self.first_rows[t] + self.rows[t]] = above[i, t]
        return TrimCuts(_table(per_row, values))


@dataclass(frozen=True)
class TrimCuts:
    """Per input and row of a :class:`TrimRows` layout: TIES keeps ``|δ| ≥ threshold``; with
    ``bounds`` (a tie split inside a row), ``|δ| > threshold`` and, at equality, the entries
    whose column is ``≤ bound`` (equal magnitudes stay by lowest index)."""

    thresholds: Tensor  # (M, R, 1) float32
    bounds: Tensor | None = None  # (M, R, 1) int32

    @property
    def split(self) -> bool:
        """Whether the kernel needs the per-column bounds (mode ``cut_tie``)."""
        return self.bounds is not None


def _lookup(rows: Tensor, index: np.ndarray) -> np.ndarray:
    """``rows[i, index[i, t]]`` for every input i and column t, as numpy."""
    if rows.device.type == "cpu":
        return rows.numpy()[np.arange(rows.shape[0])[:, None], index]
    return torch.gather(rows, 1, torch.from_numpy(index).to(rows.device)).cpu().numpy()


def _table(per_row: np.ndarray, like: Tensor) -> Tensor:
    """A per-row table ``(M, R)`` as the kernel's ``(M, R, 1)`` operand on ``like``'s device."""
    return torch.from_numpy(np.ascontiguousarray(per_row[..., None])).to(like.device)


# -- the kernel ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelPlan:
    """One resident task-vector merge, as the fused kernel computes it.

    ``modes[i]`` says what happens to input i's task vector before weighting: ``all`` (kept
    whole), ``cut`` (TIES trim: kept where ``|δ| ≥`` its row's threshold, ``cuts``),
    ``cut_tie`` (the same when some threshold's ties are split: ``|δ| >`` the threshold, or
    equal to it at a column ``≤`` the row's bound), or ``draw`` (DARE: kept where the input's
    drawn level is below ``density``, here the keep level :func:`.sparsify.keep_level`).
    Inputs enter the sum weighted by ``weights``; the normaliser is made of ``shares`` (the
    weights, unless DARE folded 1/p into them): without sign consensus the weighted sum is
    divided by ``divisor`` (their sum) when ``normalize``.
    """

    modes: tuple[str, ...]
    density: tuple[float, ...]
    weights: tuple[float, ...]
    lam: float
    normalize: bool
    consensus: bool
    divisor: float = 1.0
    shares: tuple[float, ...] = ()
    cuts: TrimCuts | None = None

    def arguments(self) -> tuple[Any, ...]:
        """The plan as :func:`merge_kernel`'s arguments after its tensors."""
        cuts = self.cuts
        return (
            self.modes,
            list(self.density) if cuts is None else cuts.thresholds,
            list(self.weights),
            list(self.shares or self.weights),
            [0] * len(self.modes) if cuts is None or cuts.bounds is None else cuts.bounds,
            self.lam,
            self.divisor,
            self.normalize,
            self.consensus,
        )

    @property
    def variant(self) -> tuple[Any, ...]:
        """What a compiled kernel specialises on (float values are not part of it)."""
        return (self.modes, self.normalize, self.consensus)


def fusable(technique: str, params: Mapping[str, Any]) -> bool:
    """Whether a fused kernel computes ``technique`` with these parameters: the registry's
    ``fusion`` says how, and random trims fuse only with ``rescale`` ``paper`` or ``none``."""
    fusion = get_technique(technique).fusion
    if fusion is None:
        return False
    return fusion.trim != "random" or params.get("rescale") in ("paper", "none")


def plan_for(
    technique: str, values: Mapping[str, Any], cuts: TrimCuts | None = None
) -> KernelPlan | None:
    """The kernel plan for ``technique`` with resolved ``values`` (None: not fusable); a
    magnitude trim (TIES) needs the ``cuts`` of its tensors (:meth:`TrimRows.cuts`).

    Every input of a plan takes the same mode — a density of 1 keeps everything through a zero
    threshold or the top level — so a technique has one or two kernel variants, not one per
    combination of inputs' modes (each variant compiles, at least once).
    """
    fusion = get_technique(technique).fusion
    if not fusable(technique, values) or (fusion.trim == "magnitude" and cuts is None):
        return None
    weights = shares = tuple(float(w) for w in values["weight"])
    count = len(weights)
    density = tuple(float(d) for d in values.get("density", [1.0] * count))
    if fusion.trim == "magnitude":
        assert cuts is not None
        modes = ("cut_tie" if cuts.split else "cut",) * count
    elif fusion.trim == "random":
        weights = tuple(dare_weights(shares, density, values["rescale"]))
        density = tuple(float(keep_level(d)) for d in density)
        modes = ("draw",) * count  # level 2¹⁰ keeps every entry
    else:
        modes = ("all",) * count
    total = float(sum(shares))
    if values["normalize"] and not fusion.consensus and abs(total) < 1e-8:
        return None  # weights summing to zero cannot divide: the eager path says so (or copes)
    return KernelPlan(
        modes=modes,
        density=density,
        weights=weights,
        lam=float(values.get("lam", 1.0)),
        normalize=bool(values["normalize"]),
        consensus=fusion.consensus,
        divisor=1.0 if abs(total) < 1e-8 else total,
        shares=shares,
        cuts=cuts if fusion.trim == "magnitude" else None,
    )


def merge_kernel(
    deltas: Tensor,
    base: Tensor | None,
    draws: Tensor | None,
    out: Tensor,
    modes: tuple[str, ...],
    density: Any,
    weights: list[float],
    shares: list[float],
    last: Any,
    lam: float,
    divisor: float,
    normalize: bool,
    consensus: bool,
) -> None:
    """``out = base + λ·combine(wᵢ·sparsifyᵢ(δᵢ))`` element by element (eager or compiled);
    without a base (linear) the rows are the models' tensors and nothing is added. ``draws``
    are DARE's draw words (:func:`.sparsify.draw_words`). For TIES the operands are laid
    out as rows (``deltas`` ``(M, R, C)``, ``base`` and ``out`` ``(R, C)``) and ``density`` and
    ``last`` are the per-row thresholds and tie bounds ``(M, R, 1)`` (:class:`TrimCuts`);
    otherwise the operands are flat and ``density`` a float per input.

    The operations and their order are those of :class:`.combine._SumBlock` /
    :class:`.combine._ConsensusBlock` after :func:`.sparsify.dare_drop` or the TIES trim; where
    a step differs in form it gives the same float32 values (e.g. ``where(s ≥ 0, 1, −1)`` for
    ``sign(sign(s) + ½)``, ``where(d = 0, 1, d)`` for the zero-divisor fix).
    """
    ys = []
    for i, mode in enumerate(modes):
        x = deltas[i]
        if mode == "cut":  # 0·x, not +0, for a dropped entry: faster, and under the sign
            x = (torch.abs(x) >= density[i]).to(x.dtype) * x  # consensus its sign never counts
        elif mode == "cut_tie":
            size = torch.abs(x)
            index = torch.arange(x.shape[-1], device=x.device, dtype=torch.int32)
            kept = (size > density[i]) | ((size == density[i]) & (index <= last[i]))
            x = kept.to(x.dtype) * x
        elif mode == "draw":
            assert draws is not None
            level = level_of(draws, i).to(x.dtype)  # float32: exact, vectorised
            x = (level < density[i]).to(x.dtype) * x
        ys.append(x * weights[i])
    total = ys[0]
    for y in ys[1:]:
        total = total + y
    if consensus:
        sign = torch.where(total >= 0, 1.0, -1.0)
        agreeing = [torch.clamp_min(y * sign, 0.0) for y in ys]
        result = agreeing[0]
        for part in agreeing[1:]:
            result = result + part
        result = result * sign
        if normalize:
            # (a > 0)·w, not where(a > 0, w, 0): torch.where bakes a Python scalar into the
            # graph, so every new weight would compile a new kernel
            share = (agreeing[0] > 0).to(result.dtype) * shares[0]
            for part, weight in zip(agreeing[1:], shares[1:], strict=True):
                share = share + (part > 0).to(result.dtype) * weight
            result = result / torch.where(share == 0, 1.0, share)
    else:
        result = total / divisor if normalize else total
    out.copy_(result * lam if base is None else result * lam + base)


# -- compile, check, fall back ------------------------------------------------------------------


def _compile(on_compile: Callable[[], None] = lambda: None) -> Callable[..., None]:
    """The compiled kernel (inductor), calling ``on_compile`` for every graph it compiles.

    Two process-wide torch settings change, both only loosening: dynamo may keep up to
    :data:`_VARIANTS` variants of a function (modes × static or dynamic shapes), and
    AOTAutograd's on-disk cache is off (see the module docstring); setting them per call
    would cost ~25 µs a call. Weights, densities and thresholds are traced as dynamic scalars,
    so new values reuse a variant: at most two compiles per variant (the first call's static
    shapes, then dynamic ones).
    """
    from torch._inductor.compile_fx import compile_fx

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, _VARIANTS)
    torch._functorch.config.enable_autograd_cache = False

    def inductor(graph: Any, example_inputs: Any) -> Any:
        on_compile()
        return compile_fx(graph, example_inputs)

    return torch.compile(merge_kernel, backend=inductor)


def wanted(setting: str, device: torch.device, resident_elements: int) -> bool:
    """Whether ``fused_kernels: setting`` fuses for this device and resident model size."""
    if setting == "on":
        return True
    if setting == "off":
        return False
    return device.type == "cuda" or resident_elements >= AUTO_MIN_ELEMENTS


class FusedKernels:
    """The run's compiled kernels; each variant, and each graph compiled, is checked against
    the eager path on its first call."""

    def __init__(self) -> None:
        self.enabled = True
        #: Merges computed by a fused kernel so far.
        self.calls = 0
        #: Graphs compiled so far (a variant's first call, and its recompile for dynamic shapes).
        self.compiles = 0
        self._compiled: Callable[..., None] | None = None
        self._checked: set[tuple[Any, ...]] = set()

    def _count_compile(self) -> None:
        self.compiles += 1

    def run(
        self,
        plan: KernelPlan,
        deltas: Tensor,
        base: Tensor | None,
        out: Tensor,
        *,
        draws: Tensor | None,
        reference: Callable[[Tensor], Tensor],
    ) -> bool:
        """Compute ``plan`` into ``out``; False (``out`` untouched) when fusion is off.

        ``reference(scratch)`` computes the same values the eager way; the first call of each
        variant, and any call that compiled a graph, compares against it and turns fusion off
        on any difference.
        """
        if not self.enabled:
            return False
        args = (deltas, base, draws, out, *plan.arguments())
        compiled = self.compiles
        try:
            if self._compiled is None:
                self._compiled = _compile(self._count_compile)
            self._compiled(*args)
        except Exception as error:  # a missing or failing compiler: the eager path stays
            self._disable(f"torch.compile failed ({type(error).__name__}: {error})")
            return False
        variant = (*plan.variant, out.storage_offset() == 0)  # views at an offset: own check
        if variant not in self._checked or self.compiles != compiled:
            expected = reference(torch.empty_like(out)).view(out.shape)
            if not torch.equal(expected.view(torch.int32), out.view(torch.int32)):
                out.copy_(expected)
                self._disable("the compiled kernel's bits differ from the eager path")
                return True
            self._checked.add(variant)
        self.calls += 1
        return True

    def _disable(self, why: str) -> None:
        self.enabled = False
        logger.warning("fused merge kernels are off for this run: %s; using eager torch", why)
