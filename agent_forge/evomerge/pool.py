"""The run's input models: read from disk tensor by tensor, or resident in one flat layout.

:class:`SourcePool` answers "tensors ``names`` of model ``source``" for :mod:`.graph`. Streaming,
it reads them from the safetensors files into the caller's buffer. Resident (for evaluating
many candidates), every source is loaded once onto the run's device into a matrix with a row
per source and the tensors of one layout side by side, so consecutive tensors of several
sources are one ``(M, N)`` view and need no copy; the task vectors against the base are
computed once into a second such matrix.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from .blockwise import parallel_map
from .exceptions import ConfigurationError, MergeError
from .fused import magnitude_order
from .layout import order_names
from .sources import ModelSource

logger = logging.getLogger(__name__)


class SourcePool:
    """The run's input models by name.

    Streaming, tensors are read from disk when asked for. With ``resident=True`` every tensor
    is loaded once onto ``device``: sources with the same tensor names and shapes share one
    flat layout, a matrix with a row per source, so consecutive tensors of several sources
    are one ``(M, N)`` view; when a base is named, the task vectors ``θ − θ_base`` of the
    other sources are computed once, on first use, into a second such matrix
    (``cache_deltas``). Resident views are shared: callers must not write to them.
    """

    def __init__(
        self,
        sources: Mapping[str, ModelSource],
        base: str | None = None,
        *,
        resident: bool = False,
        device: str | torch.device = "cpu",
        cache_deltas: bool = True,
    ) -> None:
        self.sources = dict(sources)
        self.base = base
        self.device = torch.device(device)
        self.resident = resident
        self._stores: dict[str, _Store] = {}
        self._cache_deltas = cache_deltas and resident and base is not None
        if resident:
            self._load()

    def _load(self) -> None:
        groups: dict[tuple[tuple[str, tuple[int, ...]], ...], list[str]] = {}
        for name, source in self.sources.items():
            names = order_names(source.tensor_names)
            groups.setdefault(tuple((n, source.info(n).shape) for n in names), []).append(name)
        for layout, members in groups.items():
            store = _Store(layout, members, [self.sources[m] for m in members], self.device)
            for member in members:
                self._stores[member] = store
                self.sources[member].close()

    def source(self, name: str) -> ModelSource:
        try:
            return self.sources[name]
        except KeyError:
            raise ConfigurationError(
                f"the recipe names model {name!r}, which is not among the sources "
                f"({', '.join(self.sources)}); check the recipe's source names"
            ) from None

    def tensor(self, source: str, name: str) -> Tensor:
        """One source tensor in float32 on the pool's device (resident: do not modify it)."""
        if self.resident:
            return (
                self._store(source)
                .theta(source, [name])
                .view(self._store(source).shape(name))
                .float()
            )
        return self.source(source).get_tensor(name).to(self.device).float()

    def read_into(
        self, source: str, names: Sequence[str], sizes: Sequence[int], out: Tensor
    ) -> Tensor:
        """Tensors ``names`` of ``source`` (``sizes`` elements each), one after another in ``out``.

        Raises:
            MergeError: a tensor of this source has another size (the models do not match).
        """
        start = 0
        for name, size in zip(names, sizes, strict=True):
            if self.resident:
                value = self.flat(source, [name])
                if value.numel() != size:
                    raise MergeError(
                        f"tensor {name} of model {source} has {value.numel()} elements, "
                        f"the other models' {size}"
                    )
                out[start : start + size].copy_(value)
            else:
                self.source(source).read_into(name, out[start : start + size])
            start += size
        return out

    def flat(self, source: str, names: Sequence[str]) -> Tensor:
        """Resident: tensors ``names`` of ``source`` flattened one after another, in float32."""
        return self._store(source).theta(source, names).float()

    def stack(self, sources: Sequence[str], names: Sequence[str], *, deltas: bool) -> Tensor | None:
        """Resident: ``(M, N)`` θ rows (or task-vector rows) of ``sources`` for tensors ``names``.

        A view when the sources are consecutive rows and the tensors consecutive in the layout;
        None when the sources do not share one layout (or, for task vectors, none are cached).
        """
        stores = {id(self._store(s)) for s in sources}
        if len(stores) != 1 or (deltas and not self._cache_deltas):
            return None
        store = self._store(sources[0])
        if deltas:
            if (
                self.base is None
                or id(self._store(self.base)) not in stores
                or self.base in sources
            ):
                return None
            return store.deltas(self.base, sources, names)
        return store.thetas(sources, names).float()

    def ranked(self, sources: Sequence[str], names: Sequence[str]) -> Tensor | None:
        """Resident: the task vectors' magnitudes sorted ascending within each tensor, ``(M, N)``.

        Rows and columns as :meth:`stack` gives the task vectors (None where it gives none).
        Made on first use (one sort per tensor); a trim's threshold is then a lookup.
        """
        if self.stack(sources, names, deltas=True) is None:
            return None
        return self._store(sources[0]).ranked(self.base, sources, names)  # type: ignore[arg-type]

    def trim_orders(self, sources: Sequence[str], names: Sequence[str]) -> Tensor | None:
        """Resident: each task vector's entries by descending magnitude within each tensor,
        equal magnitudes by index (:func:`.fused.magnitude_order`; int32 indices within the
        tensor), ``(M, N)`` rows and columns as :meth:`stack` gives the task vectors (None
        where it gives none). TIES at ``k`` keeps a tensor's first ``k``.

        Made on first use: one stable sort per tensor and task vector, on threads.
        """
        if self.stack(sources, names, deltas=True) is None:
            return None
        return self._store(sources[0]).trim_orders(self.base, sources, names)  # type: ignore[arg-type]

    def resident_elements(self) -> int:
        """Parameters per resident model (the largest layout); 0 when streaming."""
        return max((store.matrix.shape[1] for store in self._stores.values()), default=0)

    def delta(self, source: str, name: str) -> Tensor | None:
        """The cached task vector ``θ_source − θ_base`` (None when not cached)."""
        if not self._cache_deltas or source == self.base:
            return None
        found = self.stack([source], [name], deltas=True)
        return None if found is None else found[0].view(self._store(source).shape(name))

    def _store(self, source: str) -> _Store:
        store = self._stores.get(source)
        if store is None:
            self.source(source)  # raises for unknown names
            raise MergeError(f"model {source} is not resident")
        return store


