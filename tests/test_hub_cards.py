"""DP model cards: Hub metadata, the namespaced privacy block, prose, and a parse round trip."""

from __future__ import annotations

import pytest
from huggingface_hub import ModelCard

from card_support import card_metadata
from hf_dpdedup.hub.cards import member_card, store_card
from hf_dpdedup.store.constitution import Constitution, StoreRef, TensorEntry
from hf_dpdedup.store.format import StoreIndex
from hf_dpdedup.store.records import DedupRecord, privacy_from_dict

SHA = "a" * 40
PRIVACY = {"epsilon": 4.0, "delta": 1e-5, "datasets": ["acme/private-reviews"], "accountant": "rdp", "history": []}
BASE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
# hand-written records in the older forms the reader accepts (scalar δ, blocks with "own", no version)
DEDUP = {
    "base": "eps1",
    "epsilon_after": {"loose": 5.5, "tight": 4.6},
    "delta_after": 2e-5,
    "svt_epsilon": 0.5,
    "compression": 0.27,
    "blocks": {"total": 100, "from_base": 70, "from_self": 3, "own": 27},
    "validations": 24,
    "public_test": {"dataset": "stanfordnlp/sst2", "split": "validation", "metric": "accuracy",
                    "before": 0.81, "after": 0.80},
}


def constitution(dedup=None, privacy=PRIVACY) -> Constitution:
    return Constitution(
        name="eps4",
        block_store=StoreRef("s" * 32, repo_id="acme/minilm-blocks", revision=SHA),
        block_size=16384,
        dtype="float32",
        tensors=(TensorEntry("w", (4, 16384), "float32", (0, 1, 2, 3)),),
        extras_sha256="0" * 64,
        architecture="BertForSequenceClassification",
        privacy=privacy_from_dict(privacy) if privacy is not None else None,
        dedup=DedupRecord.from_dict(dedup) if dedup is not None else None,
    )


def card(dedup=DEDUP, base_model=BASE_MODEL, **kwargs) -> ModelCard:
    return member_card(constitution(dedup, **kwargs), repo_id="acme/minilm-eps4", store_repo="acme/minilm-blocks",
                       store_commit=SHA, base_model=base_model)


