"""Task adapters for the engine: evaluation batches and per-example score functions.

A score function maps ``(model, batch)`` to one score in [0, 1] per example (classification
correctness, next-token accuracy of a sentence), so utility is a mean with sensitivity 1/|D| and
any task fits the validators and the SVT. Batches are dicts of tensors ready for ``model(**batch)``
plus the labels the score needs; :func:`source_batches` / :func:`private_source` build them from any
:class:`~hf_dpdedup.data.DataSource` with ``Dataset.map``.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Callable

import datasets
import numpy as np
import torch

from ..data.sources import DataSource, label_ids, load_source, require_columns
from ..errors import DataSourceError
from ..privacy import PrivateDataset
from ..store.adapter import refuse_peft_model
from ..training.heads import BertTopClsHead, cache_top_inputs, trained_module_names
from ..training.tasks import classification_correct, next_token_accuracy

ScoreFn = Callable[[Any, dict[str, torch.Tensor]], torch.Tensor]


def classification_score(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return classification_correct(model(**inputs).logits, batch["labels"])


def classification_predict(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**{k: v for k, v in batch.items() if k != "labels"}).logits.argmax(dim=-1)


def token_accuracy_score(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return next_token_accuracy(model(**inputs).logits, batch["input_ids"], batch["attention_mask"])


SCORES: dict[str, ScoreFn] = {
    "text-classification": classification_score,
    "image-classification": classification_score,
    "causal-lm": token_accuracy_score,
}


def text_batches(
    tokenizer, texts: list[str], labels: list[int] | None, *, batch_size: int = 128, max_length: int = 64
) -> list[dict[str, torch.Tensor]]:
    """Tokenized, padded batches; ``labels`` are added when given (classification)."""
    batches = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[start : start + batch_size]), padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt")
        batch = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        if labels is not None:
            batch["labels"] = torch.tensor(labels[start : start + batch_size])
        batches.append(batch)
    return batches


def encode_source(processor, source: DataSource, task: str, *, batch_size: int | None = 128,
                  max_length: int = 64) -> datasets.Dataset:
    """``source`` tokenized (text tasks) or run through the image processor (``image-classification``) with
    ``Dataset.map(batched=True)``, one map batch per engine batch: texts are padded to the longest of
    their batch, exactly as :func:`text_batches` pads them (``datasets`` caches the result for on-disk
    data sets). Columns: the model inputs, plus ``labels`` (class ids, :func:`label_ids`) for
    classification; torch format. ``batch_size=None``: one batch of every row."""
    return _encode_parts(processor, load_source(source), source, task, [None], batch_size, max_length)[0]


def _encode_parts(processor, data: datasets.Dataset, source: DataSource, task: str, parts: list[np.ndarray | None],
                  batch_size: int | None, max_length: int) -> list[datasets.Dataset]:
    """:func:`encode_source` of each part of ``data`` (row indices in order; ``None``: every row). Class
    ids are read off the whole of ``data``, so that every part numbers the classes alike."""
    if len(data) == 0:
        raise DataSourceError(f"{source.describe()} holds no examples; pass a non-empty data set.")
    if task == "image-classification":
        source = dataclasses.replace(source, image_column=source.image_column or "image")
        roles: tuple[str, ...] = ("image", "label")
    else:
        roles = ("text",) if task == "causal-lm" else ("text", "label")
    require_columns(data, source, *roles)
    labels = label_ids(data, source) if "label" in roles else None
    encoded = []
    for rows in parts:
        part = data if rows is None else data.select(rows)
        part_labels = labels if rows is None or labels is None else [labels[i] for i in rows]
        if task == "image-classification":
            fn = functools.partial(_encode_images, processor, source.image_column, part_labels)
        else:
            fn = functools.partial(_encode_texts, processor, source.text_column, part_labels, max_length)
        encoded.append(part.map(fn, batched=True, batch_size=batch_size or len(part), with_indices=True,
                                remove_columns=part.column_names, desc=f"Encoding {source.describe()}")
                       .with_format("torch"))
    return encoded


def _encode_texts(tokenizer, column: str, labels: list[int] | None, max_length: int, batch: dict,
                  indices: list[int]) -> dict:
    texts = ["" if t is None else str(t) for t in batch[column]]
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length)
    out = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
    if labels is not None:
        out["labels"] = [labels[i] for i in indices]
    return out


def _encode_images(processor, column: str, labels: list[int], batch: dict, indices: list[int]) -> dict:
    images = [image if hasattr(image, "getbands") else _array_image(image) for image in batch[column]]
    # "pt" (every image processor backend returns torch tensors), stored as NumPy by datasets
    return {"pixel_values": processor(images=images, return_tensors="pt")["pixel_values"].numpy(),
            "labels": [labels[i] for i in indices]}


def _array_image(pixels) -> np.ndarray:
    """An image column of plain arrays (``[H, W]`` or ``[H, W, C]`` pixel values): channels last."""
    array = np.asarray(pixels)
    return array[..., None] if array.ndim == 2 else array


def source_batches(processor, source: DataSource | str | Path, task: str, *, batch_size: int = 128,
                   max_length: int = 64) -> list[dict[str, torch.Tensor]]:
    """Evaluation batches of any data source (a string is ``PATH_OR_ID[:SPLIT]``); ``processor`` is the
    members' tokenizer, or their image processor for ``image-classification``."""
    source = source if isinstance(source, DataSource) else DataSource.parse(source)
    return _batched(encode_source(processor, source, task, batch_size=batch_size, max_length=max_length), batch_size)


