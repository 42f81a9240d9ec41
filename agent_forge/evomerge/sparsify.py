"""Sparsifiers of task vectors: exact magnitude trims (TIES, breadcrumbs), random drops (DARE,
DELLA) and their rescaling.

Shapes: a *stack* is ``(M, N)`` — M task vectors δᵢ, each the flattening of one tensor or of
several consecutive tensors (*segments*, sizes summing to N). Everything per tensor (trim
thresholds, random draws) is done per segment, so a batch of tensors gives the same bits as
the tensors one at a time.

A trim is a :class:`MagnitudeCut`: a threshold per piece of the row, applied block by block
with ``hardshrink`` by the task-vector core (:mod:`.combine`), so no trimmed copy is written.
It keeps exactly ``k`` entries; ties at the threshold magnitude keep the lowest flat indices
first. The threshold is exact. On CPU a strided sample brackets the k-th largest magnitude,
one pass (numpy, in spans on threads) counts the entries below the bracket and gathers those
inside it, and ``numpy.partition`` (introselect) finds it in that ~2% band; a tensor of at
most :data:`EXACT_SELECT` entries, or a sample that missed, is partitioned whole. On other
devices the threshold comes from ``topk`` — never ``kthvalue``, ~500× slower on CUDA.
"""

from __future__ import annotations

import bisect
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .blockwise import blocks, parallel_map, per_thread, scratch, spans

logger = logging.getLogger(__name__)

#: Up to this many elements a trim threshold comes from one exact partition of all magnitudes.
EXACT_SELECT = 1 << 17
#: Magnitudes sampled to bracket the threshold of a larger tensor.
SAMPLE = 1 << 16
#: Select with torch (``topk``, as on GPUs) on CPU too; tests set it to check that path.
TORCH_SELECT = False
_KEEP_ALL = -math.inf
_DROP_ALL = math.inf


def segment_starts(total: int, segments: Sequence[int] | None) -> list[tuple[int, int]]:
    """``(start, size)`` of each segment; ``None`` is one segment of ``total``."""
    sizes = [total] if segments is None else list(segments)
    if sum(sizes) != total:
        raise ValueError(f"segments {sizes} do not add up to {total} elements")
    starts = [0, *np.cumsum(sizes[:-1]).tolist()] if sizes else []
    return list(zip(starts, sizes, strict=True))


# -- magnitude trims -------------------------------------------------------------------------------


@dataclass(frozen=True)
class MagnitudeCut:
    """Which entries of one flattened task vector a magnitude trim keeps.

    Entry j is kept iff ``|x_j| > bounds[p]`` for the piece p that holds j; piece p covers
    ``[starts[p], starts[p + 1])`` (the last one runs to the end). A bound of −∞ keeps the
    whole piece, +∞ drops it.
    """

    starts: tuple[int, ...]
    bounds: tuple[float, ...]

    def apply(self, x: Tensor, out: Tensor, offset: int = 0) -> Tensor:
        """Kept entries of ``x`` (flat elements from ``offset``), zeros elsewhere, into ``out``."""
        stop = offset + x.numel()
        first = bisect.bisect_right(self.starts, offset) - 1
        last = bisect.bisect_left(self.starts, stop) - 1
        if first == last:
            return _keep_above(x, out, self.bounds[first])
        for p in range(first, last + 1):
            lo = max(self.starts[p], offset) - offset
            hi = (self.starts[p + 1] if p < last else stop) - offset
            _keep_above(x[lo:hi], out[lo:hi], self.bounds[p])
        return out


def _keep_above(x: Tensor, out: Tensor, bound: float) -> Tensor:
    """``out = x where |x| > bound, else 0`` (``hardshrink``)."""
    if bound == _KEEP_ALL:
        return out.copy_(x)
    if bound == _DROP_ALL:
        return out.zero_()
    return torch.hardshrink(x, bound, out=out)