class _Store:
    """Resident sources that share one layout: ``theta`` is ``(S, P)``, a row per source."""

    def __init__(
        self,
        layout: Sequence[tuple[str, tuple[int, ...]]],
        members: Sequence[str],
        sources: Sequence[ModelSource],
        device: torch.device,
    ) -> None:
        self.offsets: dict[str, tuple[int, int]] = {}
        self.shapes = dict(layout)
        total = 0
        for name, shape in layout:
            self.offsets[name] = (total, math.prod(shape))
            total += math.prod(shape)
        dtypes = {sources[0].info(n).dtype for n, _ in layout} if layout else {"float32"}
        dtype = getattr(torch, dtypes.pop()) if len(dtypes) == 1 else torch.float32
        self.rows = {m: i for i, m in enumerate(members)}
        self.matrix = torch.empty(len(members), total, dtype=dtype)
        for row, source in enumerate(sources):
            for name, _ in layout:
                start, size = self.offsets[name]
                source.read_into(name, self.matrix[row, start : start + size])
        self.matrix = self.matrix.to(device)
        self._deltas: Tensor | None = None
        self._delta_rows: dict[str, int] = {}
        self._ranked: Tensor | None = None
        self._orders: Tensor | None = None
        self._spans: dict[tuple[str, ...], slice | None] = {}

    def shape(self, name: str) -> tuple[int, ...]:
        self._offset(name)
        return self.shapes[name]

    def span(self, names: Sequence[str]) -> slice | None:
        """The layout's columns of consecutive tensors ``names`` (None if not consecutive)."""
        key = tuple(names)
        if key not in self._spans:
            if len(self._spans) > 256:
                self._spans.clear()
            self._spans[key] = self._find_span(names)
        return self._spans[key]

    def _find_span(self, names: Sequence[str]) -> slice | None:
        start = stop = self._offset(names[0])[0]
        for name in names:
            offset, size = self._offset(name)
            if offset != stop:
                return None
            stop += size
        return slice(start, stop)

    def _offset(self, name: str) -> tuple[int, int]:
        try:
            return self.offsets[name]
        except KeyError:
            raise MergeError(f"the resident models have no tensor {name}") from None

    def theta(self, source: str, names: Sequence[str]) -> Tensor:
        return self.thetas([source], names)[0]

    def thetas(self, sources: Sequence[str], names: Sequence[str]) -> Tensor:
        return _rows(self.matrix, [self.rows[s] for s in sources], self._columns(names))

    def deltas(self, base: str, sources: Sequence[str], names: Sequence[str]) -> Tensor:
        """Task-vector rows ``θ_source − θ_base`` for ``sources``, columns of ``names``."""
        matrix = self._delta_matrix(base)
        return _rows(matrix, [self._delta_rows[s] for s in sources], self._columns(names))

    def ranked(self, base: str, sources: Sequence[str], names: Sequence[str]) -> Tensor:
        """Like :meth:`deltas`, holding the magnitudes sorted ascending within each tensor.

        Read off the magnitude orders (:meth:`trim_orders`) rather than sorted again: the fused
        TIES kernel's first call needs both, and one sort per tensor is the costly part.
        """
        if self._ranked is None:
            deltas = self._delta_matrix(base)
            orders = self._order_matrix(base)
            ranked = torch.empty_like(deltas)

            def fill(job: tuple[int, int, int]) -> None:
                row, start, size = job
                columns = slice(start, start + size)
                magnitudes, ascending = deltas[row, columns].abs(), orders[row, columns].flip(0)
                torch.index_select(magnitudes, 0, ascending, out=ranked[row, columns])

            parallel_map(fill, self._tensor_jobs())
            self._ranked = ranked
        return _rows(self._ranked, [self._delta_rows[s] for s in sources], self._columns(names))

    def trim_orders(self, base: str, sources: Sequence[str], names: Sequence[str]) -> Tensor:
        """:meth:`SourcePool.trim_orders`, made for every tensor of every task vector at once."""
        orders = self._order_matrix(base)
        return _rows(orders, [self._delta_rows[s] for s in sources], self._columns(names))

    def _order_matrix(self, base: str) -> Tensor:
        if self._orders is None:
            deltas = self._delta_matrix(base)
            orders = torch.empty(deltas.shape, dtype=torch.int32, device=deltas.device)

            def sort(job: tuple[int, int, int]) -> None:
                row, start, size = job
                columns = slice(start, start + size)
                orders[row, columns] = magnitude_order(deltas[row, columns])

            parallel_map(sort, self._tensor_jobs())
            self._orders = orders
        return self._orders

    def _tensor_jobs(self) -> list[tuple[int, int, int]]:
        """``(task-vector row, first column, size)`` of every tensor of every task vector."""
        assert self._deltas is not None
        rows = range(self._deltas.shape[0])
        return [(row, start, size) for row in rows for start, size in self.offsets.values()]

    def _delta_matrix(self, base: str) -> Tensor:
        if self._deltas is None:
            members = [m for m in self.rows if m != base]
            self._delta_rows = {m: i for i, m in enumerate(members)}
            shape = (len(members), self.matrix.shape[1])
            deltas = torch.empty(shape, dtype=torch.float32, device=self.matrix.device)
            reference = self.matrix[self.rows[base]].float()
            for member, row in self._delta_rows.items():
                torch.sub(self.matrix[self.rows[member]].float(), reference, out=deltas[row])
            self._deltas = deltas
        return self._deltas

    def _columns(self, names: Sequence[str]) -> slice | Tensor:
        span = self.span(names)
        if span is not None:
            return span
        pieces = [torch.arange(o, o + n) for o, n in (self._offset(name) for name in names)]
        return torch.cat(pieces).to(self.matrix.device)


def _rows(matrix: Tensor, rows: Sequence[int], columns: slice | Tensor) -> Tensor:
    """``matrix[rows][:, columns]``: a view when rows run consecutively and columns are a slice."""
    consecutive = list(rows) == list(range(rows[0], rows[0] + len(rows)))
    picked = matrix[rows[0] : rows[0] + len(rows)] if consecutive else matrix[list(rows)]
    return picked[:, columns]
