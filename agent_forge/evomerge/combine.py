"""The task-vector core shared by task arithmetic, TIES, DARE, breadcrumbs and DELLA.

:func:`combine_task_vectors` computes ``λ · Σᵢ wᵢ·sparsifyᵢ(δᵢ) / d`` — optionally keeping only
entries that agree with an elected sign (TIES) — block by block (:mod:`.blockwise`), with each
input's sparsifier (a magnitude trim, say) applied to the block on the fly, so no trimmed copy
of the task vectors is ever written to memory. Only float ops are used (``sign``, ``clamp``,
``hardshrink``): torch vectorises them, but not ops that produce bool masks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .blockwise import block_size, scratch

logger = logging.getLogger(__name__)

#: Writes the sparsified values of block ``x`` of one input (flat elements from ``offset``) to
#: ``out`` and returns it.
Sparsifier = Callable[[Tensor, Tensor, int], Tensor]


def combine_task_vectors(
    deltas: Tensor,
    weights: Sequence[float],
    *,
    lam: float,
    normalize: bool,
    sign_consensus: bool,
    sparsifiers: Sequence[Sparsifier | None] | None = None,
    shares: Sequence[float] | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """``λ · Σᵢ yᵢ / d`` with ``yᵢ = wᵢ·sparsifyᵢ(δᵢ)``; ``deltas`` is ``(M, *shape)``, read only.

    With sign consensus (TIES) only the ``yᵢ`` whose sign agrees with the elected sign
    ``g = sign(Σᵢ yᵢ)`` (zero counts as positive) enter the sum, and ``d`` is the sum of the
    agreeing inputs' ``shares`` (a zero divisor becomes 1); without it ``d = Σᵢ sharesᵢ`` (1 if
    ~0). ``shares`` are the weights unless given (DARE scales its weights by 1/p but normalises
    by the weights). ``d`` divides only when ``normalize``. Sums run over the inputs in order,
    in float32.

    Returns a ``(*shape)`` tensor: ``out`` when given (contiguous, same dtype and device).
    """
    count = deltas.shape[0]
    flat = deltas.reshape(count, -1)  # (M, N)
    result = (
        out
        if out is not None
        else torch.empty(deltas.shape[1:], dtype=deltas.dtype, device=deltas.device)
    )
    dest = result.view(-1)
    kind = _ConsensusBlock if sign_consensus else _SumBlock
    rule = kind(
        list(weights),
        list(sparsifiers or [None] * count),
        normalize,
        lam,
        flat.device,
        list(weights if shares is None else shares),
    )
    size = block_size(flat.shape[1], flat.device)
    rows = scratch(rule.scratch_rows(), size, flat.dtype, flat.device)
    for i, (x, target) in enumerate(zip(flat.split(size, dim=1), dest.split(size), strict=True)):
        rule(x, target, i * size, rows[:, : target.numel()])
    return result


class _SumBlock:
    """``λ · Σᵢ wᵢ·sparsifyᵢ(δᵢ) / d`` on one block (task arithmetic, DARE, breadcrumbs).

    ``scratch`` holds the block's ``yᵢ`` (one row per input) and working rows after them.
    """

    def __init__(
        self,
        weights: list[float],
        sparsifiers: list[Sparsifier | None],
        normalize: bool,
        lam: float,
        device: torch.device,
        shares: list[float],
    ) -> None:
        self.weights, self.sparsifiers, self.normalize, self.lam = (
            weights,
            sparsifiers,
            normalize,
            lam,
        )
        self.shares = shares
        total = float(sum(shares))
        self.divisor = 1.0 if abs(total) < 1e-8 else total
        self.positive = all(w > 0 for w in shares)
        self.unit = all(w == 1.0 for w in weights)
        self.unit_shares = all(w == 1.0 for w in shares)
        self.column = _column(weights, device)  # (M, 1)
        self.share_column = _column(shares, device)

    def scratch_rows(self) -> int:
        return len(self.weights)

    def terms(self, x: Tensor, offset: int, scratch: Tensor, *, copy: bool) -> list[Tensor]:
        """The block's ``yᵢ = wᵢ·sparsifyᵢ(xᵢ)``: ``scratch`` rows, or ``x`` if unchanged."""
        count = len(self.weights)
        ys = scratch[:count]
        if all(s is None for s in self.sparsifiers):
            if self.unit and not copy:
                return list(x.unbind(0))
            torch.mul(x, self.column, out=ys) if not self.unit else ys.copy_(x)
            return list(ys.unbind(0))
        rows = ys.unbind(0)
        for i, sparsify in enumerate(self.sparsifiers):
            rows[i].copy_(x[i]) if sparsify is None else sparsify(x[i], rows[i], offset)
        if not self.unit:
            ys.mul_(self.column)
        return list(rows)

    def __call__(self, x: Tensor, dest: Tensor, offset: int, scratch: Tensor) -> None:
        _sum_rows(self.terms(x, offset, scratch, copy=False), dest)
        if self.normalize:
            dest.div_(self.divisor)
        if self.lam != 1.0:
            dest.mul_(self.lam)


class _ConsensusBlock(_SumBlock):
    """TIES's elect-and-disjoint-mean on one block, with float ops only.

    ``g = sign(sign(s) + ½)`` is ±1 with zero counted positive; ``relu(g·yᵢ)`` is ``|yᵢ|``
    where yᵢ agrees and 0 elsewhere, so ``g · Σᵢ relu(g·yᵢ)`` is the sum of the agreeing
    entries (negation is exact), and ``wᵢ·sign(relu(g·yᵢ))`` is yᵢ's share of ``d``.
    """

    def scratch_rows(self) -> int:
        return len(self.weights) + 2

    def __call__(self, x: Tensor, dest: Tensor, offset: int, scratch: Tensor) -> None:
        count = len(self.weights)
        rows = self.terms(x, offset, scratch, copy=True)
        ys, sign, divisor = scratch[:count], scratch[count], scratch[count + 1]
        _sum_rows(rows, sign)
        sign.sign_().add_(0.5).sign_()  # g
        ys.mul_(sign).clamp_min_(0.0)  # relu(g·yᵢ)
        _sum_rows(rows, dest)
        dest.mul_(sign)
        if self.normalize:
            ys.sign_()
            if not self.unit_shares:
                ys.mul_(self.share_column)
            _sum_rows(rows, divisor)
            self._fix_zero(divisor)
            dest.div_(divisor)
        if self.lam != 1.0:
            dest.mul_(self.lam)

    def _fix_zero(self, divisor: Tensor) -> None:
        """A zero divisor becomes 1. With positive weights it is 0 only where nothing agrees (the
        sum is then 0 too), so raising it to the smallest weight gives the same quotient."""
        if self.positive:
            divisor.clamp_min_(min(self.shares))
            return
        zero = torch.abs(divisor).sign_().neg_().add_(1.0)  # 1 where d == 0
        divisor.add_(zero)


def _column(values: Sequence[float], device: torch.device) -> Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device).reshape(-1, 1)


def _sum_rows(rows: Sequence[Tensor], out: Tensor) -> Tensor:
    """``out = ((r₀ + r₁) + r₂) + …``: inputs summed in order."""
    if len(rows) == 1:
        return out.copy_(rows[0])
    torch.add(rows[0], rows[1], out=out)
    for row in rows[2:]:
        out.add_(row)
    return out
