"""The recipe interpreter: what tensors a recipe has, their shapes, and each tensor's value.

The input models come from a :class:`~.pool.SourcePool` — read lazily from disk for streaming,
or resident on the run's device (with task vectors against the base computed once) for
evaluation. :class:`RecipeGraph` walks a recipe for a run of consecutive tensor names at a
time (:meth:`RecipeGraph.batches`); both the streaming writer and the in-memory materialiser
call the same :meth:`RecipeGraph.compute_into`, which is why they agree bit for bit. Streaming,
the inputs are read from disk straight into a reused ``(M, N)`` buffer and turned into task
vectors in place; resident, the stack is a view of the pool's task-vector matrix, and task
arithmetic, TIES and DARE may run as one compiled pass (:mod:`.fused`) that gives the same bits.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .blockwise import add_, parallel_map, subtract_rows_
from .exceptions import ConfigurationError, MergeError
from .fused import FusedKernels, KernelPlan, TrimRows, fusable, plan_for, row_pieces
from .layout import (
    branch_gain_offset,
    component_of,
    order_names,
    parse_layer,
    remap_layer_config,
    source_layers,
    tensor_locations,
)
from .pool import SourcePool
from .recipe import LayerStack, Merge, RecipeNode, Source
from .sparsify import draw_words, segment_starts, word_rows
from .techniques import (
    Technique,
    TensorLocation,
    apply_technique,
    get_technique,
    resolve_value,
    resolved_params,
)

__all__ = [
    "BATCH_ELEMENTS",
    "RecipeGraph",
    "draw_hash",
    "SourcePool",
    "is_layer_dependent",
    "source_layers",
    "tensor_seed",
]

logger = logging.getLogger(__name__)

#: Most elements of small tensors that one technique call computes together.
BATCH_ELEMENTS = 1 << 22
#: The same for a fused kernel on the resident pool, which needs no buffers: fewer, longer
#: calls (on the 95M-parameter benchmark models 2²⁵ took task arithmetic from 1.95× to 1.47×
#: the copy floor and TIES from 3.4× to 2.3×, measured side by side); it bounds the eager
#: path's temporaries when the first call of a kernel variant is checked.
FUSED_BATCH_ELEMENTS = 1 << 25
#: Memory for the fused DARE kernel's kept draws, in float32 models (the newest always stays;
#: a seed's draws of up to three inputs take one).
_DRAW_CACHE_MODELS = 4


def tensor_seed(node_hash: str, tensor_name: str) -> int:
    """A stable 63-bit seed for one node's draws (:func:`draw_hash`, which holds the recipe
    seed) and one tensor."""
    digest = hashlib.blake2b(f"{node_hash}\0{tensor_name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def draw_hash(node: Merge) -> str:
    """What a randomised merge's draws depend on: its seed and its inputs, not its parameters.

    Candidates that differ only in weights or densities then see the same random numbers
    (common random numbers: the search compares them on equal terms, and a DARE mask grows
    with its density), and the resident pool computes a seed's draws once.
    """
    text = json.dumps([node.seed, [child.hash for child in node.inputs]])
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


#: The output head of the causal-LM families EvoMerge merges (absent from a tied model's files).
HEAD_TENSOR = "lm_head.weight"


class RecipeGraph:
    """Answers, for a recipe: its layer count, tensor names and shapes, config, and tensor
    values."""

    def __init__(
        self,
        pool: SourcePool,
        *,
        subtree_cache_bytes: int = 0,
        fused: FusedKernels | None = None,
    ) -> None:
        self.pool = pool
        self.fused = fused
        self._draw_cache: OrderedDict[tuple[str, tuple[str, ...]], Tensor] = OrderedDict()
        self._memo: dict[tuple[str, str], Tensor] = {}
        self._subtree_cache: OrderedDict[tuple[str, str], Tensor] = OrderedDict()
        self._subtree_bytes = 0
        self._subtree_limit = subtree_cache_bytes
        self._location_tables: dict[str, dict[str, TensorLocation]] = {}
        self._buffers: dict[str, Tensor] = {}
        self._source_names: dict[str, list[str]] = {}
        self._shapes: dict[tuple[str, str], tuple[int, ...]] = {}
        self._size_lists: dict[tuple[str, tuple[str, ...]], list[int]] = {}
        self._trim_layouts: dict[tuple[int, ...], list[tuple[slice, slice, TrimRows]]] = {}

    # -- structure ------------------------------------------------------------------------------

    def layers(self, node: RecipeNode) -> int:
        if isinstance(node, Source):
            return source_layers(self.pool.source(node.name).config)
        if isinstance(node, LayerStack):
            return len(node.slots)
        counts = {self.layers(child) for child in node.children()}
        if len(counts) > 1:
            raise ConfigurationError(
                f"{node.technique} merges inputs with different layer counts {sorted(counts)}; "  # type: ignore[attr-defined]
                "merge layer stacks only with stacks of the same depth"
            )
        return counts.pop()

    def names(self, node: RecipeNode) -> list[str]:
        """Tensor names in Hugging Face order."""
        if isinstance(node, Source):
            cached = self._source_names.get(node.name)
            if cached is None:
                cached = self._source_names[node.name] = order_names(
                    self.pool.source(node.name).tensor_names
                )
            return list(cached)
        if isinstance(node, Merge):
            self.layers(node)  # inputs of different depths: a clear error, not dropped layers
            return self.names(node.inputs[0])
        assert isinstance(node, LayerStack)
        outer = [
            n
            for n in self.names(node.inputs[node.embed_from])
            if parse_layer(n) is None and not _is_post(n)
        ]
        outer += [
            n
            for n in self.names(node.inputs[node.head_input])
            if parse_layer(n) is None and _is_post(n)
        ]
        if self._head_from_embedding(node) is not None:
            outer.append(HEAD_TENSOR)
        layer_names = []
        for k, slot in enumerate(node.slots):
            available = self.layers(node.inputs[slot.input])
            if slot.layer >= available:
                raise ConfigurationError(
                    f"layer slot {k} takes layer {slot.layer} of input {slot.input}, "
                    f"which has {available} layers"
                )
            for name in self._layer_tensors(node.inputs[slot.input], slot.layer):
                layer_names.append(name.with_index(k))
        return order_names(outer + layer_names)

    def _layer_tensors(self, node: RecipeNode, layer: int) -> list[Any]:
        parsed = (parse_layer(n) for n in self.names(node))
        return [p for p in parsed if p is not None and p.index == layer]

    def shape(self, node: RecipeNode, name: str) -> tuple[int, ...]:
        while isinstance(node, Merge):  # a merge has its first input's shapes
            node = node.inputs[0]
        if isinstance(node, Source):
            key = (node.name, name)
            found = self._shapes.get(key)
            if found is None:
                found = self._shapes[key] = tuple(self.pool.source(node.name).info(name).shape)
            return found
        child, child_name, _, _ = self._slot_lookup(node, name)  # type: ignore[arg-type]
        return self.shape(child, child_name)

    def config(self, node: RecipeNode) -> dict[str, Any]:
        """The output model's config.json content (layer count and per-layer lists updated)."""
        if isinstance(node, Source):
            return dict(self.pool.source(node.name).config)
        if isinstance(node, Merge):
            return self.config(node.inputs[0])
        assert isinstance(node, LayerStack)
        template = self.config(node.inputs[node.embed_from])
        if node.head_input != node.embed_from and any(
            parse_layer(n) is None and component_of(n) == "head" for n in self.names(node)
        ):  # a head from another input than the embeddings: the stack cannot tie them
            template["tie_word_embeddings"] = False
        slots = [
            (self.config(node.inputs[s.input]), s.layer, self.layers(node.inputs[s.input]))
            for s in node.slots
        ]
        return remap_layer_config(template, slots)

    def locations(self, node: RecipeNode) -> dict[str, TensorLocation]:
        return tensor_locations(self.names(node), self.layers(node))

    # -- values ---------------------------------------------------------------------------------

    def compute(self, node: RecipeNode, name: str) -> Tensor:
        """The float32 value of tensor ``name`` of ``node`` (a new tensor; identical subtrees
        computed once)."""
        self._memo.clear()
        try:
            return self._compute(node, name, root=True)
        finally:
            self._memo.clear()

    def batches(
        self, node: RecipeNode, names: Sequence[str], limit: int | None = None
    ) -> list[list[str]]:
        """``names`` in order, grouped into runs that :meth:`compute_into` computes together.

        A segmented technique takes consecutive small tensors whose parameters resolve alike
        (up to ``limit`` elements: :data:`FUSED_BATCH_ELEMENTS` where a fused kernel computes
        them, else :data:`BATCH_ELEMENTS`) in one call; everything else goes one tensor at a
        time.
        """
        if not (isinstance(node, Merge) and get_technique(node.technique).segmented):
            return [[name] for name in names]
        tech = get_technique(node.technique)
        if limit is None:
            fused = self.fused is not None and self.fused.enabled
            limit = BATCH_ELEMENTS
            if fused and fusable(tech.name, node.params):
                limit = FUSED_BATCH_ELEMENTS
        varies = is_layer_dependent(tech, node.params)
        runs: list[list[str]] = []
        size, key = 0, None
        for name, count in zip(names, self._sizes(node, names), strict=True):
            name_key = self._resolved(tech, node, name) if varies else None
            if not runs or size + count > limit or name_key != key:
                runs.append([])
                size, key = 0, name_key
            runs[-1].append(name)
            size += count
        return runs

    def compute_into(self, node: RecipeNode, names: Sequence[str], out: Tensor) -> Tensor:
        """The float32 values of tensors ``names`` of ``node``, flattened one after another into
        ``out``.

        Gives the same bits as :meth:`compute` tensor by tensor. Reuses the graph's buffers, so
        a graph computes one batch at a time.
        """
        self._memo.clear()
        try:
            if isinstance(node, Merge) and (
                len(names) == 1 or get_technique(node.technique).segmented
            ):
                self._merge_into(node, names, out, shared=True)
            else:
                self._fill(node, names, out, self._sizes(node, names))
        finally:
            self._memo.clear()
        return out

    def _compute(self, node: RecipeNode, name: str, root: bool = False) -> Tensor:
        if isinstance(node, Source):
            return self.pool.tensor(node.name, name)
        key = (node.hash, name)
        if key in self._memo:
            return self._memo[key]
        cached = self._subtree_cache.get(key)
        if cached is not None:
            self._subtree_cache.move_to_end(key)
            return cached
        if isinstance(node, Merge):
            value = torch.empty(
                self.shape(node, name), dtype=torch.float32, device=self.pool.device
            )
            self._merge_into(node, [name], value.view(-1), shared=False)
        else:
            assert isinstance(node, LayerStack)
            child, child_name, scale, offset = self._slot_lookup(node, name)
            value = self._compute(child, child_name)
            if scale != 1.0:  # the branch's gain (offset + value) times the slot's scale
                value = (value + offset) * scale - offset if offset else value * scale
        self._memo[key] = value
        if not root and self._subtree_limit:
            self._remember(key, value)
        return value

    def _location(self, node: RecipeNode, name: str) -> TensorLocation:
        table = self._location_tables.get(node.hash)
        if table is None:
            if len(self._location_tables) > 64:
                self._location_tables.clear()
            table = self._location_tables[node.hash] = self.locations(node)
        return table[name]

    def _resolved(self, tech: Technique, node: Merge, name: str) -> tuple[Any, ...]:
        location = self._location(node, name)
        return tuple(
            repr(resolve_value(node.params[p.name], location))
            if not p.per_input
            else repr([resolve_value(v, location) for v in node.params[p.name]])
            for p in tech.params
        )

    def _merge_into(self, node: Merge, names: Sequence[str], out: Tensor, *, shared: bool) -> None:
        """``node``'s tensors ``names`` into flat ``out``: base, task vectors, technique, base
        added."""
        tech = get_technique(node.technique)
        location = self._location(node, names[0]) if is_layer_dependent(tech, node.params) else None
        uses_base = tech.needs_base or (tech.base_optional and node.base is not None)
        base, stack, resident = self._operands(node, names, uses_base, shared)  # (N,), (M, N)
        if resident and (base is not None or not uses_base):
            if self._fused_into(node, tech, names, location, stack, base, out):
                return
        self._technique_into(node, tech, names, location, stack, resident, out)
        if base is not None:
            add_(out, base)

    def _technique_into(
        self,
        node: Merge,
        tech: Technique,
        names: Sequence[str],
        location: TensorLocation | None,
        stack: Tensor,
        resident: bool,
        out: Tensor,
    ) -> None:
        """The technique's eager path: the merged values (task vector, without the base)."""
        generators = self._generators(node, names) if tech.randomized else None
        ranked = None
        if (
            tech.ranked and resident and tech.needs_base
        ):  # the pool's task vectors: sorted copies too
            ranked = self.pool.ranked([c.name for c in node.inputs], names)  # type: ignore[attr-defined]
        if tech.segmented:
            sizes = self._sizes(node, names)
            apply_technique(
                tech,
                stack,
                node.params,
                location,
                generators,
                segments=sizes,
                out=out,
                ranked=ranked,
            )
        else:  # one tensor, in its own shape
            shape = self.shape(node, names[0])
            generator = generators[0] if generators else None
            apply_technique(
                tech,
                stack.reshape(-1, *shape),
                node.params,
                location,
                generator,
                out=out.view(shape),
            )

    def _fused_into(
        self,
        node: Merge,
        tech: Technique,
        names: Sequence[str],
        location: TensorLocation | None,
        stack: Tensor,
        base: Tensor | None,
        out: Tensor,
    ) -> bool:
        """``node``'s tensors through the fused kernel (:mod:`.fused`), base included; False
        when not fusable (the caller then computes all of ``out``).

        TIES goes in runs of tensors whose sizes share a row width (:func:`.fused.row_pieces`),
        each laid out as rows with a trim threshold per row and input, from the pool's
        magnitude orders; the other techniques take the tensors in one flat call.
        """
        if self.fused is None or not self.fused.enabled:
            return False
        values = resolved_params(tech, node.params, location)
        if tech.fusion is None or tech.fusion.trim != "magnitude":
            plan = plan_for(tech.name, values)
            return plan is not None and self._fused_piece(
                node, tech, names, location, plan, stack, base, out
            )
        sizes = self._sizes(node, names)
        orders = self.pool.trim_orders([c.name for c in node.inputs], names)  # type: ignore[attr-defined]
        if orders is None or 0 in sizes:
            return False
        for tensors, columns, rows in self._trim_pieces(sizes):
            cuts = rows.cuts(orders[:, columns], stack[:, columns], values["density"])
            plan = plan_for(tech.name, values, cuts)
            assert plan is not None
            shape = (-1, rows.width)
            if not self._fused_piece(
                node,
                tech,
                names[tensors],
                location,
                plan,
                stack[:, columns].unflatten(1, shape),
                None if base is None else base[columns].view(shape),
                out[columns].view(shape),
            ):
                return False
        return True

    def _trim_pieces(self, sizes: Sequence[int]) -> list[tuple[slice, slice, TrimRows]]:
        """TIES's kernel calls for consecutive tensors of ``sizes``: the tensors and columns of
        each and their row layout (cached by sizes)."""
        key = tuple(sizes)
        found = self._trim_layouts.get(key)
        if found is None:
            if len(self._trim_layouts) > 256:
                self._trim_layouts.clear()
            starts = [0, *itertools.accumulate(sizes)]
            found = self._trim_layouts[key] = [
                (
                    slice(first, stop),
                    slice(starts[first], starts[stop]),
                    TrimRows.of(sizes[first:stop]),
                )
                for first, stop in row_pieces(sizes)
            ]
        return found

    def _fused_piece(
        self,
        node: Merge,
        tech: Technique,
        names: Sequence[str],
        location: TensorLocation | None,
        plan: KernelPlan,
        stack: Tensor,
        base: Tensor | None,
        out: Tensor,
    ) -> bool:
        """One kernel call: tensors ``names``, their columns of ``stack``, ``base`` and ``out``
        (flat, or as rows for TIES)."""
        assert self.fused is not None
        draws = self._draws(node, names) if "draw" in plan.modes else None
        flat_stack = stack.flatten(1)

        def reference(scratch: Tensor) -> Tensor:
            flat = scratch.view(-1)
            self._technique_into(node, tech, names, location, flat_stack, True, flat)
            return flat if base is None else add_(flat, base.reshape(-1))

        return self.fused.run(plan, stack, base, out, draws=draws, reference=reference)

    def _draws(self, node: Merge, names: Sequence[str]) -> Tensor:
        """The words a randomised merge draws for ``names``, as the streaming path draws them
        (:func:`.sparsify.draw_words`: per tensor, three inputs' levels to an int32 word,
        ``(⌈M/3⌉, N)``), kept for the next candidates. Drawn on the CPU (:meth:`_generators`),
        so only the words travel to a GPU."""
        key = (draw_hash(node), tuple(names))
        found = self._draw_cache.get(key)
        if found is not None:
            self._draw_cache.move_to_end(key)
            return found
        sizes = self._sizes(node, names)
        draws = draw_words(
            self._draw_buffer((word_rows(len(node.inputs)), sum(sizes))),
            segment_starts(sum(sizes), sizes),
            self._generators(node, names),
        )
        self._draw_cache[key] = draws
        return draws

    def _draw_buffer(self, shape: tuple[int, int]) -> Tensor:
        """Room for new draw words: the cache drops its oldest entries until the new ones fit
        its budget, and one of the dropped of the same shape is reused (fresh memory costs a
        page fault per 4 KiB when first written)."""
        budget = _DRAW_CACHE_MODELS * 4 * self.pool.resident_elements()
        held = sum(d.numel() * d.element_size() for d in self._draw_cache.values())
        spare = None
        while self._draw_cache and held + 4 * shape[0] * shape[1] > budget:
            _, dropped = self._draw_cache.popitem(last=False)
            held -= dropped.numel() * dropped.element_size()
            if tuple(dropped.shape) == shape:
                spare = dropped
        if spare is not None:
            return spare
        return torch.empty(shape, dtype=torch.int32, device=self.pool.device)

    def _generators(self, node: Merge, names: Sequence[str]) -> list[torch.Generator]:
        """One generator per tensor, seeded by :func:`draw_hash` (computed once) and its name.

        CPU generators on every device, so a recipe's draws do not depend on where it is built
        (:func:`.sparsify.draw_words`).
        """
        key = draw_hash(node)
        return [torch.Generator().manual_seed(tensor_seed(key, name)) for name in names]

    def _operands(
        self, node: Merge, names: Sequence[str], needs_base: bool, shared: bool
    ) -> tuple[Tensor | None, Tensor, bool]:
        """The base values (None without a base), the ``(M, N)`` stack of the inputs' values —
        task vectors when there is a base — and whether the stack is the resident pool's. Both
        read only: views of the resident pool where it holds them, else read (in parallel) into
        the graph's buffers."""
        base, stack = self._resident_operands(node, names, needs_base)
        resident = stack is not None
        sizes = self._sizes(node, names)
        jobs: list[tuple[RecipeNode, Tensor]] = []
        if needs_base and base is None:
            assert node.base is not None
            base = self._buffer("base", sum(sizes), shared)
            jobs.append((node.base, base))
        if stack is None:
            stack = self._buffer("stack", len(node.inputs) * sum(sizes), shared).view(
                len(node.inputs), -1
            )
            jobs += zip(node.inputs, stack, strict=True)
        if all(isinstance(job, Source) for job, _ in jobs):  # plain reads: files in parallel
            parallel_map(lambda job: self._fill(job[0], names, job[1], sizes), jobs)
        else:
            for job, target in jobs:
                self._fill(job, names, target, sizes)
        if not resident and base is not None:
            subtract_rows_(stack, base)
        return base, stack, resident

    def _resident_operands(
        self, node: Merge, names: Sequence[str], needs_base: bool
    ) -> tuple[Tensor | None, Tensor | None]:
        """Views of the resident pool's base values and θ (or task-vector) rows, where it has
        them."""
        if not self.pool.resident:
            return None, None
        base = None
        if needs_base and isinstance(node.base, Source):
            base = self.pool.flat(node.base.name, names)
        if not all(isinstance(c, Source) for c in node.inputs):
            return base, None
        own_base = isinstance(node.base, Source) and node.base.name == self.pool.base
        if needs_base and not own_base:
            return base, None
        sources = [c.name for c in node.inputs]  # type: ignore[attr-defined]
        return base, self.pool.stack(sources, names, deltas=needs_base)

    def _fill(
        self, node: RecipeNode, names: Sequence[str], out: Tensor, sizes: Sequence[int]
    ) -> Tensor:
        """Write ``node``'s tensors ``names`` (``sizes`` elements each) one after another into flat
        ``out``."""
        if isinstance(node, Source):
            return self.pool.read_into(node.name, names, sizes, out)
        start = 0
        for name, size in zip(names, sizes, strict=True):
            value = self._compute(node, name)
            if value.numel() != size:
                raise MergeError(
                    f"tensor {name} is {list(value.shape)} in one input, {size} elements in another"
                )
            out[start : start + size].copy_(value.reshape(-1))
            start += size
        return out

    def count(self, node: RecipeNode, names: Sequence[str]) -> int:
        """Elements in tensors ``names`` of ``node``."""
        return sum(self._sizes(node, names))

    def _sizes(self, node: RecipeNode, names: Sequence[str]) -> list[int]:
        leaf = node
        while isinstance(leaf, Merge):  # a merge has its first input's shapes
            leaf = leaf.inputs[0]
        if not isinstance(leaf, Source):
            return [math.prod(self.shape(node, name)) for name in names]
        key = (leaf.name, tuple(names))
        found = self._size_lists.get(key)
        if found is None:
            if len(self._size_lists) > 256:
                self._size_lists.clear()
            found = self._size_lists[key] = [math.prod(self.shape(leaf, n)) for n in names]
        return found

    def release(self) -> None:
        """Free the reused buffers (a streaming merge holds the largest batch until then)."""
        self._buffers.clear()

    def _buffer(self, key: str, count: int, shared: bool) -> Tensor:
        """``count`` float32 elements: a reused buffer when ``shared``, else a new one."""
        if not shared:
            return torch.empty(count, dtype=torch.float32, device=self.pool.device)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < count:
            buffer = self._buffers[key] = torch.empty(
                count, dtype=torch.float32, device=self.pool.device
            )
        return buffer[:count]

    def _head_from_embedding(self, node: LayerStack) -> str | None:
        """The embedding tensor of ``head_from``'s input when that input ties its head to it
        (stores no head) and the stack's embeddings come from another input: the stack is then
        untied, its head that embedding. None otherwise."""
        if node.head_input == node.embed_from:
            return None
        names = self.names(node.inputs[node.head_input])
        if any(parse_layer(n) is None and component_of(n) == "head" for n in names):
            return None
        embeddings = [
            n for n in names if parse_layer(n) is None and component_of(n) == "embeddings"
        ]
        return embeddings[0] if len(embeddings) == 1 else None

    def _slot_lookup(self, node: LayerStack, name: str) -> tuple[RecipeNode, str, float, float]:
        """Where tensor ``name`` of the stack comes from: (input, its tensor name, the slot's
        scale if the tensor sets the branch's output size else 1, that gain's offset)."""
        parsed = parse_layer(name)
        if name == HEAD_TENSOR and parsed is None:
            embedding = self._head_from_embedding(node)
            if embedding is not None:
                return node.inputs[node.head_input], embedding, 1.0, 0.0
        if parsed is None:
            source = node.inputs[node.head_input if _is_post(name) else node.embed_from]
            return source, name, 1.0, 0.0
        if parsed.index >= len(node.slots):
            raise MergeError(f"tensor {name} is beyond the layer stack's {len(node.slots)} layers")
        slot = node.slots[parsed.index]
        child = node.inputs[slot.input]
        offset = branch_gain_offset(parsed.rest, self._model_type(child))
        scale = slot.scale if offset is not None else 1.0
        return child, parsed.with_index(slot.layer), scale, offset or 0.0

    def _model_type(self, node: RecipeNode) -> str | None:
        """The transformers model type ``node``'s tensors belong to (its first source's)."""
        while not isinstance(node, Source):
            node = node.inputs[0]  # type: ignore[attr-defined]
        return self.pool.source(node.name).config.get("model_type")

    def _remember(self, key: tuple[str, str], value: Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self._subtree_limit:
            return
        self._subtree_cache[key] = value
        self._subtree_bytes += size
        while self._subtree_bytes > self._subtree_limit:
            _, old = self._subtree_cache.popitem(last=False)
            self._subtree_bytes -= old.numel() * old.element_size()


def _is_post(name: str) -> bool:
    """Whether a non-layer tensor sits after the layers (final norm, head)."""
    return component_of(name) in ("head", "norms")


def is_layer_dependent(tech: Technique, params: Mapping[str, Any]) -> bool:
    """Whether any parameter value varies by layer or component (lists over groups, mappings)."""
    for param in tech.params:
        values = params[param.name] if param.per_input else [params[param.name]]
        if any(isinstance(v, list | Mapping) for v in values):
            return True
    return False
