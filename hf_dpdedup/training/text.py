"""DP family training for sequence classification (the ``train-family`` command).

Three strategies:

* ``"top-cls"`` (BERT-style models): cache the frozen part's [CLS] activations once for the family
  (on disk, under ``out/_cache``), DP-train the top layer's post-attention block, pooler and
  classifier on the cache (see :mod:`.heads`).
* ``"direct"`` (any sequence classifier): Opacus on the whole model with the embeddings frozen and
  per-batch position/token-type ids. Slow on CPU; meant for small models.
* ``"lora"`` (any sequence classifier peft can adapt): a peft LoRA adapter (:mod:`.lora`) on the
  frozen base, the classifier trained through ``modules_to_save``; Opacus trains only those.
  Members are saved as adapter folders or merged models (``save_as``).
"""

from __future__ import annotations

import hashlib
import inspect
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils.data import TensorDataset

from ..errors import TrainingConfigError
from .data import TextClassificationData, seed_everything, tokenize
from .family import MemberSummary, check_family_request, train_members
from .heads import BertTopClsHead, batch_inputs, cache_top_inputs, freeze_all_but_top
from .lora import LoraMemberSaver, LoraSpec, check_save_modes, forward_peft_classifier, trainable_names, wrap_lora
from .opacus_train import DPConfig
from .tasks import classification_correct, mean_score

STRATEGIES = ("top-cls", "direct", "lora")


