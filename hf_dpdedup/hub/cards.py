"""Model cards for pushed members and block stores (``huggingface_hub.ModelCard``).

A member card's YAML metadata has the Hub's own keys (``library_name: transformers`` — members load
with transformers through the repo's remote code —, ``base_model`` with ``base_model_relation:
finetune``, ``datasets`` (training data sets and every data set a validation charge was made
against), ``tags`` (``transformers``, ``differential-privacy``, ``dp-epsilon-<ε as shipped, rounded>``,
...), ``pipeline_tag``, ``model-index`` for *public* test metrics only, with a split name) and one
namespaced block ``hf_dpdedup`` with the exact, machine-readable privacy and deduplication record::

    hf_dpdedup:
      format: hf_dpdedup/1
      member: <name>
      privacy:
        original: {epsilon, delta, accountant}       # from the constitution's ``privacy``
        after_dedup: {loose: {epsilon, delta}, tight: {epsilon, delta} | null, accountant}
                     # loose and tight at the same δ; tight_at_training_delta: {epsilon, delta} beside
        svt_epsilon: <ε spent on private validation through SVT alone>
        private_validation: {<data set id>: {epsilon, mechanisms: {svt: n, laplace: n, naive_laplace: n}}}
        datasets: [<every private data set id the member was charged for: training and validation>]
        seeded: true, noise: "TEST ONLY: ..."   # only when some noise came from a known seed
      fairness: {flagged, dominated_by, compared_with, on}   # the fairness verdict, when given
      dedup: {base, compression, blocks, validations, confirmations, rejected_by_confirmation,
              public_validation_accuracy: {before, after, se, drop_se}}  # what the record holds
      block_store: {repo_id, revision, store_id, block_size, dtype}
      family: {members, stored_fraction}

An *adapter member* (a peft adapter on a base, see ``Constitution.adapter``) has ``library_name:
peft``, ``base_model`` (the adapter's base when it is a Hub id) with ``base_model_relation: adapter``,
the tags ``peft`` and the adapter type (e.g. ``lora``), and a card that says how to load it as a
``PeftModel`` or merged (``merge_adapter=True``); its block adds ``adapter: {peft_type, task_type,
base_model, base_model_class}``.

The prose (``model_cards/dp_member_card.md``) explains the budget to a reader who is not a DP expert.

What the card says comes from the constitution's typed records (:mod:`hf_dpdedup.store.records`):
its ``privacy`` (the cost as shipped) and its ``dedup`` record (:class:`~hf_dpdedup.store.records.DedupRecord`):
``original_privacy`` (the budget as trained), ``epsilon_after`` / ``delta_after`` (loose and tight,
else read from ``ledger``, a ``LedgerReport.to_dict()``), ``tight_at_training_delta``, ``svt_epsilon``
and ``private_validation`` (what deduplication spent querying private data), ``fairness``,
``seeded`` / ``noise``, ``base``, ``compression``, ``blocks``, ``validations``, the public validation
and its confirmation (``public_validation_accuracy``, ``confirmations``, ``rejected_by_confirmation``:
the prose says what the search checked on and whether a second public split confirmed it), and ``public_test``
(a *public* test set with a Hub id: the only figures that reach ``model-index``; the shorter
``public_test_accuracy`` is shown in the prose only). The card renders what is there. The base
model's Hub id is ``member_card(base_model=...)`` (``push`` reads it from the member's config).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..privacy import SEEDED_LABEL, PrivacyMetadata
from ..privacy.metadata import encode_float
from ..store.constitution import Constitution
from ..store.format import FORMAT, StoreIndex
from ..store.records import BeforeAfter, DedupRecord

# Shipped inside the package (so installed wheels have it); ``model_cards/`` links to it.
TEMPLATES = Path(__file__).resolve().parent / "templates"
MEMBER_TEMPLATE = TEMPLATES / "dp_member_card.md"
TAGS = ["transformers", "differential-privacy", "deduplicated", "hf_dpdedup"]
CARD_KEY = "hf_dpdedup"

_TASKS = {  # architecture suffix -> pipeline tag
    "ForSequenceClassification": "text-classification",
    "ForImageClassification": "image-classification",
    "ForTokenClassification": "token-classification",
    "ForQuestionAnswering": "question-answering",
    "ForMaskedLM": "fill-mask",
    "ForCausalLM": "text-generation",
    "LMHeadModel": "text-generation",
}


def pipeline_tag(architecture: str | None) -> str | None:
    return next((tag for suffix, tag in _TASKS.items() if architecture and architecture.endswith(suffix)), None)


def auto_class(architecture: str | None) -> str:
    """The transformers auto class that loads ``architecture`` (``AutoModel`` for a bare encoder)."""
    suffix = next((s for s in _TASKS if architecture and architecture.endswith(s)), None)
    return "AutoModelForCausalLM" if suffix == "LMHeadModel" else f"AutoModel{suffix or ''}"


def member_card(
    constitution: Constitution,
    *,
    repo_id: str,
    store_repo: str,
    store_commit: str,
    endpoint: str = "https://huggingface.co",
    base_model: str | None = None,
    family: dict[str, Any] | None = None,
    license: str | None = None,
    template_path: str | Path | None = None,
) -> ModelCard:
    """The model card of a pushed member (deterministic: the same inputs give the same bytes)."""
    dedup = constitution.dedup or DedupRecord()
    privacy = _original_privacy(constitution)
    adapter = constitution.adapter
    task = pipeline_tag(constitution.architecture)
    block = _card_block(constitution, store_repo, store_commit, family)
    results = _eval_results(dedup, task)
    relation = ("adapter" if adapter is not None else "finetune") if base_model else None
    data = ModelCardData(
        # transformers loads members (remote code in the repo): the Hub's snippet and pipeline() use it;
        # an adapter member is a peft adapter on its base
        library_name="peft" if adapter is not None else "transformers",
        license=license,
        base_model=base_model,
        datasets=_datasets(privacy, dedup) or None,
        tags=[*TAGS, *(["peft", adapter.peft_type.lower()] if adapter is not None else []), *_epsilon_tag(block)],
        pipeline_tag=task,
        eval_results=results,
        model_name=repo_id.split("/")[-1] if results else None,
        **({"base_model_relation": relation} if relation else {}),
        **{CARD_KEY: block},
    )
    n_blocks = sum(len(t.rows) for t in constitution.tensors)
    return ModelCard.from_template(
        data,
        template_path=str(template_path or MEMBER_TEMPLATE),
        title=f"{repo_id.split('/')[-1]}: a differentially private, deduplicated model",
        summary=_summary(constitution, base_model),
        repo_id=repo_id,
        architecture=constitution.architecture or "PreTrainedModel",
        auto_class=auto_class(constitution.architecture),
        pipeline_tag=task,
        store_repo=store_repo,
        store_url=f"{endpoint.rstrip('/')}/{store_repo}/tree/{store_commit}",
        store_commit=store_commit,
        store_id=constitution.block_store.store_id,
        privacy_prose=_privacy_prose(privacy, dedup, seeded=is_seeded(constitution)),
        privacy_rows=_privacy_rows(block["privacy"]),
        privacy_notes=_privacy_notes(block["privacy"], block.get("fairness")),
        dedup_prose=_dedup_prose(constitution, dedup, family),
        results_prose=_results_prose(dedup),
        format=constitution.format,  # the member's, not the card block's
        n_tensors=len(constitution.tensors),
        n_blocks=n_blocks,
        block_size=constitution.block_size,
        dtype=constitution.dtype,
        adapter=adapter.to_dict() if adapter is not None else None,
        adapter_base=(base_model or adapter.base_model_class) if adapter is not None else None,
    )


def store_card(index: StoreIndex, *, repo_id: str, members: list[str] | None = None) -> ModelCard:
    """The card of a block store repo (independent of its members, so adding one changes nothing)."""
    data = ModelCardData(
        library_name="hf_dpdedup",
        tags=[*TAGS, "block-store"],
        **{CARD_KEY: {"format": FORMAT, "kind": "block_store", "store_id": index.store_id,
                      "block_size": index.block_size, "dtype": index.dtype, "rows": index.total_rows,
                      "shards": len(index.shards)}},
    )
    stored = sum(s.bytes for s in index.shards)
    text = (
        f"---\n{data.to_yaml()}\n---\n\n# {repo_id.split('/')[-1]}\n\n"
        "This repo is the **block store** of a family of differentially private models deduplicated with "
        "[hf_dpdedup](https://github.com/hf-dpdedup/hf_dpdedup). It holds weight blocks "
        f"({index.total_rows} rows of {index.block_size} {index.dtype} values, {len(index.shards)} shards, "
        f"{stored / 2**20:.1f} MiB); each member model is a repo of its own whose "
        "`dedup_constitution.json` names the blocks it is made of and pins a commit of this repo. "
        "Load a member, not this repo: `hf_dpdedup.DedupedModel.from_pretrained(\"<member repo>\")`.\n\n"
        "Rows are only ever appended; every shard's sha256 is recorded in `block_store.json` and checked "
        "on download.\n"
    )
    return ModelCard(text)


# --- the namespaced block --------------------------------------------------------------------------
def _original_privacy(constitution: Constitution) -> PrivacyMetadata | None:
    """The budget the model was trained with. A deduplicated member's constitution ``privacy`` is its
    cost *after* deduplication (what it ships with); the trained one is ``dedup.original_privacy``."""
    dedup = constitution.dedup
    return (dedup.original_privacy if dedup is not None else None) or constitution.privacy


def _card_block(constitution: Constitution, store_repo: str, store_commit: str, family: dict | None) -> dict:
    dedup = constitution.dedup or DedupRecord()
    privacy = _original_privacy(constitution)
    private_validation = {k: v.to_dict() for k, v in dedup.private_validation.items()} or None
    seeded = is_seeded(constitution)
    datasets = sorted({*(privacy.datasets if privacy else ()),
                       *(constitution.privacy.datasets if constitution.privacy else ()), *(private_validation or {})})
    tight_own = dedup.tight_at_training_delta
    block: dict[str, Any] = {
        "format": FORMAT,
        "member": constitution.name,
        "privacy": _drop_none({
            "original": _drop_none({"epsilon": encode_float(privacy.epsilon), "delta": privacy.delta,
                                    "accountant": privacy.accountant}) if privacy else None,
            "after_dedup": _after_dedup(dedup),
            "tight_at_training_delta": tight_own.to_dict() if tight_own else None,
            "svt_epsilon": dedup.svt_epsilon,
            "private_validation": private_validation,
            "datasets": datasets or None,
            "seeded": True if seeded else None,
            "noise": SEEDED_LABEL if seeded else None,
        }),
        "fairness": dedup.fairness.to_dict() if dedup.fairness else None,
        "dedup": _drop_none({"base": dedup.base, "compression": dedup.compression,
                             "blocks": dedup.blocks.to_dict() if dedup.blocks else None,
                             "validations": dedup.validations, "confirmations": dedup.confirmations,
                             "rejected_by_confirmation": dedup.rejected_by_confirmation,
                             "public_validation_accuracy": dedup.public_validation_accuracy.to_dict()
                             if dedup.public_validation_accuracy else None}) or None,
        "block_store": {"repo_id": store_repo, "revision": store_commit,
                        "store_id": constitution.block_store.store_id,
                        "block_size": constitution.block_size, "dtype": constitution.dtype},
        "family": family or None,
        "adapter": _drop_none({k: constitution.adapter.to_dict()[k] for k in
                               ("peft_type", "task_type", "base_model", "base_model_class")})
        if constitution.adapter is not None else None,
    }
    return _drop_none(block)


def is_seeded(constitution: Constitution) -> bool:
    """True when the training or the deduplication noise of this member came from a known seed."""
    dedup = constitution.dedup or DedupRecord()
    ledger = dedup.ledger or {}
    original = _original_privacy(constitution)
    return bool((original and original.seeded) or (constitution.privacy and constitution.privacy.seeded)
                or dedup.seeded or dedup.noise != "secure" or ledger.get("noise", "secure") != "secure")


def _after_dedup(dedup: DedupRecord) -> dict | None:
    """The budget after deduplication, loose and tight, each at its δ (from the record, else its ledger)."""
    ledger = dedup.ledger or {}
    after, deltas = dedup.epsilon_after, dedup.delta_after
    figures = {}
    for kind in ("loose", "tight"):
        from_ledger = ledger.get(kind) or {}
        eps = _first(getattr(after, kind) if after else None, from_ledger.get("epsilon"))
        if eps is not None:
            delta = _first(getattr(deltas, kind) if deltas else None, from_ledger.get("delta"))
            figures[kind] = _drop_none({"epsilon": "inf" if eps == math.inf else eps, "delta": delta})
    if not figures:
        return None
    return {**figures, "accountant": "hf_dpdedup-ledger"}


def _datasets(privacy: PrivacyMetadata | None, dedup: DedupRecord) -> list[str]:
    """The training data sets, then every data set a validation charge was made against."""
    ids = list(privacy.datasets if privacy else ())
    for charge in (dedup.ledger or {}).get("charges") or []:
        ids.extend(charge.get("datasets") or [])
    return list(dict.fromkeys(str(d) for d in ids))


def _epsilon_tag(block: dict) -> list[str]:
    """``dp-epsilon-<ε>``: the budget that holds for the model as shipped, rounded for display."""
    privacy = block.get("privacy") or {}
    after = privacy.get("after_dedup") or {}
    eps = _first((after.get("loose") or {}).get("epsilon"), (privacy.get("original") or {}).get("epsilon"))
    if eps is None:
        return []
    return [f"dp-epsilon-{'inf' if _fmt(eps).startswith('∞') else _fmt(eps)}"]


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _eval_results(dedup: DedupRecord, task: str | None) -> list[EvalResult] | None:
    test = dedup.public_test
    if not (task and test is not None and test.dataset):
        return None
    return [EvalResult(
        task_type=task,
        dataset_type=test.dataset,
        dataset_name=test.dataset_name or test.dataset,
        dataset_config=test.config,
        dataset_split=test.split,
        metric_type=test.metric,
        metric_value=float(test.after),
    )]


def _drop_none(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}


# --- prose -----------------------------------------------------------------------------------------
def _fmt(x: Any) -> str:
    if x is None:
        return "—"
    if x == "inf" or (isinstance(x, float) and math.isinf(x)):
        return "∞ (not private)"
    return f"{float(x):.4g}"


def _summary(constitution: Constitution, base_model: str | None) -> str:
    origin = f"fine-tuned from [`{base_model}`](https://huggingface.co/{base_model}) " if base_model else ""
    adapter = constitution.adapter
    if adapter is not None:
        on = (f"[`{base_model}`](https://huggingface.co/{base_model})" if base_model
              else f"a `{adapter.base_model_class}`")
        return (
            f"A peft {adapter.peft_type} adapter ({adapter.task_type or 'no task type'}) on {on}, trained with "
            "differential privacy (DP-SGD), stored as part of a family of adapters on the same base trained on the "
            "same private data at different privacy budgets. The base's weights are stored once for the whole "
            "family and the adapters' weight blocks are deduplicated against each other "
            "([hf_dpdedup](https://github.com/hf-dpdedup/hf_dpdedup)); loading it gives back a `peft` model "
            "(or, merged, an ordinary `transformers` model)."
        )
    return (
        f"A `{constitution.architecture or 'transformers'}` model {origin}with differentially private "
        "training (DP-SGD), stored as part of a family of models trained on the same private data at "
        "different privacy budgets. Weight blocks it shares with other members are stored once "
        "([hf_dpdedup](https://github.com/hf-dpdedup/hf_dpdedup)); loading it gives back an ordinary "
        "`transformers` model."
    )


def _privacy_prose(privacy: PrivacyMetadata | None, dedup: DedupRecord, *, seeded: bool = False) -> str:
    if not privacy:
        return "No privacy metadata was recorded for this model: treat it as **not** privacy-protected."
    warning = (f"**{SEEDED_LABEL}.** Some of the noise behind this model (its DP-SGD training or the "
               "deduplication's private checks) was drawn from a known seed: anyone with the seed can "
               "reproduce it, so the ε figures below describe the mechanism, not a protection. Do not "
               "ship it.\n\n") if seeded else ""
    eps, delta = privacy.epsilon, privacy.delta
    datasets = ", ".join(f"`{d}`" for d in privacy.datasets) or "its training data"
    text = (
        f"This model was trained with differential privacy on {datasets}, with budget ε = {_fmt(eps)} and "
        f"δ = {_fmt(delta)}. In plain words: adding or removing any single training example changes the "
        f"probability of any outcome of training by at most a factor e^ε ≈ {_efactor(eps)} (up to a small "
        "probability δ of exceeding it). Smaller ε means stronger protection: the model reveals little "
        "about any one person in the training data, whatever else an attacker knows."
    )
    after = _after_dedup(dedup)
    if after:
        private_checks = bool(dedup.svt_epsilon) or any(v.epsilon for v in dedup.private_validation.values())
        text += (
            "\n\nDeduplication replaced some of its weight blocks with blocks of another model trained on the "
            "same data" + (", and checked accuracy on private validation data through noisy, charged "
                           "mechanisms" if private_checks else "")
            + ". A model built from another model's blocks carries that model's training too, so the budget "
            "that holds **for the model as shipped** is the *after deduplication* row below. The loose "
            "figure adds up the budgets of everything it was built from (always valid)"
            + ("; the tight one composes the same mechanisms with Rényi DP." if after.get("tight") else ".")
        )
    return warning + text


def _efactor(eps: Any) -> str:
    try:
        value = math.exp(float(eps))
    except (TypeError, ValueError, OverflowError):
        return "∞"
    return f"{value:.3g}" if math.isfinite(value) else "∞"


def _privacy_rows(privacy: dict) -> list[tuple[str, str, str]]:
    rows = []
    if privacy.get("original"):
        o = privacy["original"]
        rows.append(("as trained" + (f" ({o['accountant']} accountant)" if o.get("accountant") else ""),
                     _fmt(o.get("epsilon")), _fmt(o.get("delta"))))
    after = privacy.get("after_dedup") or {}
    labels = {"loose": "after deduplication, loose (sum over sources)",
              "tight": "after deduplication, tight (Rényi DP composition)"}
    for kind in ("loose", "tight"):
        if after.get(kind):
            rows.append((labels[kind], _fmt(after[kind].get("epsilon")), _fmt(after[kind].get("delta"))))
    own = privacy.get("tight_at_training_delta")
    if own:
        rows.append(("after deduplication, Rényi DP at the training δ", _fmt(own.get("epsilon")),
                     _fmt(own.get("delta"))))
    return rows or [("not recorded", "—", "—")]


_MECHANISMS = {"svt": "Sparse Vector Technique session", "laplace": "Laplace utility release",
               "naive_laplace": "Laplace validation query"}


def _privacy_notes(privacy: dict, fairness: dict | None = None) -> str:
    notes = []
    if privacy.get("seeded"):
        notes.append(f"**{SEEDED_LABEL}.**")
    if len(privacy.get("after_dedup") or {}) > 2 or privacy.get("tight_at_training_delta"):
        notes.append("Each ε holds at the δ of its own row: compare ε only between rows of equal δ.")
    spent = {d: v for d, v in (privacy.get("private_validation") or {}).items() if v.get("epsilon")}
    for dataset, entry in sorted(spent.items()):
        kinds = ", ".join(f"{n} {_MECHANISMS.get(k, k)}{'s' if n > 1 else ''}"
                          for k, n in sorted((entry.get("mechanisms") or {}).items()))
        notes.append(f"Of the after-deduplication budget, ε = {_fmt(entry['epsilon'])} was spent querying the "
                     f"private validation data `{dataset}`" + (f" ({kinds})." if kinds else "."))
    if not spent and privacy.get("svt_epsilon"):
        notes.append(f"Of the after-deduplication budget, ε = {_fmt(privacy['svt_epsilon'])} was spent on "
                     "private validation queries (Sparse Vector Technique).")
    elif not spent and privacy.get("after_dedup"):
        notes.append("No private data was queried during deduplication (accuracy was checked on public data).")
    if fairness and fairness.get("flagged"):
        notes.append("**Fairness: flagged.** Before deduplication this model scored lower on the "
                     f"{fairness.get('on', 'public')} data than the lower-ε member(s) "
                     + ", ".join(f"`{n}`" for n in fairness.get("dominated_by") or [])
                     + ": a smaller budget bought more utility there.")
    if fairness and fairness.get("compared_with"):
        notes.append("The fairness verdict compared this model with " + ", ".join(
            f"`{n}`" for n in fairness["compared_with"]) + "; their training is part of the budget above.")
    if not privacy.get("after_dedup"):
        notes.append("Only exact deduplication was applied (byte-identical blocks stored once): no weight "
                     "changed, so the budget is the one the model was trained with.")
    return " ".join(notes)


def _dedup_prose(constitution: Constitution, dedup: DedupRecord, family: dict | None) -> str:
    total = sum(len(t.rows) for t in constitution.tensors)
    blocks = dedup.blocks
    parts = [f"The model's weights are {total} blocks of {constitution.block_size} values."]
    if blocks is not None and dedup.base:
        parts.append(f"{blocks.from_base} of them were replaced by the most similar blocks of member "
                     f"`{dedup.base}` (the family's deduplication base)"
                     + (f" and {blocks.from_self} by other blocks of this model" if blocks.from_self else "")
                     + ", while accuracy stayed within the family's threshold.")
    elif dedup.base:
        parts.append(f"Blocks were borrowed from member `{dedup.base}` (the deduplication base).")
    if dedup.role == "target":
        parts.append(_validation_prose(dedup, replaced=blocks is not None and blocks.from_base + blocks.from_self > 0))
    if dedup.compression is not None:
        parts.append(f"This model needs {100 * float(dedup.compression):.1f} % of its original blocks of its own.")
    if family and family.get("stored_fraction") is not None:
        parts.append(f"The whole family of {family.get('members', '?')} models is stored in "
                     f"{100 * float(family['stored_fraction']):.1f} % of the bytes of its separate copies.")
    if constitution.dedup is None:
        parts.append("Blocks byte-identical to blocks of other members are stored once (exact deduplication).")
    return " ".join(parts)


def _validation_prose(dedup: DedupRecord, *, replaced: bool) -> str:
    """What the search checked its replacements on, and whether a second public split confirmed them."""
    val = dedup.public_validation_accuracy
    text = "The replacements were chosen by accuracy on public validation data"
    if val is not None and val.before is not None:
        text += f" ({_fmt(val.before)}{_se(val)} before, {_fmt(val.after)} after{_drop_se(val)}"
        text += f", {dedup.validations} checks)" if dedup.validations is not None else ")"
    if dedup.private_validation or dedup.svt_epsilon:
        text += " and on private validation data through noisy, charged queries"
    if dedup.confirmations:
        reverted = dedup.rejected_by_confirmation or 0
        text += (f"; a second public split the search never saw confirmed them ({dedup.confirmations} checks"
                 + (f", {reverted} replacements it rejected were undone)." if reverted else ")."))
    elif replaced and dedup.confirmations == 0:
        text += "; no second public split confirmed them, so they may fit that validation data better than new data."
    else:
        text += "."
    return text


def _se(figures: BeforeAfter) -> str:
    return f" ± {_fmt(figures.se)}" if figures.se is not None else ""


def _drop_se(figures: BeforeAfter) -> str:
    return f", the drop measured to ± {_fmt(figures.drop_se)} (paired SE)" if figures.drop_se is not None else ""


def _results_prose(dedup: DedupRecord) -> str:
    test, acc = dedup.public_test, dedup.public_test_accuracy or BeforeAfter()
    before = test.before if test is not None else acc.before
    after = test.after if test is not None else acc.after
    if after is None:
        return ""
    where = f" on the public test set `{test.dataset}`" if test is not None else " on a public test set"
    metric = test.metric if test is not None else "accuracy"
    text = f"{metric.capitalize()}{where}: {_fmt(after)} after deduplication"
    return text + (f" ({_fmt(before)}{_se(acc)} before{_drop_se(acc)})." if before is not None else ".") + (
        " Figures on private data are never published unnoised."
    )
