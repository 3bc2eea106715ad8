"""``hf_dpdedup.pipeline``: a transformers pipeline around a deduplicated member, in one call."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def pipeline(
    task: str,
    model: str | os.PathLike,
    *,
    tokenizer: Any | None = None,
    pipeline_kwargs: dict[str, Any] | None = None,
    **from_pretrained_kwargs: Any,
) -> Any:
    """Load ``model`` (a member repo id or folder) with :meth:`DedupedModel.from_pretrained` and wrap
    it in ``transformers.pipeline(task, ...)`` with the tokenizer / image processor stored beside it.

    ``from_pretrained_kwargs`` (``revision``, ``token``, ``cache_dir``, ``local_files_only``,
    ``device``, ...) go to ``from_pretrained``; ``pipeline_kwargs`` to ``transformers.pipeline``.

    Example:
        >>> classify = hf_dpdedup.pipeline("text-classification", "my-org/minilm-sst2-eps4")
        >>> classify("a gripping, beautifully acted film")
        [{'label': 'LABEL_1', 'score': 0.93}]
    """
    import transformers

    from ..modeling import DedupedModel

    loaded = DedupedModel.from_pretrained(model, **from_pretrained_kwargs)
    folder = Path(loaded.dedup_info.member_path)
    kwargs = dict(pipeline_kwargs or {})
    if tokenizer is None and (any(folder.glob("tokenizer*")) or (folder / "vocab.txt").is_file()):
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    if "image_processor" not in kwargs and any((folder / f).is_file() for f in _PROCESSOR_FILES):
        kwargs["image_processor"] = transformers.AutoImageProcessor.from_pretrained(folder)
    return transformers.pipeline(task, model=loaded, tokenizer=tokenizer, **kwargs)