def load_base(base: str | Path, num_labels: int, *, seed: int):
    """Tokenizer and sequence classifier for ``base``; the classifier init is seeded."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(base)
    except (OSError, ValueError) as exc:
        raise TrainingConfigError(f"Cannot load a model config from {base!r}: {exc}") from exc
    if config.model_type not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        raise TrainingConfigError(
            f"{base!r} is a {config.model_type!r} model, which transformers cannot use for sequence "
            "classification; pass an encoder base such as a BERT checkpoint."
        )
    seed_everything(seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=num_labels)
    return tokenizer, model


def train_text_family(
    *,
    base: str | Path,
    train: TextClassificationData,
    public_val: TextClassificationData,
    public_test: TextClassificationData,
    epsilons: list[float],
    config: DPConfig,
    out: str | Path,
    dataset_id: str,
    strategy: str = "top-cls",
    max_length: int = 32,
    lora: LoraSpec | None = None,
    save_as: str = "adapter",
    extra_args: dict | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> list[MemberSummary]:
    """Train one member per ε (``config.epsilon`` is replaced) and save them under ``out``.

    ``strategy="lora"`` needs ``lora`` (the adapter's shape); its members are saved as peft adapter
    folders (``save_as="adapter"``) or merged transformers models (``save_as="merged"``).

    ``progress(label, done, total)`` reports caching and training progress. Returns one
    :class:`MemberSummary` per member, in the order of ``epsilons``, and writes ``family.json``.
    """
    check_family_request(epsilons, config.delta, train, public_val, public_test)
    if strategy not in STRATEGIES:
        raise TrainingConfigError(f"strategy must be one of {STRATEGIES}, got {strategy!r}.")
    _check_lora_request(strategy, lora, save_as)
    num_labels = max(train.num_labels, public_val.num_labels, public_test.num_labels)
    tokenizer, model = load_base(base, num_labels, seed=config.seed)
    saver = None
    if strategy == "lora":
        model = wrap_lora(model, lora, task_type="SEQ_CLS", seed=config.seed, base_name=base)
        trained_names = trainable_names(model)
        saver = LoraMemberSaver({save_as: out}, processor=tokenizer)
    elif strategy == "top-cls":
        trained_names = freeze_all_but_top(model)
    else:
        trained_names = _freeze_embeddings(model)
    out = Path(out)
    encoded = {name: tokenize(tokenizer, d.texts, max_length=max_length)
               for name, d in (("train", train), ("val", public_val), ("test", public_test))}
    labels = {name: torch.tensor(d.labels) for name, d in (("train", train), ("val", public_val), ("test", public_test))}
    if strategy == "top-cls":
        inputs = cached_inputs(model, encoded, out / "_cache", progress)
        module: nn.Module = BertTopClsHead(model)
        forward = forward_head
    else:
        inputs = {k: (v["input_ids"], v["attention_mask"]) for k, v in encoded.items()}
        module, forward = model, (forward_peft_classifier if strategy == "lora" else forward_model)
    extra = {**(extra_args or {}), "base": str(base), "strategy": strategy, "max_length": max_length}
    if lora is not None:
        extra["lora"] = lora.to_dict()

    def evaluate(trained: nn.Module) -> tuple[float, float]:
        return (accuracy(trained, forward, inputs["val"], labels["val"]),
                accuracy(trained, forward, inputs["test"], labels["test"]))

    return train_members(
        model=model, module=module, train_set=TensorDataset(*inputs["train"], labels["train"]),
        forward=forward, criterion=nn.CrossEntropyLoss(), evaluate=evaluate, epsilons=epsilons,
        config=config, out=out, dataset_id=dataset_id, trained_names=trained_names,
        processor=tokenizer, extra_args=extra, progress=progress, saver=saver,
    )


def _check_lora_request(strategy: str, lora: LoraSpec | None, save_as: str) -> None:
    if strategy == "lora" and lora is None:
        raise TrainingConfigError("strategy 'lora' needs the adapter's shape: pass lora=LoraSpec(...) "
                                  "(on the command line: --lora r=8,alpha=16).")
    if strategy != "lora" and lora is not None:
        raise TrainingConfigError(f"A LoRA adapter is its own strategy; it cannot be combined with {strategy!r}. "
                                  "Use strategy 'lora' (drop --strategy on the command line).")
    check_save_modes((save_as,))


def _freeze_embeddings(model: nn.Module) -> list[str]:
    """Freeze the embedding module: half of a BERT, and its per-sample gradients cost the most."""
    base = getattr(model, model.base_model_prefix, model)
    embeddings = getattr(base, "embeddings", None) or model.get_input_embeddings()
    frozen = {id(p) for p in embeddings.parameters()}
    names = []
    for name, p in model.named_parameters():
        p.requires_grad_(id(p) not in frozen)
        if p.requires_grad:
            names.append(name)
    return names


def cached_inputs(model, encoded, cache_dir: Path, progress) -> dict[str, tuple[torch.Tensor, ...]]:
    """[CLS] (residual, context) per split, computed once and kept on disk for the whole family."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    inputs = {}
    for split, enc in encoded.items():
        key = _fingerprint(model, enc["input_ids"])
        path = cache_dir / f"{split}-{key}.pt"
        if path.exists():
            inputs[split] = tuple(torch.load(path))
            continue
        total, done = len(enc["input_ids"]), [0]

        def tick(n: int, split=split, total=total, done=done) -> None:
            done[0] += n
            if progress:
                progress(f"cache {split}", done[0], total)

        cached = cache_top_inputs(model, enc["input_ids"], enc["attention_mask"], progress=tick)
        torch.save(cached, path)
        inputs[split] = cached
    return inputs


def _fingerprint(model: nn.Module, input_ids: torch.Tensor) -> str:
    """The cache is valid for these exact inputs, this config and these frozen weights."""
    h = hashlib.sha256(input_ids.numpy().tobytes())
    h.update(model.config.to_json_string().encode())
    for name, p in model.named_parameters():
        if not p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def forward_head(module: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, labels)`` of a :class:`BertTopClsHead` on a cached ``(residual, context, labels)`` batch."""
    residual, context, labels = batch
    return module(residual.float(), context.float()), labels


def forward_model(module: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, labels)`` of a full classifier on ``(input_ids, attention_mask, labels)``."""
    input_ids, attention_mask, labels = batch
    model = getattr(module, "_module", module)  # Opacus' GradSampleModule wraps the model
    accepted = inspect.signature(model.forward).parameters
    inputs = {k: v for k, v in batch_inputs(input_ids, attention_mask).items() if k in accepted}
    return module(**inputs).logits, labels


@torch.no_grad()
def accuracy(module, forward, inputs: tuple[torch.Tensor, ...], labels: torch.Tensor, batch_size: int = 512) -> float:
    """Mean of :func:`classification_correct` over ``inputs`` (eval mode, no gradients)."""
    module.eval()
    scores = []
    for start in range(0, len(labels), batch_size):
        batch = tuple(t[start : start + batch_size] for t in (*inputs, labels))
        logits, targets = forward(module, batch)
        scores.append(classification_correct(logits, targets))
    module.train()
    return mean_score(torch.cat(scores))