def top_magnitude_cut(
    x: Tensor, keep: int, offset: int = 0, ranked: Tensor | None = None
) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Pieces keeping exactly the ``keep`` largest |x| of a 1-D ``x`` (placed at ``offset``).

    Ties at the threshold magnitude t are broken by position: the lowest flat indices are kept
    first. So the cut is ``|x| ≥ t`` up to the last kept tie and ``|x| > t`` after it. When
    t = 0 everything is kept: the extra entries are zeros, which a merge ignores anyway.
    ``ranked`` (|x| sorted ascending, optional) turns finding t into a lookup.
    """
    count = x.numel()
    if keep >= count:
        return (offset,), (_KEEP_ALL,)
    if keep <= 0:
        return (offset,), (_DROP_ALL,)
    if ranked is None:
        threshold, greater, ties = _kth_largest_magnitude(x, keep)
    else:
        threshold, greater, ties = _kth_largest_ranked(ranked, keep)
    if threshold <= 0.0:
        return (offset,), (_KEEP_ALL,)
    just_below = float(np.nextafter(np.float32(threshold), np.float32(0.0)))
    needed = keep - greater  # 1 … ties
    if needed == ties:
        return (offset,), (just_below,)
    last = _nth_tie_index(x, threshold, needed)
    return (offset, offset + last + 1), (just_below, threshold)


def magnitude_cut(
    row: Tensor,
    keeps: Sequence[int],
    segments: Sequence[tuple[int, int]],
    ranked: Tensor | None = None,
) -> MagnitudeCut:
    """One :class:`MagnitudeCut` for a row of segments, keeping ``keeps[j]`` in segment j.

    ``ranked`` (optional) holds the row's magnitudes sorted ascending within each segment.
    """
    starts: list[int] = []
    bounds: list[float] = []
    for (start, size), keep in zip(segments, keeps, strict=True):
        window = slice(start, start + size)
        s, b = top_magnitude_cut(
            row[window], keep, start, None if ranked is None else ranked[window]
        )
        starts += s
        bounds += b
    return MagnitudeCut(tuple(starts), tuple(bounds))


def keep_count(density: float, count: int) -> int:
    """TIES keeps ``max(1, int(density·count))`` entries (none at density 0, all at density ≥ 1)."""
    if density >= 1.0:
        return count
    return 0 if density <= 0.0 or count == 0 else max(1, int(density * count))


def keep_top_magnitude(delta: Tensor, density: float) -> Tensor:
    """TIES "trim": zero all but the ``max(1, int(density·numel))`` largest-magnitude entries
    (every entry at density 0).

    Ties at the threshold keep the lowest flat indices first (see :func:`top_magnitude_cut`).
    """
    flat = delta.reshape(-1)
    cut = MagnitudeCut(*top_magnitude_cut(flat, keep_count(density, flat.numel())))
    return cut.apply(flat, torch.empty_like(flat)).view_as(delta)


def _numpy_path(x: Tensor) -> bool:
    """Whether selections on ``x`` run in numpy (CPU) rather than torch (other devices)."""
    return x.device.type == "cpu" and not TORCH_SELECT


def _kth_largest_magnitude(x: Tensor, keep: int) -> tuple[float, int, int]:
    """The ``keep``-th largest |x| (exact), how many entries exceed it, and how many equal it."""
    if not _numpy_path(x):
        magnitudes = x.abs()
        threshold = torch.topk(magnitudes, keep, sorted=False).values.min()
        greater = int(torch.count_nonzero(magnitudes > threshold))
        return float(threshold), greater, int(torch.count_nonzero(magnitudes == threshold))
    values = x.detach().numpy()
    rank = values.size - keep  # its index in ascending order
    if values.size > EXACT_SELECT:
        found = _select_in_band(values, rank)
        if found is not None:
            return found
    magnitudes = np.abs(values)
    threshold = np.partition(magnitudes, rank)[rank]
    greater = int(np.count_nonzero(magnitudes > threshold))
    return float(threshold), greater, int(np.count_nonzero(magnitudes == threshold))


def _kth_largest_ranked(ranked: Tensor, keep: int) -> tuple[float, int, int]:
    """:func:`_kth_largest_magnitude` from magnitudes sorted ascending: two binary searches."""
    count = ranked.shape[0]
    if _numpy_path(ranked):
        values = ranked.numpy()
        threshold = float(values[count - keep])
        first = int(np.searchsorted(values, values[count - keep], "left"))
        after = int(np.searchsorted(values, values[count - keep], "right"))
    else:
        found = ranked[count - keep]
        threshold = float(found)
        first = int(torch.searchsorted(ranked, found, side="left"))
        after = int(torch.searchsorted(ranked, found, side="right"))
    return threshold, count - after, after - first


def sort_segments(row: Tensor, segments: Sequence[tuple[int, int]], out: Tensor) -> Tensor:
    """``out`` = |row| sorted ascending within each segment (what ``ranked`` arguments take)."""
    for start, size in segments:
        window = slice(start, start + size)
        if _numpy_path(row):
            out[window].numpy()[:] = np.sort(np.abs(row[window].numpy()))
        else:
            out[window] = torch.sort(row[window].abs()).values
    return out


def _select_in_band(values: np.ndarray, rank: int) -> tuple[float, int, int] | None:
    """Select through a sampled bracket ``[lo, hi]``; None when the sample missed the rank."""
    lo, hi = _sampled_bracket(values, rank)
    below, band = _count_and_gather(values, lo, hi)
    within = rank - below
    if not 0 <= within < band.size:
        logger.debug(
            "threshold bracket missed (rank %d, %d below, band %d); exact select",
            rank,
            below,
            band.size,
        )
        return None
    threshold = np.partition(band, within)[within]
    equal = int(np.count_nonzero(band == threshold))
    less = below + int(np.count_nonzero(band < threshold))
    return float(threshold), values.size - less - equal, equal


def _sampled_bracket(values: np.ndarray, rank: int) -> tuple[float, float]:
    """Magnitudes bracketing the ``rank``-th smallest with a margin of four sampling deviations."""
    wanted = min(SAMPLE, max(SAMPLE >> 4, values.size >> 6))
    step = (values.size // wanted) | 1  # odd, so the sample does not follow power-of-two rows
    sample = np.abs(values[::step])
    size, q = sample.size, rank / values.size
    margin = 4.0 * math.sqrt(q * (1.0 - q) / size) + 2.0 / size
    i_lo, i_hi = math.floor((q - margin) * size), math.ceil((q + margin) * size)
    picks = np.partition(sample, [max(i_lo, 0), min(i_hi, size - 1)])
    lo = float(picks[i_lo]) if i_lo > 0 else -1.0  # −1: nothing lies below the bracket
    hi = float(picks[i_hi]) if i_hi < size - 1 else math.inf
    return lo, hi


def _count_and_gather(values: np.ndarray, lo: float, hi: float) -> tuple[int, np.ndarray]:
    """One pass: how many |x| < lo, and the |x| within ``[lo, hi]`` (in flat order).

    Spans go to threads (:func:`.blockwise.parallel_map`); each works through its span in
    cache-sized chunks.
    """
    parts = parallel_map(
        lambda span: _count_and_gather_span(values[span[0] : span[1]], lo, hi), spans(values.size)
    )
    band = np.concatenate([band for _, band in parts]) if parts else np.empty(0, np.float32)
    return sum(below for below, _ in parts), band


def _count_and_gather_span(values: np.ndarray, lo: float, hi: float) -> tuple[int, np.ndarray]:
    magnitude, below_mask, band_mask = _chunk_scratch()
    below, parts = 0, []
    for start in range(0, values.size, _CHUNK):
        part = values[start : start + _CHUNK]
        n = part.size
        a, lt, in_band = magnitude[:n], below_mask[:n], band_mask[:n]
        np.abs(part, out=a)
        np.less(a, lo, out=lt)
        np.less_equal(a, hi, out=in_band)
        np.not_equal(in_band, lt, out=in_band)  # lt ⊆ (|x| ≤ hi), so this is lo ≤ |x| ≤ hi
        below += int(np.count_nonzero(lt))
        parts.append(a[in_band])
    return below, np.concatenate(parts)


_CHUNK = 1 << 16
_chunk_scratch = per_thread(
    lambda: (np.empty(_CHUNK, np.float32), np.empty(_CHUNK, bool), np.empty(_CHUNK, bool))
)


def _nth_tie_index(x: Tensor, threshold: float, nth: int) -> int:
    """Flat index of the ``nth`` (1-based) entry with ``|x| == threshold``."""
    if not _numpy_path(x):
        return int(torch.nonzero((x.abs() == threshold).reshape(-1))[nth - 1])
    values, seen = x.detach().numpy(), 0
    for start in range(0, values.size, _CHUNK):
        hits = np.flatnonzero(np.abs(values[start : start + _CHUNK]) == np.float32(threshold))
        if seen + hits.size >= nth:
            return start + int(hits[nth - seen - 1])
        seen += hits.size
    raise RuntimeError(
        f"fewer than {nth} entries of magnitude {threshold}"
    )  # counted on the same data


@dataclass(frozen=True)
class MagnitudeBand:
    """Keep the entries ranked ``[skip, skip + keep)`` by magnitude (Model Breadcrumbs).

    ``outer`` keeps the top ``skip + keep``, ``inner`` the top ``skip``; the band is
    ``y − inner(y)`` with ``y = outer(x)`` (exact: ``b − b = 0``, ``b − 0 = b``).
    """

    outer: MagnitudeCut
    inner: MagnitudeCut

    def apply(self, x: Tensor, out: Tensor, offset: int = 0) -> Tensor:
        self.outer.apply(x, out, offset)
        if self.inner.bounds != (_DROP_ALL,):
            out.sub_(self.inner.apply(out, torch.empty_like(out), offset))
        return out


def outlier_band_counts(density: float, gamma: float, count: int) -> tuple[int, int]:
    """Breadcrumbs' ``(skip, keep)``: keep ``int(density·n)`` after up to ``int(gamma·n)`` outliers.

    When ``density + gamma > 1`` fewer outliers are skipped so that ``density`` still remains.
    """
    keep = int(density * count)
    return min(int(gamma * count), count - keep), keep


def drop_outliers_and_small(delta: Tensor, density: float, gamma: float) -> Tensor:
    """Model Breadcrumbs: drop the largest ``gamma`` fraction and the smallest; keep ``density``.

    Exactly ``int(density·n)`` entries remain; ``gamma = 0`` drops no outliers (the TIES trim).
    Ties keep the lowest flat indices first, as in :func:`top_magnitude_cut`.
    """
    if density >= 1.0:
        return delta
    flat = delta.reshape(-1)
    skip, keep = outlier_band_counts(density, gamma, flat.numel())
    band = MagnitudeBand(
        MagnitudeCut(*top_magnitude_cut(flat, skip + keep)),
        MagnitudeCut(*top_magnitude_cut(flat, skip)),
    )
    return band.apply(flat, torch.empty_like(flat)).view_as(delta)


# -- random drops -------------------------------------------------------------------------------


def uniforms(
    size: int | Sequence[int], generator: torch.Generator | None, device: torch.device
) -> Tensor:
    """Float32 uniforms in [0, 1) from ``generator`` (DELLA's draws), drawn on the generator's
    device and returned on ``device``.

    A recipe's generators are CPU generators on every device (:meth:`.graph.RecipeGraph.
    _generators`): for one seed torch's CUDA generator (Philox) and its CPU generator (Mersenne
    Twister) give different numbers, so drawing on the device would make a recipe's bytes
    depend on the device that built it — a GPU worker's candidate would not be the model a CPU
    rebuilds from its recipe.
    """
    where = generator.device if generator is not None else torch.device("cpu")
    shape = (size,) if isinstance(size, int) else tuple(size)
    return torch.rand(shape, generator=generator, device=where, dtype=torch.float32).to(device)


#: DARE draws one of this many levels per entry and input, uniformly: 10 bits, so one int32
#: word holds three inputs' levels (:func:`draw_words`) and the fused kernel reads 4 bytes per
#: entry for three inputs. The keep probability moves in steps of 2⁻¹⁰, far below what a
#: merge's quality notices, and ``rescale: paper`` divides by it exactly.
LEVEL_BITS = 10
DRAW_LEVELS = 1 << LEVEL_BITS
#: Levels per int32 word: input i's level is bits ``10·(i % 3)`` … of word row ``i // 3``.
LEVELS_PER_WORD = 3


def keep_level(density: float) -> int:
    """DARE keeps an entry whose drawn level is below this: ``density·2¹⁰`` rounded to the
    nearest level, at least one for a positive density (all for ``density ≥ 1``).

    The keep probability is therefore ``keep_level / 2¹⁰``, within 2⁻¹¹ of the density asked
    for, and the ``paper`` rescale divides by exactly that probability (:func:`dare_weights`),
    so every DARE merge is an unbiased estimate of its task arithmetic.
    """
    if density <= 0.0:
        return 0
    if density >= 1.0:
        return DRAW_LEVELS
    return min(max(round(density * DRAW_LEVELS), 1), DRAW_LEVELS)


def dare_weights(weights: Sequence[float], density: Sequence[float], rescale: str) -> list[float]:
    """The weights DARE's kept entries enter the sum with: ``wᵢ / pᵢ`` for the ``paper``
    rescale (the division by the keep probability folded into the weight — one multiply per
    entry, here and in the fused kernel), ``wᵢ`` otherwise. The normaliser stays ``Σ wᵢ``."""
    return [
        w * DRAW_LEVELS / level if rescale == "paper" and 0 < level < DRAW_LEVELS else float(w)
        for w, level in zip(weights, (keep_level(d) for d in density), strict=True)
    ]


def word_rows(inputs: int) -> int:
    """Rows of draw words for ``inputs`` inputs: ``⌈inputs / 3⌉``."""
    return -(-inputs // LEVELS_PER_WORD)


def level_of(words: Tensor, i: int) -> Tensor:
    """Input i's levels from the draw words ``(rows, …)`` int32 (:func:`draw_words`)."""
    shift = LEVEL_BITS * (i % LEVELS_PER_WORD)
    return (words[i // LEVELS_PER_WORD] >> shift) & (DRAW_LEVELS - 1)


def draw_words(
    out: Tensor,
    segments: Sequence[tuple[int, int]],
    generators: Sequence[torch.Generator | None],
) -> Tensor:
    """DARE's draws into ``out`` ``(⌈M/3⌉, N)`` int32: per entry and word row, one
    ``random_(0, 2³⁰)`` of the segment's generator — three 10-bit levels (:func:`level_of`),
    one draw (one Mersenne Twister output) for three inputs. Segment j draws from
    ``generators[j]``, word row after word row — for every input, whatever its density, so
    the draws depend only on the generators.

    The streaming path and the resident fused kernel both draw here, so they see the same
    levels. A generator on another device than ``out`` (a recipe's CPU generator filling a GPU
    tensor, see :func:`uniforms`) draws on the CPU, in chunks of a reused buffer; a generator's
    stream does not depend on how its draws are chunked. Segments with generators of their own
    draw on threads (one generator's draws keep their order).
    """
    top = DRAW_LEVELS**LEVELS_PER_WORD
    longest = max((size for _, size in segments), default=0)

    def draw(job: tuple[tuple[int, int], torch.Generator | None]) -> None:
        (start, size), generator = job
        for row in out[:, start : start + size]:
            if generator is None or generator.device == row.device:
                row.random_(0, top, generator=generator)
                continue
            chunk = scratch(1, min(1 << 20, longest), torch.int32, generator.device, "draws")[0]
            for offset in range(0, size, chunk.numel()):
                part = chunk[: min(chunk.numel(), size - offset)]
                row[offset : offset + part.numel()].copy_(part.random_(0, top, generator=generator))

    jobs = list(zip(segments, generators, strict=True))
    own = None not in generators and len({id(g) for g in generators}) == len(generators)
    if own:
        parallel_map(draw, jobs)
    else:
        for job in jobs:
            draw(job)
    return out


def dare_drop(
    stack: Tensor,
    density: Sequence[float],
    rescale: str,
    generators: Sequence[torch.Generator | None],
    segments: Sequence[tuple[int, int]],
) -> Tensor:
    """DARE's drop on a stack ``(M, N)``: input i keeps an entry when its drawn level
    (:func:`draw_words`, :func:`level_of`) is below :func:`keep_level` ``(density[i])``.

    The ``paper`` rescale (÷ keep probability) is not applied here: it is folded into the
    weights (:func:`dare_weights`). ``l1`` scales each segment's survivors to restore its L1
    norm. Returns the dropped stack in this thread's reused buffer.
    """
    count, width = stack.shape
    words = scratch(word_rows(count), width, torch.int32, stack.device, "dare draws")
    draw_words(words, segments, generators)
    dropped = scratch(count, width, stack.dtype, stack.device, "dare")
    for i, keep in enumerate(density):
        level = keep_level(keep)
        if level >= DRAW_LEVELS:
            dropped[i].copy_(stack[i])
            continue
        for start, stop in blocks(width, stack.device):
            part = dropped[i, start:stop]  # level k → x·[k < K], with float ops only
            part.copy_(level_of(words[:, start:stop], i))
            part.neg_().add_(float(level)).sign_().clamp_min_(0.0).mul_(stack[i, start:stop])
        if rescale == "l1":
            for start, size in segments:
                window = slice(start, start + size)
                dropped[i, window] = rescale_kept(stack[i, window], dropped[i, window], "l1", keep)
    return dropped


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
