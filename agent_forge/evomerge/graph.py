"""The recipe interpreter: what tensors a recipe has, their shapes, and each tensor's value.

:class:`SourcePool` holds the named input models — read lazily from disk for streaming, or
resident on the run's device (with task vectors against the base computed once) for
evaluation. :class:`RecipeGraph` walks a recipe for one tensor name at a time; both the
streaming writer and the in-memory materialiser call the same :meth:`RecipeGraph.compute`,
which is why they agree bit for bit.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .exceptions import ConfigurationError, MergeError
from .layout import component_of, is_residual_output, order_names, parse_layer, remap_layer_config, tensor_locations
from .recipe import LayerStack, Merge, RecipeNode, Source
from .sources import ModelSource
from .techniques import Technique, TensorLocation, apply_technique, get_technique

logger = logging.getLogger(__name__)


def tensor_seed(node_hash: str, tensor_name: str) -> int:
    """A stable 63-bit seed for one node and one tensor (the node hash already holds the recipe seed)."""
    digest = hashlib.blake2b(f"{node_hash}\0{tensor_name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def source_layers(config: Mapping[str, Any]) -> int:
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(config.get(key), int):
            return int(config[key])
    raise ConfigurationError("model config names no layer count (num_hidden_layers); cannot merge by layer")


class SourcePool:
    """The run's input models by name.

    With ``resident=True`` every tensor is loaded once onto ``device`` and, when a base is
    named, each model's task vector against it is computed once (``cache_deltas``).
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
        self._tensors: dict[tuple[str, str], Tensor] = {}
        self._deltas: dict[tuple[str, str], Tensor] = {}
        self._cache_deltas = cache_deltas and resident and base is not None
        if resident:
            for name, source in self.sources.items():
                for tensor_name in source.tensor_names:
                    self._tensors[(name, tensor_name)] = source.get_tensor(tensor_name).to(self.device)
                source.close()

    def source(self, name: str) -> ModelSource:
        try:
            return self.sources[name]
        except KeyError:
            raise ConfigurationError(
                f"the recipe names model {name!r}, which is not among the sources "
                f"({', '.join(self.sources)}); check the recipe's source names"
            ) from None

    def tensor(self, source: str, name: str) -> Tensor:
        """One source tensor in float32 on the pool's device."""
        if self.resident:
            stored = self._tensors.get((source, name))
            if stored is None:
                raise MergeError(f"model {source} has no tensor {name}")
            return stored.float()
        return self.source(source).get_tensor(name).to(self.device).float()

    def delta(self, source: str, name: str) -> Tensor | None:
        """The cached task vector ``θ_source − θ_base`` (None when not cached)."""
        if not self._cache_deltas or source == self.base:
            return None
        key = (source, name)
        if key not in self._deltas:
            self._deltas[key] = self.tensor(source, name) - self.tensor(self.base, name)  # type: ignore[arg-type]
        return self._deltas[key]


class RecipeGraph:
    """Answers, for a recipe: its layer count, tensor names and shapes, config, and tensor values."""

    def __init__(self, pool: SourcePool, *, subtree_cache_bytes: int = 0) -> None:
        self.pool = pool
        self._memo: dict[tuple[str, str], Tensor] = {}
        self._subtree_cache: OrderedDict[tuple[str, str], Tensor] = OrderedDict()
        self._subtree_bytes = 0
        self._subtree_limit = subtree_cache_bytes
        self._location_tables: dict[str, dict[str, TensorLocation]] = {}

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
            return order_names(self.pool.source(node.name).tensor_names)
        if isinstance(node, Merge):
            return self.names(node.inputs[0])
        assert isinstance(node, LayerStack)
        outer = [n for n in self.names(node.inputs[node.embed_from]) if parse_layer(n) is None and not _is_post(n)]
        outer += [n for n in self.names(node.inputs[node.head_input]) if parse_layer(n) is None and _is_post(n)]
        layer_names = []
        for k, slot in enumerate(node.slots):
            available = self.layers(node.inputs[slot.input])
            if slot.layer >= available:
                raise ConfigurationError(
                    f"layer slot {k} takes layer {slot.layer} of input {slot.input}, which has {available} layers"
                )
            for name in self._layer_tensors(node.inputs[slot.input], slot.layer):
                layer_names.append(name.with_index(k))
        return order_names(outer + layer_names)

    def _layer_tensors(self, node: RecipeNode, layer: int) -> list[Any]:
        parsed = (parse_layer(n) for n in self.names(node))
        return [p for p in parsed if p is not None and p.index == layer]

    def shape(self, node: RecipeNode, name: str) -> tuple[int, ...]:
        if isinstance(node, Source):
            return self.pool.source(node.name).info(name).shape
        if isinstance(node, Merge):
            return self.shape(node.inputs[0], name)
        child, child_name, _ = self._slot_lookup(node, name)  # type: ignore[arg-type]
        return self.shape(child, child_name)

    def config(self, node: RecipeNode) -> dict[str, Any]:
        """The output model's config.json content (layer count and per-layer lists updated)."""
        if isinstance(node, Source):
            return dict(self.pool.source(node.name).config)
        if isinstance(node, Merge):
            return self.config(node.inputs[0])
        assert isinstance(node, LayerStack)
        template = self.config(node.inputs[node.embed_from])
        path = [slot.layer for slot in node.slots]
        return remap_layer_config(template, path, self.layers(node.inputs[node.embed_from]))

    def locations(self, node: RecipeNode) -> dict[str, TensorLocation]:
        return tensor_locations(self.names(node), self.layers(node))

    # -- values ---------------------------------------------------------------------------------

    def compute(self, node: RecipeNode, name: str) -> Tensor:
        """The float32 value of tensor ``name`` of ``node`` (identical subtrees computed once)."""
        self._memo.clear()
        try:
            return self._compute(node, name, root=True)
        finally:
            self._memo.clear()

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
            value = self._merge(node, name)
        else:
            assert isinstance(node, LayerStack)
            child, child_name, scale = self._slot_lookup(node, name)
            value = self._compute(child, child_name)
            if scale != 1.0:
                value = value * scale
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

    def _merge(self, node: Merge, name: str) -> Tensor:
        tech = get_technique(node.technique)
        location = self._location(node, name) if is_layer_dependent(tech, node.params) else None
        generator = None
        if tech.randomized:
            generator = torch.Generator(device=self.pool.device)
            generator.manual_seed(tensor_seed(node.hash, name))
        if not tech.needs_base:
            stack = torch.stack([self._compute(i, name) for i in node.inputs])
            return apply_technique(tech, stack, node.params, location, generator)
        assert node.base is not None
        base = self._compute(node.base, name)
        deltas = []
        for child in node.inputs:
            cached = None
            if isinstance(child, Source) and isinstance(node.base, Source) and node.base.name == self.pool.base:
                cached = self.pool.delta(child.name, name)
            deltas.append(cached if cached is not None else self._compute(child, name) - base)
        merged = apply_technique(tech, torch.stack(deltas), node.params, location, generator)
        return base + merged

    def _slot_lookup(self, node: LayerStack, name: str) -> tuple[RecipeNode, str, float]:
        parsed = parse_layer(name)
        if parsed is None:
            return node.inputs[node.head_input if _is_post(name) else node.embed_from], name, 1.0
        if parsed.index >= len(node.slots):
            raise MergeError(f"tensor {name} is beyond the layer stack's {len(node.slots)} layers")
        slot = node.slots[parsed.index]
        scale = slot.scale if is_residual_output(parsed.rest) else 1.0
        return node.inputs[slot.input], parsed.with_index(slot.layer), scale

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
