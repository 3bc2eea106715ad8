"""Task adapters for the engine: evaluation batches and per-example score functions.

A score function maps ``(model, batch)`` to one score in [0, 1] per example (classification
correctness, next-token accuracy of a sentence), so utility is a mean with sensitivity 1/|D| and
any task fits the validators and the SVT. Batches are dicts of tensors ready for ``model(**batch)``
plus the labels the score needs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from ..privacy import PrivateDataset
from ..store.adapter import refuse_peft_model
from ..training.data import read_tsv
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


def tsv_batches(tokenizer, path: str | Path, task: str, **kw) -> list[dict[str, torch.Tensor]]:
    """Batches from a GLUE-style TSV (``label``, ``sentence``)."""
    data = read_tsv(path)
    labels = list(data.labels) if task != "causal-lm" else None
    return text_batches(tokenizer, list(data.texts), labels, **kw)


def private_tsv(tokenizer, path: str | Path, task: str, *, dataset_id: str, public_size: int,
                batch_size: int = 128, max_length: int = 64) -> PrivateDataset:
    """A private validation set behind the firewall: only charged mechanisms can read it.
    ``public_size`` is the normaliser fixed in advance (``PrivateDataset``), not the file's row count."""
    data = read_tsv(path)
    (columns,) = text_batches(tokenizer, list(data.texts), list(data.labels) if task != "causal-lm" else None,
                              batch_size=len(data.texts), max_length=max_length)
    return PrivateDataset(columns, dataset_id=dataset_id, public_size=public_size, batch_size=batch_size)


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