def test_metadata_has_the_hub_keys_and_the_privacy_block():
    data = card().data.to_dict()
    assert data["library_name"] == "transformers"
    assert data["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert data["base_model_relation"] == "finetune"
    assert {"transformers", "differential-privacy", "deduplicated", "hf_dpdedup", "dp-epsilon-5.5"} <= set(data["tags"])
    assert data["datasets"] == ["acme/private-reviews"]
    assert data["pipeline_tag"] == "text-classification"
    block = data["hf_dpdedup"]
    assert block["privacy"]["original"] == {"epsilon": 4.0, "delta": 1e-5, "accountant": "rdp"}
    assert block["privacy"]["after_dedup"]["loose"] == {"epsilon": 5.5, "delta": 2e-5}
    assert block["privacy"]["after_dedup"]["tight"] == {"epsilon": 4.6, "delta": 2e-5}
    assert block["privacy"]["svt_epsilon"] == 0.5
    assert block["privacy"]["datasets"] == ["acme/private-reviews"]
    assert block["block_store"]["repo_id"] == "acme/minilm-blocks" and block["block_store"]["revision"] == SHA
    assert block["dedup"]["compression"] == 0.27 and block["dedup"]["base"] == "eps1"
    [result] = data["model-index"][0]["results"]
    assert result["dataset"]["type"] == "stanfordnlp/sst2" and result["metrics"][0]["value"] == 0.80


def test_card_parses_and_round_trips_through_its_metadata():
    original = card()
    parsed = ModelCard(str(original))
    assert parsed.data.to_dict() == original.data.to_dict()
    assert card_metadata(parsed) == card_metadata(original)
    assert str(card()) == str(original)  # deterministic: re-pushing makes no new commit
    text = original.text
    assert "after deduplication, loose (sum over sources) | 5.5" in text and "e^ε" in text
    assert "70 of them were replaced" in text and "`eps1`" in text


def test_no_private_figures_reach_model_index():
    dedup = {k: v for k, v in DEDUP.items() if k != "public_test"}
    dedup["public_test_accuracy"] = {"before": 0.81, "after": 0.80}
    data = card(dedup).data.to_dict()
    assert "model-index" not in data  # no public data set named: nothing goes to the leaderboard metadata
    assert "0.8 after deduplication" in card(dedup).text


def test_a_target_card_says_what_the_search_checked_on_and_whether_it_was_confirmed():
    target = {**DEDUP, "role": "target", "public_validation_accuracy": {"before": 0.82, "after": 0.81, "se": 0.012},
              "public_test_accuracy": {"before": 0.81, "after": 0.80, "se": 0.01},
              "confirmations": 6, "rejected_by_confirmation": 2}
    c = card(target)
    assert ("chosen by accuracy on public validation data (0.82 ± 0.012 before, 0.81 after, 24 checks) and on "
            "private validation data through noisy, charged queries; a second public split the search never saw "
            "confirmed them (6 checks, 2 replacements it rejected were undone).") in c.text
    assert "(0.81 ± 0.01 before)" in c.text  # the test utility with its standard error
    assert "Format `hf_dpdedup/4`" in c.text  # the constitution's format (its rows are a run), not the block's
    block = c.data.to_dict()["hf_dpdedup"]["dedup"]
    assert (block["confirmations"], block["rejected_by_confirmation"]) == (6, 2)
    assert block["public_validation_accuracy"] == {"before": 0.82, "after": 0.81, "se": 0.012}
    unconfirmed = card({**target, "confirmations": 0, "rejected_by_confirmation": 0, "svt_epsilon": 0.0})
    assert ("(0.82 ± 0.012 before, 0.81 after, 24 checks); no second public split confirmed them, so they may fit "
            "that validation data better than new data.") in unconfirmed.text
    # a record from before these fields: the card says only what it knows
    assert "public validation data." in card({**DEDUP, "role": "target", "svt_epsilon": 0.0}).text
    assert DedupRecord.from_dict(target).to_dict()["public_validation_accuracy"]["se"] == 0.012
    assert "confirmations" not in DedupRecord.from_dict(DEDUP).to_dict()  # absent when unknown, as before


def test_exact_dedup_only_card_says_the_budget_is_unchanged():
    c = card(None, base_model=None)
    block = c.data.to_dict()["hf_dpdedup"]
    assert "after_dedup" not in block["privacy"] and "dedup" not in block
    assert "base_model" not in c.data.to_dict()
    assert "budget is the one the model was trained with" in c.text


def test_card_without_privacy_metadata_warns_the_reader():
    assert "not** privacy-protected" in card(None, privacy=None).text


def test_ledger_report_feeds_the_after_dedup_figures():
    from hf_dpdedup.privacy import Charge, account

    report = account([Charge("eps1", ("d",), 1.0, 1e-5), Charge("eps4", ("d",), 4.0, 1e-5)])
    block = card({"base": "eps1", "ledger": report.to_dict()}).data.to_dict()["hf_dpdedup"]
    assert block["privacy"]["after_dedup"]["loose"]["epsilon"] == pytest.approx(report.epsilon_loose)


def test_store_card_parses():
    index = StoreIndex("s" * 32, 16384, "float32")
    parsed = ModelCard(str(store_card(index, repo_id="acme/minilm-blocks")))
    assert parsed.data.to_dict()["hf_dpdedup"]["kind"] == "block_store"


def test_engine_record_with_original_privacy_and_ledger():
    """The dedup engine stores the after-dedup cost as the constitution's privacy and the trained
    budget under ``original_privacy``; the card shows both, deltas from the ledger."""
    from hf_dpdedup.privacy import Charge, account

    report = account([Charge("eps1", ("d",), 1.0, 1e-5), Charge("eps4", ("d",), 4.0, 1e-5)])
    dedup = {"base": "eps1", "original_privacy": PRIVACY, "ledger": report.to_dict(),
             "epsilon_after": {"loose": report.epsilon_loose, "tight": None}, "svt_epsilon": 0.0,
             "blocks": {"total": 100, "from_base": 60, "from_self": 0}, "validations": 7,
             "public_test_accuracy": {"before": 0.8, "after": 0.79}}
    after = {**report.to_metadata().to_dict()}
    c = card(dedup, privacy=after)
    block = c.data.to_dict()["hf_dpdedup"]["privacy"]
    assert block["original"]["epsilon"] == 4.0
    assert block["after_dedup"]["loose"] == {"epsilon": report.epsilon_loose, "delta": report.delta_loose}
    assert "tight" not in block["after_dedup"] or block["after_dedup"]["tight"]["epsilon"] is not None
    assert "budget ε = 4 " in c.text and "60 of them were replaced" in c.text


def test_datasets_tags_and_split_for_the_hub():
    from hf_dpdedup.privacy import Charge, account

    report = account([Charge("eps4", ("acme/private-reviews",), 4.0, 1e-5),
                      Charge("svt-eps4", ("acme/private-reviews", "acme/private-val"), 2.1000000000000005, 0.0,
                             kind="svt")])
    dedup = {"base": "eps1", "ledger": report.to_dict(),
             "public_test": {"dataset": "stanfordnlp/sst2", "metric": "accuracy", "after": 0.8}}
    data = card(dedup).data.to_dict()
    assert data["datasets"] == ["acme/private-reviews", "acme/private-val"]  # training, then validation
    assert "dp-epsilon-6.1" in data["tags"]  # rounded for display ...
    assert data["hf_dpdedup"]["privacy"]["after_dedup"]["loose"]["epsilon"] == report.epsilon_loose  # ... exact here
    assert "6.1000000000000005" not in card(dedup).text
    [result] = data["model-index"][0]["results"]
    assert result["dataset"]["split"] == "test"  # a split name, even when none was recorded


def test_card_opens_with_how_to_load_it_with_and_without_hf_dpdedup():
    body = str(card()).split("\n---\n", 1)[1].lstrip().splitlines()
    assert body[0].startswith("# minilm-eps4")
    assert 'hf_dpdedup.DedupedModel.from_pretrained("acme/minilm-eps4")' in body[2]
    assert 'AutoModelForSequenceClassification.from_pretrained("acme/minilm-eps4", trust_remote_code=True)' in body[3]
