"""AdvancedModelMerger: materialise recipes — streamed to a Hugging Face folder, or in place.

Two ways to turn a recipe into weights, both through :meth:`RecipeGraph.compute`, so they give
bit-identical tensors:

- :meth:`AdvancedModelMerger.merge` streams: for each run of consecutive output tensors
  (:meth:`RecipeGraph.batches`), read the inputs from the source files into reused buffers,
  compute, append to the output shard. Peak memory is a few of the largest tensors. The
  folder appears atomically with config, tokenizer, the recipe and a model card.
- :meth:`AdvancedModelMerger.materialize` writes a candidate into one resident model's
  parameters (sources and task vectors held on the device): no disk, no re-instantiation
  unless the layer count changes. The parameters are views of one flat buffer, which the
  graph writes batch by batch without copies. This is what evaluation uses.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .config import Configuration, MergeSettings, parse_size
from .exceptions import ConfigurationError, EvoMergeException, MergeError
from .fused import FusedKernels, wanted
from .graph import RecipeGraph, SourcePool
from .recipe import LayerSlot, LayerStack, Merge, RecipeNode, Source, recipe_from_dict
from .sources import ModelSource, check_compatible, open_source
from .storage import (
    StreamingSafetensorsWriter,
    TensorPlan,
    WriteBehind,
    atomic_directory,
    check_destination,
    plan_shards,
    shard_file_names,
    write_shard_index,
)
from .techniques import get_technique

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

RECIPE_FILE = "evomerge_recipe.json"
#: Resident models (one per model config) kept by :meth:`AdvancedModelMerger.materialize`.
RESIDENT_MODELS = 8
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def open_sources(config: Configuration) -> tuple[dict[str, ModelSource], str | None]:
    """Open the configuration's models and base lazily. Returns (name → source, base name)."""
    settings = config.merge_settings
    refs = list(config.models) + ([config.base_model] if config.base_model is not None else [])
    names = [r.name for r in refs]
    if len(set(names)) != len(names):
        raise ConfigurationError(f"model and base names must differ; got {', '.join(names)}")
    sources = {
        ref.name: open_source(
            ref.name,
            ref.path,
            allow_pickle=settings.allow_pickle,
            trust_remote_code=settings.trust_remote_code,
        )
        for ref in refs
    }
    return sources, (config.base_model.name if config.base_model is not None else None)


