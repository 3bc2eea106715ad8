"""``hf_dpdedup.pipeline``: a transformers pipeline around a deduplicated member, in one call."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import transformers

from .errors import LoadArgumentError
from .hub.cards import pipeline_tag
from .modeling import DedupedModel

_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
# keywords that locate or build the member: they go to DedupedModel.from_pretrained
_LOAD_KWARGS = ("cache_dir", "local_files_only", "force_download", "endpoint", "store_dir", "verify", "subfolder",
                "model_class", "attn_implementation")


def pipeline(
    task: str | None = None,
    model: str | os.PathLike | None = None,
    *,
    tokenizer: Any | None = None,
    image_processor: Any | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    device: int | str | torch.device | None = None,
    device_map: str | dict[str, Any] | None = None,
    dtype: torch.dtype | str | None = "auto",
    model_kwargs: dict[str, Any] | None = None,
    pipeline_kwargs: dict[str, Any] | None = None,
    **kwargs: Any,
) -> Any:
    """Load ``model`` (a member repo id or folder) with :meth:`DedupedModel.from_pretrained` and wrap
    it in ``transformers.pipeline(task, ...)`` with the tokenizer / image processor stored beside it.

    The signature follows ``transformers.pipeline``: ``task`` is inferred from the member's
    architecture when not given; ``revision``, ``token``, ``dtype`` (alias ``torch_dtype``),
    ``device_map`` and ``model_kwargs`` reach ``from_pretrained``, as do the loading keywords
    ``cache_dir``, ``local_files_only``, ``force_download``, ``endpoint``, ``store_dir``, ``verify``,
    ``subfolder``; ``device`` (``-1`` or ``"cpu"``, ``0`` or ``"cuda:0"``, ...) goes to the pipeline,
    and every other keyword (``top_k=``, ``batch_size=``, ...) to the pipeline class, as in
    transformers. ``pipeline_kwargs`` is an explicit dict of the latter. An adapter member (a peft
    adapter on a base) is loaded merged into its base (``merge_adapter=True``); pass
    ``model_kwargs={"merge_adapter": False}`` to run the ``PeftModel`` itself.

    Example:
        >>> classify = hf_dpdedup.pipeline(model="my-org/minilm-sst2-eps4", top_k=None, device=-1)
        >>> classify("a gripping, beautifully acted film")
        [[{'label': 'LABEL_1', 'score': 0.93}, {'label': 'LABEL_0', 'score': 0.07}]]
    """
    if model is None:
        raise LoadArgumentError("hf_dpdedup.pipeline needs model= (a member folder or Hub repo id).")
    load = dict(model_kwargs or {})
    load.update({k: kwargs.pop(k) for k in _LOAD_KWARGS if k in kwargs})
    torch_dtype = kwargs.pop("torch_dtype", None)
    load.setdefault("dtype", torch_dtype if torch_dtype is not None and dtype == "auto" else dtype)
    kwargs.pop("trust_remote_code", None)  # the member's code is this package: nothing remote runs
    load.setdefault("merge_adapter", True)  # an adapter member runs merged: pipelines take transformers models
    loaded = DedupedModel.from_pretrained(model, revision=revision, token=token, device_map=device_map, **load)
    folder = Path(loaded.dedup_info.member_path)
    task = task or pipeline_tag(type(loaded).__name__)
    if task is None:
        raise LoadArgumentError(
            f"Cannot infer the task of {type(loaded).__name__} ({model}): pass it, e.g. "
            "hf_dpdedup.pipeline(\"text-classification\", model=...)."
        )
    call = {**kwargs, **(pipeline_kwargs or {})}
    if tokenizer is None and (any(folder.glob("tokenizer*")) or (folder / "vocab.txt").is_file()):
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    if image_processor is None and any((folder / f).is_file() for f in _PROCESSOR_FILES):
        image_processor = transformers.AutoImageProcessor.from_pretrained(folder)
    if image_processor is not None:
        call["image_processor"] = image_processor
    return transformers.pipeline(task, model=loaded, tokenizer=tokenizer, device=device, **call)