def held_out_batches(processor, source: DataSource | str | Path, task: str, *, fraction: float, seed: int = 0,
                     batch_size: int = 128, max_length: int = 64) -> tuple[list[dict[str, torch.Tensor]],
                                                                           list[dict[str, torch.Tensor]]]:
    """``(search, confirmation)``: one public data set cut at random (``seed``) into two disjoint parts,
    the second holding ``fraction`` of its examples, each as :func:`source_batches` would batch it.

    For a user with one public validation set: the search validates on the first part and its
    accepted replacements are confirmed on the second, which the search never saw."""
    if not 0 < fraction < 1:
        raise DataSourceError(f"The held-out fraction must be in (0, 1), got {fraction!r}; e.g. 0.5.")
    source = source if isinstance(source, DataSource) else DataSource.parse(source)
    data = load_source(source)
    n = len(data)
    held = int(round(n * fraction))
    if held < 1 or held >= n:
        raise DataSourceError(
            f"{source.describe()} has {n} examples: holding out {fraction:g} of them leaves one part empty; "
            "pass a larger validation set, a separate confirmation set, or no held-out part."
        )
    order = np.random.default_rng(seed).permutation(n)
    parts = np.sort(order[held:]), np.sort(order[:held])
    search, confirm = _encode_parts(processor, data, source, task, list(parts), batch_size, max_length)
    return _batched(search, batch_size), _batched(confirm, batch_size)


def _batched(encoded: datasets.Dataset, batch_size: int) -> list[dict[str, torch.Tensor]]:
    return [encoded[start : start + batch_size] for start in range(0, len(encoded), batch_size)]


def private_source(processor, source: DataSource | str | Path, task: str, *, dataset_id: str, public_size: int,
                   batch_size: int = 128, max_length: int = 64) -> PrivateDataset:
    """A private validation set behind the firewall: only charged mechanisms can read it. The encoded
    columns go straight into the :class:`PrivateDataset`; nothing else keeps them. ``public_size`` is the
    normaliser fixed in advance (``PrivateDataset``), not the data's row count."""
    source = source if isinstance(source, DataSource) else DataSource.parse(source)
    encoded = encode_source(processor, source, task, batch_size=None, max_length=max_length)
    return PrivateDataset(encoded[:], dataset_id=dataset_id, public_size=public_size, batch_size=batch_size)


def tsv_batches(tokenizer, path: str | Path, task: str, **kw) -> list[dict[str, torch.Tensor]]:
    """Batches from a GLUE-style TSV (``label``, ``sentence``): :func:`source_batches` of that file."""
    return source_batches(tokenizer, DataSource(str(path)), task, **kw)


def private_tsv(tokenizer, path: str | Path, task: str, *, dataset_id: str, public_size: int,
                batch_size: int = 128, max_length: int = 64) -> PrivateDataset:
    """:func:`private_source` of a GLUE-style TSV file."""
    return private_source(tokenizer, DataSource(str(path)), task, dataset_id=dataset_id, public_size=public_size,
                          batch_size=batch_size, max_length=max_length)


# --- fast validation of BERT-style classifiers ------------------------------------------------------
def cls_head_score(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Correctness from the top layer evaluated at [CLS] on cached inputs (see ``ClsHeadTask``)."""
    logits = BertTopClsHead(model)(batch["residual"], batch["context"])
    return classification_correct(logits, batch["labels"])


def cls_head_predict(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return BertTopClsHead(model)(batch["residual"], batch["context"]).argmax(dim=-1)


def cls_head_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = BertTopClsHead(model)(batch["residual"], batch["context"])
    return torch.nn.functional.cross_entropy(logits, batch["labels"])


class ClsHeadTask:
    """Validation of a BERT-style classifier at the cost of its head.

    The [CLS] inputs of the top layer's post-attention block are computed once with the full model;
    validation then runs only that block, the pooler and the classifier (``BertTopClsHead``, which
    uses the live model's own modules). This is the same computation as the full forward at [CLS] —
    as long as nothing below changes, which ``tensors`` guarantees: pass it as
    ``PlanConfig(only_tensors=task.tensors)`` so the engine never touches another block.
    """

    score_fn = staticmethod(cls_head_score)
    loss_fn = staticmethod(cls_head_loss)
    predict_fn = staticmethod(cls_head_predict)

    def __init__(self, model, tokenizer, *, max_length: int = 64) -> None:
        refuse_peft_model(model, "ClsHeadTask", "An adapter changes layers below the head, so the cached top-layer "
                          "inputs would not stay valid: validate adapter members on the full model "
                          "(DedupData(classification_score, ...)), or merge the adapter first (merge_and_unload()).")
        self.model, self.tokenizer, self.max_length = model, tokenizer, max_length
        self.tensors = frozenset(
            name for name, _ in model.named_parameters()
            if name.startswith(tuple(m + "." for m in trained_module_names(model)))
        )

    def columns(self, texts: list[str], labels: list[int]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        residual, context = cache_top_inputs(self.model, enc["input_ids"], enc["attention_mask"], dtype=torch.float32)
        return {"residual": residual, "context": context, "labels": torch.tensor(labels)}

    def batches(self, texts: list[str], labels: list[int], *, batch_size: int = 512) -> list[dict[str, torch.Tensor]]:
        columns = self.columns(texts, labels)
        n = len(columns["labels"])
        return [{k: v[i : i + batch_size] for k, v in columns.items()} for i in range(0, n, batch_size)]

    def private(self, texts: list[str], labels: list[int], *, dataset_id: str, public_size: int) -> PrivateDataset:
        return PrivateDataset(self.columns(texts, labels), dataset_id=dataset_id, public_size=public_size,
                              batch_size=512)