class AdvancedModelMerger:
    """Merges the configured models by recipe.

    Args:
        config: the run configuration (models, base, merge settings). Sources are opened lazily
            and checked for compatibility unless ``sources`` are given.
        sources: already opened sources by name (the names recipes use).
        base: the name of the base model among ``sources``.
        device: where tensors are computed.
        resident: hold every source tensor (and task vector) on ``device`` — for evaluating
            many candidates; streaming merges of large models leave it off.
        subtree_cache_bytes: memory for inner nodes' tensors kept between candidates (a nested
            candidate's shared subtrees are computed once); default two float32 models when
            resident, none otherwise.
        fused_kernels: ``auto``, ``on`` or ``off`` — resident task-vector merges through one
            compiled kernel (:mod:`.fused`); default the merge settings' ``fused_kernels``.
    """

    def __init__(
        self,
        config: Configuration | None = None,
        *,
        sources: Mapping[str, ModelSource] | None = None,
        base: str | None = None,
        device: str | torch.device = "cpu",
        resident: bool = False,
        subtree_cache_bytes: int | None = None,
        fused_kernels: str | None = None,
    ) -> None:
        self.config = config
        self.settings = config.merge_settings if config is not None else MergeSettings()
        if sources is None:
            if config is None:
                raise ConfigurationError(
                    "AdvancedModelMerger needs a configuration or opened sources"
                )
            sources, base = open_sources(config)
            stacking = self.settings.merge_method in ("dfs", "ps_dfs", "mixed")
            check_compatible(list(sources.values()), layer_stacking=stacking)
        self.sources = dict(sources)
        self.base = base
        self.model_names = [n for n in self.sources if n != base]
        self.device = torch.device(device)
        self.pool = SourcePool(self.sources, base, resident=resident, device=self.device)
        if subtree_cache_bytes is None:
            subtree_cache_bytes = 2 * self._float32_model_bytes() if resident else 0
        fused = None
        setting = fused_kernels or self.settings.fused_kernels
        if resident and wanted(setting, self.device, self.pool.resident_elements()):
            fused = FusedKernels()
        self.graph = RecipeGraph(self.pool, subtree_cache_bytes=subtree_cache_bytes, fused=fused)
        self._resident_models: OrderedDict[str, _ResidentModel] = OrderedDict()

    def _float32_model_bytes(self) -> int:
        first = self.sources[self.model_names[0]]
        return sum(4 * math.prod(first.info(n).shape) for n in first.tensor_names)

    # -- recipes implied by the settings ---------------------------------------------------------

    def default_recipe(self) -> RecipeNode:
        """The one-shot recipe ``MergeSettings`` describes (``merge_method`` and ``parameters``)."""
        method, params = self.settings.merge_method, dict(self.settings.parameters)
        if method == "mixed":
            raise ConfigurationError(
                "merge_method 'mixed' names a search, not one merge; choose a technique "
                "(e.g. ties) or ps / dfs / ps_dfs for a one-shot merge"
            )
        if method == "ps":
            return self._ps_merge(params)
        if method == "dfs":
            return self._dfs_merge(params.get("slots"), embed_from=int(params.get("embed_from", 0)))
        if method == "ps_dfs":
            ps = self._ps_merge(params.get("ps", {}))
            return self._dfs_merge(params.get("slots"), inputs=[ps, *self._source_nodes()])
        seed = params.pop("seed", self.config.seed if self.config is not None else 0)
        return Merge(method, self._source_nodes(), params, self._base_node(method), seed)

    def _source_nodes(self) -> list[RecipeNode]:
        return [Source(n) for n in self.model_names]

    def _base_node(self, technique: str) -> RecipeNode | None:
        if self.base is None:
            if get_technique(technique).needs_base:
                raise ConfigurationError(
                    f"{technique} needs a base model; set base_model (or --base)"
                )
            return None
        return Source(self.base)

    def _ps_merge(
        self, params: Mapping[str, Any] | None = None, technique: str | None = None
    ) -> Merge:
        """A parameter-space merge of the sources with per-layer-group parameters.

        Each model's ``weight``/``density`` may be a scalar, a list over layer groups, or a
        mapping by component (``attention``, ``mlp``, ``embeddings``, ``norms``, ``head``).
        """
        technique = technique or self.settings.ps_technique
        params = dict(params or {})
        seed = params.pop("seed", self.config.seed if self.config is not None else 0)
        return Merge(technique, self._source_nodes(), params, self._base_node(technique), seed)

    def _dfs_merge(
        self,
        slots: Sequence[Any] | None = None,
        inputs: Sequence[RecipeNode] | None = None,
        embed_from: int = 0,
    ) -> LayerStack:
        """A data-flow-space merge: a path of (input, layer, scale) slots over ``inputs``.

        Without ``slots`` the path is every layer of the first input in order (scale 1).
        """
        inputs = list(inputs) if inputs is not None else self._source_nodes()
        if not slots:
            slots = [LayerSlot(0, k, 1.0) for k in range(self.graph.layers(inputs[0]))]
        stack = LayerStack(
            tuple(inputs),
            tuple(s if isinstance(s, LayerSlot) else LayerSlot(*s) for s in slots),
            embed_from,
        )
        self.graph.names(stack)  # validates every slot's layer index
        return stack

    # -- streaming to disk ------------------------------------------------------------------------

    def output_dtype(self) -> torch.dtype:
        if self.settings.dtype != "auto":
            return _DTYPES[self.settings.dtype]
        first = self.sources[self.model_names[0]]
        stored = first.info(first.tensor_names[0]).dtype
        return _DTYPES.get(stored, torch.float32)

    def merge(
        self,
        recipe: RecipeNode | None = None,
        output_dir: str | Path | None = None,
        *,
        overwrite: bool = False,
        source_paths: Mapping[str, str] | None = None,
    ) -> Path:
        """Stream ``recipe`` (default: the one the settings imply) to a Hugging Face folder.

        Returns the folder. Raises a subclass of EvoMergeException on bad input; on any failure
        no output folder is left behind.
        """
        recipe = recipe if recipe is not None else self.default_recipe()
        if output_dir is None:
            base_dir = (
                self.config.output_dir if self.config is not None else None
            ) or "evomerge_output"
            output_dir = Path(base_dir) / f"merge-{recipe.short_hash}"
        protected = [s.folder for s in self.sources.values()]
        dest = check_destination(output_dir, overwrite=overwrite, protected=protected)
        started = time.perf_counter()
        dtype = self.output_dtype()
        plan = [TensorPlan(n, self.graph.shape(recipe, n), dtype) for n in self.graph.names(recipe)]
        shards = plan_shards(plan, parse_size(self.settings.max_shard_size))
        files = shard_file_names(len(shards))
        with atomic_directory(dest, overwrite=overwrite) as tmp, WriteBehind(self.device) as output:
            for shard, file in zip(shards, files, strict=True):
                writer = StreamingSafetensorsWriter(tmp / file, shard)
                for batch in self._batches(recipe, shard):
                    values = self._compute_checked(recipe, batch, output.buffer(batch))
                    output.submit(partial(writer.write_all, values, dtype))
                output.drain()
                writer.close()
            write_shard_index(tmp, shards, files)
            self._write_metadata(tmp, recipe, dtype, source_paths)
        for source in self.sources.values():
            source.close()
        self.graph.release()
        logger.info(
            "merged %s into %s in %.2f s", recipe.short_hash, dest, time.perf_counter() - started
        )
        return dest

    def _batches(self, recipe: RecipeNode, shard: Sequence[TensorPlan]) -> list[list[TensorPlan]]:
        plans = {item.name: item for item in shard}
        return [[plans[name] for name in run] for run in self.graph.batches(recipe, list(plans))]

    def _compute_checked(
        self, recipe: RecipeNode, batch: Sequence[TensorPlan], out: torch.Tensor
    ) -> list[tuple[TensorPlan, torch.Tensor]]:
        """The batch's values as views of flat ``out``, each checked against its plan."""
        try:
            shapes = [tuple(self.graph.shape(recipe, item.name)) for item in batch]
            flat = self.graph.compute_into(recipe, [item.name for item in batch], out)
        except EvoMergeException:
            raise
        except (
            RuntimeError,
            ValueError,
        ) as exc:  # torch shape errors: a source that does not match the others
            names = batch[0].name if len(batch) == 1 else f"{batch[0].name} … {batch[-1].name}"
            raise MergeError(
                f"cannot merge tensor {names}: {str(exc).splitlines()[0]}; "
                "the sources' tensors differ in shape (check the models)"
            ) from None
        values, start = [], 0
        for item, shape in zip(batch, shapes, strict=True):
            if shape != item.shape:
                raise MergeError(
                    f"tensor {item.name} came out {list(shape)}, expected {list(item.shape)}"
                )
            size = math.prod(shape)
            values.append((item, flat[start : start + size].view(shape)))
            start += size
        return values

    def _write_metadata(
        self,
        folder: Path,
        recipe: RecipeNode,
        dtype: torch.dtype,
        source_paths: Mapping[str, str] | None,
    ) -> None:
        config = self.graph.config(recipe)
        dtype_name = str(dtype).removeprefix("torch.")
        config["dtype"] = dtype_name
        if "torch_dtype" in config:
            config["torch_dtype"] = dtype_name
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        template = self._template_source(recipe)
        for file in [*template.tokenizer_files(), template.folder / "generation_config.json"]:
            if file.is_file():
                shutil.copy2(file, folder / file.name)
        paths = {
            name: (source_paths or {}).get(name, source.path)
            for name, source in self.sources.items()
        }
        used = recipe.source_names()
        info = {
            name: {
                "hub_id": source.hub_id(),
                "sha256": source.content_hash(),
                "license": source.license(),
            }
            for name, source in self.sources.items()
            if name in used
        }
        document = recipe_document(recipe, paths, self.base, dtype_name, info)
        (folder / RECIPE_FILE).write_text(json.dumps(document, indent=2) + "\n")
        (folder / "README.md").write_text(model_card(document))

    def _template_source(self, recipe: RecipeNode) -> ModelSource:
        node = recipe
        while not isinstance(node, Source):
            node = node.inputs[node.embed_from] if isinstance(node, LayerStack) else node.inputs[0]  # type: ignore[attr-defined]
        return self.sources[node.name]

    # -- in memory ---------------------------------------------------------------------------------

    def materialize(self, recipe: RecipeNode) -> PreTrainedModel:
        """Write ``recipe`` into a resident model's parameters and return the model (eval mode).

        One model is kept per model config (layer count, per-layer lists such as
        ``layer_types``, head tying), the :data:`RESIDENT_MODELS` most recently used; its
        parameters are views of one flat buffer, which the graph writes batch by batch, so
        switching candidates overwrites them in place.
        """
        config = self.graph.config(recipe)
        key = json.dumps(config, sort_keys=True, default=str)
        resident = self._resident_models.get(key)
        if resident is None:
            resident = self._resident_models[key] = _ResidentModel.build(
                self._build_model(config), self.graph.names(recipe)
            )
            while len(self._resident_models) > RESIDENT_MODELS:
                self._resident_models.popitem(last=False)
        self._resident_models.move_to_end(key)
        names = self.graph.names(recipe)
        resident.check(names)
        with torch.no_grad():
            for run in self.graph.batches(recipe, names):
                target = resident.span(run)
                if target is not None and target.dtype == torch.float32:
                    self.graph.compute_into(recipe, run, target)
                    continue
                values = self.graph.compute_into(
                    recipe, run, torch.empty(self.graph.count(recipe, run), device=self.device)
                )
                resident.scatter(run, values)
        return resident.model

    def _build_model(self, config: Mapping[str, Any]) -> PreTrainedModel:
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.initialization import no_init_weights

        config_dict = dict(config)
        config_dict.pop("dtype", None)
        config_dict.pop("torch_dtype", None)
        model_type = config_dict.pop("model_type")
        hf_config = AutoConfig.for_model(model_type, **config_dict)
        with no_init_weights():
            model = AutoModelForCausalLM.from_config(hf_config, dtype=self.output_dtype())
        model.tie_weights()  # no_init_weights skips the tying: a tied head must share storage
        return model.to(self.device).eval()


