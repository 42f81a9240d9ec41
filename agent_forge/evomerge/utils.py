"""The helpers the specification names, thin over the modules that do the work.

``load_models``, ``save_model``, ``validate_merge_config``, ``generate_text``,
``evaluate_model``, ``setup_gpu_if_available``, ``clean_up_models`` and ``MERGE_TECHNIQUES``.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .config import Configuration, ModelReference
from .exceptions import ConfigurationError
from .sources import ModelSource, check_compatible, open_source
from .storage import atomic_directory, check_destination, created_paths, forget_created
from .techniques import MERGE_TECHNIQUES

if TYPE_CHECKING:
    from .evaluation import TaskScores

logger = logging.getLogger(__name__)

__all__ = [
    "MERGE_TECHNIQUES",
    "clean_up_models",
    "evaluate_model",
    "generate_text",
    "load_models",
    "save_model",
    "setup_gpu_if_available",
    "validate_merge_config",
]


def load_models(
    references: Sequence[ModelReference],
    *,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> list[ModelSource]:
    """Open each referenced model lazily: config and tensor headers now, tensors on demand.

    A reference's path may be a local folder, a Hugging Face id (from the local cache, or
    downloaded when the hub is reachable) or a ``.gguf`` file.

    Raises:
        ModelLoadError: a path that does not exist, a hub id not available offline, pickled
            weights without ``allow_pickle``, custom code without ``trust_remote_code``.
    """
    return [
        open_source(
            ref.name, ref.path, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code
        )
        for ref in references
    ]


def validate_merge_config(
    config: Configuration, sources: Sequence[ModelSource] | None = None
) -> list[ModelSource]:
    """Check a configuration before any merge; returns the opened sources (models, then base).

    Checks the merge settings against the technique registry (known method, parameters in
    range, a base model where one is needed), then that the models can be merged weight by
    weight: same architecture, tensor names, shapes and tokenizer vocabulary.

    Raises:
        ConfigurationError: a bad setting (names the field and what is allowed).
        IncompatibleModelsError: every mismatch between the models.
    """
    from .recipe import Merge, Source
    from .techniques import get_technique

    settings = config.merge_settings
    if len(config.models) < 2:
        raise ConfigurationError(
            f"models: {len(config.models)} given; a merge needs at least 2 models"
        )
    method = settings.merge_method
    if method in MERGE_TECHNIQUES:
        tech = get_technique(method)
        if tech.needs_base and config.base_model is None:
            raise ConfigurationError(
                f"merge_settings.merge_method = {method!r} needs base_model; set it (or --base)"
            )
        inputs = [Source(m.name) for m in config.models]
        if tech.max_inputs is not None:
            inputs = inputs[: tech.max_inputs]
        params = {k: v for k, v in settings.parameters.items() if k != "seed"}
        base = Source(config.base_model.name) if config.base_model is not None else None
        Merge(method, inputs, params, tech.base_for(base))
    elif method in ("ps", "ps_dfs") and config.base_model is None:
        raise ConfigurationError(
            f"merge_settings.merge_method = {method!r} merges task vectors; "
            "set base_model (or --base)"
        )
    if method == "mixed" and settings.techniques is not None and config.base_model is None:
        baseless = [
            t
            for t in settings.techniques
            if t == "dfs" or (t != "ps" and not get_technique(t).needs_base)
        ]
        if not baseless:
            raise ConfigurationError(
                f"merge_settings.techniques = {settings.techniques} all merge task vectors; "
                "set base_model (or --base), or add a technique that needs none (linear, slerp)"
            )
    refs = list(config.models) + ([config.base_model] if config.base_model else [])
    opened = (
        list(sources)
        if sources is not None
        else load_models(
            refs, allow_pickle=settings.allow_pickle, trust_remote_code=settings.trust_remote_code
        )
    )
    check_compatible(opened, layer_stacking=method in ("dfs", "ps_dfs", "mixed"))
    return opened


def save_model(
    model: Any,
    tokenizer: Any,
    path: str | Path,
    *,
    overwrite: bool = False,
    max_shard_size: str = "2GB",
    protected: Iterable[str | Path] = (),
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Save a model and tokenizer as a Hugging Face folder, atomically.

    Written into a temporary folder beside ``path`` and renamed into place when complete, so
    a failure leaves neither a destination nor residue. Refuses a non-empty destination
    unless ``overwrite``, and any destination inside a ``protected`` (source model) folder.
    """
    dest = check_destination(path, overwrite=overwrite, protected=[Path(p) for p in protected])
    with atomic_directory(dest, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None and not (tmp / "generation_config.json").exists():
            generation_config.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
    logger.info("saved model to %s", dest)
    return dest


def generate_text(
    model: Any, tokenizer: Any, prompt: str, max_length: int = 100, **kwargs: Any
) -> str:
    """Greedy continuation of ``prompt`` (see
    :func:`agent_forge.evomerge.evaluation.generate_text`)."""
    from .evaluation import generate_text as _generate

    return _generate(model, tokenizer, prompt, max_length=max_length, **kwargs)


def evaluate_model(
    model: Any,
    tokenizer: Any = None,
    config: Configuration | None = None,
    *,
    split: str = "test",
    limit: int | None = None,
) -> TaskScores:
    """Score a model on the configuration's tasks (default: the embedded default's tasks).

    ``model`` is a live model or a model folder/path (then ``tokenizer`` may be None).
    """
    from .config import create_default_config
    from .evaluation import TaskEvaluator, load_tasks

    config = config or create_default_config()
    if not isinstance(model, torch.nn.Module):
        model, tokenizer = load_model_for_inference(str(model), config)
    settings = config.evaluation_settings
    if not settings.tasks:
        raise ConfigurationError("evaluation_settings.tasks is empty; name at least one task file")
    evaluator = TaskEvaluator(
        load_tasks(settings.tasks),
        batch_size=settings.batch_size,
        fitness_sample_size=settings.fitness_sample_size,
        seed=config.seed,
    )
    return evaluator.evaluate(model, tokenizer, split, limit=limit)


def load_model_for_inference(
    path: str, config: Configuration | None = None, device: str = "auto"
) -> tuple[Any, Any]:
    """Load a model (folder, hub id or GGUF) and its tokenizer for evaluation or generation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    settings = config.merge_settings if config is not None else None
    source = open_source(
        "model",
        path,
        allow_pickle=bool(settings and settings.allow_pickle),
        trust_remote_code=bool(settings and settings.trust_remote_code),
    )
    target, dtype = setup_gpu_if_available(device if config is None else config.device)
    trust = bool(settings and settings.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        source.folder,
        dtype=dtype,
        trust_remote_code=trust,
        use_safetensors=source.weight_format == "safetensors",
    )
    tokenizer = AutoTokenizer.from_pretrained(source.folder, trust_remote_code=trust)
    return model.to(target).eval(), tokenizer


_device_choice: dict[str, tuple[torch.device, torch.dtype]] = {}


def setup_gpu_if_available(device: str = "auto") -> tuple[torch.device, torch.dtype]:
    """Pick the device and dtype once: CUDA with bf16 when available (or asked), else CPU fp32.

    Raises:
        ConfigurationError: ``device="cuda"`` on a machine without CUDA.
    """
    if device in _device_choice:
        return _device_choice[device]
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigurationError(
            "device = 'cuda' but no CUDA GPU is available; use --device cpu or auto"
        )
    if device in ("cuda", "auto") and torch.cuda.is_available():
        choice = (
            torch.device("cuda"),
            torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16,
        )
        logger.info("using GPU %s with %s", torch.cuda.get_device_name(0), choice[1])
    else:
        choice = (torch.device("cpu"), torch.float32)
        logger.info("using CPU with float32 (%d threads)", torch.get_num_threads())
    _device_choice[device] = choice
    return choice


def clean_up_models(paths: Iterable[str | Path] | None = None) -> list[Path]:
    """Delete model folders this process created (all of them, or those of ``paths`` it created).

    A path the run did not create is never deleted: it is skipped with a warning.
    Returns the deleted paths.
    """
    owned = created_paths()
    wanted = owned if paths is None else {Path(p).resolve() for p in paths}
    deleted = []
    for path in sorted(wanted):
        if path not in owned:
            logger.warning("not deleting %s: this run did not create it", path)
            continue
        if path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            deleted.append(path)
        forget_created(path)
    return deleted