def recipe_document(
    recipe: RecipeNode,
    sources: Mapping[str, str],
    base: str | None,
    dtype: str,
    source_info: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """The content of ``evomerge_recipe.json``: enough for ``--merge`` to rebuild the model.

    ``sources`` maps each model name to the id or path it was given as; ``source_info`` adds,
    per model, its Hugging Face id (or None), the SHA-256 of its weights (so a moved or
    re-downloaded model can be checked) and its license.
    """
    used = recipe.source_names()
    document: dict[str, Any] = {
        "format": "evomerge-recipe",
        "version": 1,
        "hash": recipe.hash,
        "dtype": dtype,
        "base": base if base in used else None,
        "sources": {name: path for name, path in sources.items() if name in used},
    }
    if source_info:
        document["source_info"] = {n: dict(v) for n, v in source_info.items() if n in used}
    document["recipe"] = recipe.to_dict()
    return document


def describe(recipe: RecipeNode, indent: str = "") -> str:
    """A readable outline of a recipe tree (for model cards and logs)."""
    if isinstance(recipe, Source):
        return f"{indent}- {recipe.name}\n"
    if isinstance(recipe, LayerStack):
        path = ", ".join(f"{s.input}:{s.layer}×{s.scale:.3g}" for s in recipe.slots)
        text = (
            f"{indent}- layer stack of {len(recipe.slots)} layers [{path}] "
            f"(embeddings from input {recipe.embed_from})\n"
        )
        return text + "".join(describe(i, indent + "  ") for i in recipe.inputs)
    assert isinstance(recipe, Merge)
    params = json.dumps(recipe.params, separators=(", ", ": "))
    base = f", base {recipe.base.name}" if isinstance(recipe.base, Source) else ""
    text = f"{indent}- {recipe.technique}{base} {params}\n"
    return text + "".join(describe(i, indent + "  ") for i in recipe.inputs)


def model_card(document: Mapping[str, Any], scores: Mapping[str, float] | None = None) -> str:
    """The merged model's README.md (a Hugging Face model card) from its recipe document.

    The front matter lists as ``base_model`` only Hugging Face ids (never local or cache
    paths), the license the sources share (``other`` with a note when they differ or say
    none), ``pipeline_tag``, tags naming the techniques, and, given ``scores`` (per-task test
    accuracy in %), a model-index with them.
    """
    import yaml

    recipe = recipe_from_dict(document["recipe"])
    sources, info = document.get("sources", {}), document.get("source_info", {})
    used = sorted(recipe.source_names())
    hub_ids = sorted({i for n in used if (i := (info.get(n) or {}).get("hub_id"))})
    licenses = {(info.get(n) or {}).get("license") for n in used}
    license_ = licenses.pop() if len(licenses) == 1 and None not in licenses else "other"
    front: dict[str, Any] = {}
    if hub_ids:
        front["base_model"] = hub_ids
        front["base_model_relation"] = "merge"
    front["library_name"] = "transformers"
    front["license"] = license_
    front["pipeline_tag"] = "text-generation"
    front["tags"] = ["merge", "evomerge", *sorted(_techniques_of(recipe))]
    name = f"evomerge-{recipe.short_hash}"
    if scores:
        front["model-index"] = [
            {
                "name": name,
                "results": [
                    {
                        "task": {"type": "text-generation"},
                        "dataset": {"name": task, "type": task, "split": "test"},
                        "metrics": [{"type": "accuracy", "value": round(value, 2)}],
                    }
                    for task, value in scores.items()
                ],
            }
        ]
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", ""]
    lines += [f"# Merged model `{name}`", "", "Made with EvoMerge (`agent_forge.evomerge`) of:", ""]
    for source in used:
        hub = (info.get(source) or {}).get("hub_id")
        where = f"[{hub}](https://huggingface.co/{hub})" if hub else f"`{sources.get(source, '?')}`"
        note = " (base)" if source == document.get("base") else ""
        stated = (info.get(source) or {}).get("license")
        lines.append(f"- **{source}**{note}: {where}, license {stated or 'not stated'}")
    if license_ == "other":
        lines += [
            "",
            "The source models do not state one common license; check each one's before use.",
        ]
    if scores:
        lines += ["", "## Test scores", "", "| task | accuracy (%) |", "|---|---|"]
        lines += [f"| {task} | {value:.1f} |" for task, value in scores.items()]
    lines += [
        "",
        "## Recipe",
        "",
        describe(recipe).rstrip(),
        "",
        f"The full recipe is in `{RECIPE_FILE}`; rebuild the weights with",
        "",
        "```",
        f"python -m agent_forge.evomerge.cli --merge {RECIPE_FILE} --output DIR",
        "```",
        "",
        "(`--source NAME=PATH` points it at a model that has moved.)",
        "",
    ]
    return "\n".join(lines)


def _techniques_of(recipe: RecipeNode) -> set[str]:
    if isinstance(recipe, Source):
        return set()
    own = {recipe.technique} if isinstance(recipe, Merge) else {"layer-stack"}
    return own.union(*(_techniques_of(c) for c in recipe.children()))


class _ResidentModel:
    """A model whose parameters are views of one flat buffer, in the recipe's tensor order."""

    def __init__(
        self, model: PreTrainedModel, flat: torch.Tensor | None, offsets: dict[str, tuple[int, int]]
    ) -> None:
        self.model, self.flat, self.offsets = model, flat, offsets
        self.parameters = set(dict(model.named_parameters()))
        self._checked: tuple[str, ...] | None = None

    @classmethod
    def build(cls, model: PreTrainedModel, names: Sequence[str]) -> _ResidentModel:
        """Re-point the parameters ``names`` into one new flat buffer (when they share a dtype)."""
        targets = _targets(model)
        offsets, total = {}, 0
        for name in names:
            if name in targets:
                offsets[name] = (total, targets[name].numel())
                total += targets[name].numel()
        dtypes = {targets[name].dtype for name in offsets}
        if len(dtypes) != 1:
            return cls(model, None, offsets)
        first = targets[next(iter(offsets))]
        flat = torch.empty(total, dtype=first.dtype, device=first.device)
        with torch.no_grad():
            for name, (start, size) in offsets.items():
                targets[name].data = flat[start : start + size].view(targets[name].shape)
        return cls(model, flat, offsets)

    def check(self, names: Sequence[str]) -> None:
        """Raise MergeError unless the recipe's tensors are exactly the model's parameters."""
        if tuple(names) == self._checked:
            return
        missing = sorted(self.parameters - set(names))
        if missing:
            raise MergeError(f"the recipe gives no value for model parameter {missing[0]}")
        for name in names:
            if name not in self.offsets:
                raise MergeError(f"the model has no parameter {name} to receive the merged tensor")
        self._checked = tuple(names)

    def span(self, names: Sequence[str]) -> torch.Tensor | None:
        """The flat buffer's slice for consecutive tensors ``names`` (None if not consecutive)."""
        if self.flat is None:
            return None
        start = stop = self.offsets[names[0]][0]
        for name in names:
            offset, size = self.offsets[name]
            if offset != stop:
                return None
            stop += size
        return self.flat[start:stop]

    def scatter(self, names: Sequence[str], values: torch.Tensor) -> None:
        """Copy flat ``values`` of tensors ``names`` into their parameters (casting the dtype)."""
        targets = _targets(self.model)
        start = 0
        for name in names:
            target = targets[name]
            target.copy_(values[start : start + target.numel()].view(target.shape))
            start += target.numel()


def _targets(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    targets: dict[str, torch.Tensor] = dict(model.named_parameters())
    targets.update(dict(model.named_buffers()))
    return targets
