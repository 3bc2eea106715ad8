"""The whole engine on a tiny family: store contents, utilities, fairness, ledger, firewall."""

from __future__ import annotations

import json
import math

import pytest
import torch

from hf_dpdedup import DedupedModel
from hf_dpdedup.dedup.plan import PlanConfig
from hf_dpdedup.dedup.planner import DedupConfig, DedupData, Member, fairness_verdicts
from hf_dpdedup.dedup.storing import deduplicate_family
from hf_dpdedup.dedup.tasks import classification_score
from hf_dpdedup.dedup.validate import example_scores, paired_utility_stats
from hf_dpdedup.errors import ConfigError
from hf_dpdedup.privacy import PrivacyMetadata, PrivateDataset
from hf_dpdedup.store.records import LooseTight

from conftest import tiny_model

BLOCK = 128


def make_family():
    """teacher = the ε-8 member; lower-ε members are the teacher plus more noise. Labels are the
    teacher's predictions, so utility rises with ε (the fairness rule holds before dedup)."""
    teacher = tiny_model("bert", seed=0)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 120, (600, 12), generator=g)
    with torch.no_grad():
        labels = teacher(input_ids=ids).logits.argmax(-1)
    members = []
    for eps, noise in ((1.0, 0.6), (2.0, 0.25), (8.0, 0.0)):
        m = tiny_model("bert", seed=0)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(noise * p.std() * torch.randn(p.shape, generator=g))
        members.append(Member(f"eps{eps:g}", m, PrivacyMetadata(eps, 1e-5, ("toy-train",))))
    batches = [{"input_ids": ids[i : i + 100], "labels": labels[i : i + 100]} for i in range(0, 600, 100)]
    return members, batches


def originals(members):
    return {m.name: {k: v.clone() for k, v in m.model.state_dict().items()} for m in members}


@pytest.fixture
def public_run(tmp_path):
    members, batches = make_family()
    data = DedupData(classification_score, public_val=batches[:3], public_test=batches[3:])
    config = DedupConfig(block_size=BLOCK, threshold=0.03, strategy="binary")
    report = deduplicate_family(members, data, config, tmp_path / "store")
    return members, data, config, report, tmp_path


def test_public_dedup_stores_a_loadable_family_within_the_threshold(public_run):
    members, data, config, report, tmp_path = public_run
    assert [m.role for m in report.models] == ["base", "target", "target"]
    for m in report.targets:
        assert m.from_base + m.from_self > 0, m.name  # something was deduplicated
        assert m.from_base + m.from_self + m.own_blocks == m.n_blocks
        assert m.val_utility_after >= m.val_utility_before - config.threshold - 1e-12
        assert m.validations > 0
    # interactive floor (paired, the default): higher ε never ends measurably below the lower-ε model on
    # the validation data — by at most one paired SE of their per-example difference
    models = {m.name: m.model for m in members}  # edited in place: what was stored
    for higher, lower in (("eps8", "eps2"), ("eps2", "eps1")):
        gap = paired_utility_stats(models[higher], data.public_val, data.score_fn,
                                   example_scores(models[lower], data.public_val, data.score_fn))[1]
        assert gap.mean >= -config.floor_margin_se * gap.se - 1e-12, (higher, lower, gap)
    # what is stored is what was validated, bit for bit
    for member in members:
        loaded = DedupedModel.from_pretrained(tmp_path / "store" / "members" / member.name)
        for k, v in member.model.state_dict().items():
            assert torch.equal(loaded.state_dict()[k], v), (member.name, k)


def test_the_exact_floor_keeps_the_papers_order_on_validation(tmp_path):
    members, batches = make_family()
    data = DedupData(classification_score, public_val=batches[:3], public_test=batches[3:])
    config = DedupConfig(block_size=BLOCK, threshold=0.03, strategy="binary", floor_margin_se=0.0)
    report = deduplicate_family(members, data, config, tmp_path / "store")
    by_name = {m.name: m for m in report.models}
    assert by_name["eps8"].val_utility_after >= by_name["eps2"].val_utility_after - 1e-12
    assert by_name["eps2"].val_utility_after >= by_name["eps1"].val_utility_after - 1e-12


def test_compression_counts_only_new_rows(public_run):
    _, _, _, report, _ = public_run
    summary = report.summary()
    for m in report.targets:
        assert 0 < m.compression < 1
    assert 0 < summary["targets_compression"] < 1
    assert summary["family_stored_over_original"] < 3  # three models stored in less than three copies


def test_ledger_charges_base_and_the_interactive_chain(public_run):
    _, _, _, report, _ = public_run
    by_name = {m.name: m for m in report.models}
    assert by_name["eps1"].epsilon_after == 1.0  # the base is stored as is
    assert by_name["eps2"].ledger.epsilon_loose == pytest.approx(3.0)  # 2 + base 1
    # eps8's floor is a function of eps2's result: it is charged eps8 + base + eps2
    assert by_name["eps8"].ledger.epsilon_loose == pytest.approx(11.0)
    assert by_name["eps8"].ledger.epsilon <= by_name["eps8"].ledger.epsilon_loose


def test_report_files(public_run, tmp_path):
    _, _, _, report, _ = public_run
    report.save(tmp_path / "rep")
    data = json.loads((tmp_path / "rep" / "dedup_report.json").read_text())
    assert data["summary"]["fairness_holds"] in (True, False)
    assert len(data["models"]) == 3
    assert (tmp_path / "rep" / "dedup_report.png").stat().st_size > 1000
    assert "eps8" in (tmp_path / "rep" / "dedup_report.txt").read_text()


def test_constitution_carries_the_privacy_after_dedup(public_run):
    _, _, _, _, tmp_path = public_run
    loaded = DedupedModel.from_pretrained(tmp_path / "store" / "members" / "eps2")
    assert loaded.dedup_info.epsilon == pytest.approx(3.0)
    assert loaded.dedup_info.dedup.base == "eps1"
    assert loaded.dedup_info.dedup.original_privacy.epsilon == 2.0


@pytest.mark.parametrize("validation", ["svt", "naive"])
def test_private_validation_never_reads_unnoised(tmp_path, validation):
    members, batches = make_family()
    rows = {"input_ids": torch.cat([b["input_ids"] for b in batches[:3]]),
            "labels": torch.cat([b["labels"] for b in batches[:3]])}
    private = PrivateDataset(rows, dataset_id="toy-train", public_size=300, batch_size=100)
    data = DedupData(classification_score, public_val=batches[3:4], public_test=batches[4:], private_val=private)
    config = DedupConfig(block_size=BLOCK, threshold=0.03, strategy="binary", validation=validation,
                         svt_epsilon=1.0, svt_cutoff=3, naive_epsilon=0.1, noise_seed=7)
    report = deduplicate_family(members, data, config, tmp_path / "store")
    assert private.raw_accesses == 0
    assert private.charged_reads > 0
    assert private.open_mechanisms == 0  # every session was closed, its reference sum wiped
    eps2 = {m.name: m for m in report.models}["eps2"]
    spent = sum(c.epsilon for c in eps2.charges if c.datasets == ("toy-train",) and c.kind != "training")
    assert spent > 0
    # everything on one data set: the loose figure is the plain sum of distinct charges
    distinct = {c.source_id: c.epsilon for c in eps2.charges}
    assert eps2.ledger.epsilon_loose == pytest.approx(sum(distinct.values()))
    if validation == "svt":
        assert eps2.svt_epsilon == pytest.approx(1.0)
    assert "TEST ONLY" in report.table()
    # major 4: every private-validation charge is reported per data set id (floors and naive queries too)
    assert eps2.private_validation["toy-train"]["epsilon"] == pytest.approx(spent)
    eps8 = {m.name: m for m in report.models}["eps8"]
    assert eps8.private_validation["toy-train"]["mechanisms"]["laplace"] >= 1  # the floor release
    from card_support import card_metadata
    from hf_dpdedup.hub.cards import member_card
    from hf_dpdedup.store.member import read_constitution

    constitution = read_constitution(tmp_path / "store" / "members" / "eps2")
    card = member_card(constitution, repo_id="ns/eps2", store_repo="ns/b", store_commit="a" * 40)
    assert "No private data was queried" not in card.text
    assert "querying the private validation data `toy-train`" in card.text
    block = card_metadata(card)["privacy"]
    assert block["private_validation"]["toy-train"]["epsilon"] == pytest.approx(spent)
    assert "toy-train" in block["datasets"]
    # major 3: seeded dedup noise is marked in the card and in dedup_info, not only in the report
    assert block["seeded"] and "not a privacy guarantee" in card.text
    assert DedupedModel.from_pretrained(tmp_path / "store" / "members" / "eps2").dedup_info.seeded


def test_fairness_verdict_flags_dominated_members_and_lists_what_it_read():
    members, _ = make_family()
    utility = {"eps1": 0.7, "eps2": 0.65, "eps8": 0.9}
    verdicts = fairness_verdicts(members, utility, on="public test")
    assert {n for n, v in verdicts.items() if v["flagged"]} == {"eps2"}
    assert verdicts["eps2"]["dominated_by"] == ["eps1"]
    assert verdicts["eps8"]["compared_with"] == ["eps1", "eps2"] and verdicts["eps1"]["compared_with"] == []


def _dominated_family():
    """eps2's predictions are flipped (classifier negated): a lower-ε member beats it on the public test set."""
    members, batches = make_family()
    with torch.no_grad():
        for p in members[1].model.classifier.parameters():
            p.neg_()
    return members, batches


def test_a_flagged_member_is_stored_loadable_and_flagged_in_report_and_card(tmp_path):
    from card_support import card_metadata
    from hf_dpdedup.hub.cards import member_card
    from hf_dpdedup.store.member import read_constitution

    members, batches = _dominated_family()
    data = DedupData(classification_score, public_val=batches[:3], public_test=batches[3:])
    report = deduplicate_family(members, data, DedupConfig(block_size=BLOCK, threshold=0.03, interactive=False),
                                tmp_path / "s")
    by_name = {m.name: m for m in report.models}
    assert [m.role for m in report.models] == ["base", "target", "target"]  # nobody vanished
    assert by_name["eps2"].fairness["flagged"] and not by_name["eps8"].fairness["flagged"]
    assert "FLAGGED" in report.table()
    loaded = DedupedModel.from_pretrained(tmp_path / "s" / "members" / "eps2")
    assert loaded.dedup_info.dedup.fairness.flagged
    card = member_card(read_constitution(tmp_path / "s" / "members" / "eps2"), repo_id="ns/eps2",
                       store_repo="ns/fam-blocks", store_commit="a" * 40)
    assert card_metadata(card)["fairness"]["flagged"] and "flagged" in card.text.lower()
    # non-interactive: eps8's verdict read eps1 and eps2, so it is charged both (whatever it says)
    assert by_name["eps8"].ledger.epsilon_loose == pytest.approx(8 + 1 + 2)


def test_dropping_flagged_members_is_explicit_and_still_charged(tmp_path):
    members, batches = _dominated_family()
    data = DedupData(classification_score, public_val=batches[:3], public_test=batches[3:])
    config = DedupConfig(block_size=BLOCK, threshold=0.03, fairness="drop")
    report = deduplicate_family(members, data, config, tmp_path / "s")
    by_name = {m.name: m for m in report.models}
    assert by_name["eps2"].role == "dropped"
    assert not (tmp_path / "s" / "members" / "eps2").exists()
    assert (tmp_path / "s" / "members" / "eps8").exists()
    # the dropped member's report keeps its real cost (δ included), not δ = 0
    assert by_name["eps2"].ledger is not None and by_name["eps2"].delta_after >= 1e-5
    assert by_name["eps2"].to_dict()["delta_after"] >= 1e-5
    assert by_name["eps8"].ledger.epsilon_loose == pytest.approx(8 + 1 + 2)
    with pytest.raises(ValueError, match="fairness"):
        DedupConfig(fairness="filter")


@pytest.mark.parametrize("strategy,options", [("greedy", {"n": 10}), ("halving", {"min_group": 4}),
                                              ("mcts", {"group": 20, "episodes": 8})])
def test_every_strategy_runs_end_to_end(tmp_path, strategy, options):
    members, batches = make_family()
    data = DedupData(classification_score, public_val=batches[:3], public_test=batches[3:])
    config = DedupConfig(block_size=BLOCK, threshold=0.03, strategy=strategy, strategy_options=options,
                         plan=PlanConfig(metric="cosine"))
    report = deduplicate_family(members, data, config, tmp_path / "store")
    for m in report.targets:
        assert m.val_utility_after >= m.val_utility_before - 0.03 - 1e-12


def test_tight_and_loose_are_at_the_same_delta_and_the_training_delta_figure_is_labelled(tmp_path):
    """Issue 13 (major 5): the min of tight and loose is only taken at one δ; the figure at the member's
    own δ (comparable with ε before) is reported apart, with its δ."""
    from opacus.accountants import RDPAccountant

    from hf_dpdedup.privacy import AccountantStep

    members, batches = make_family()
    for member, sigma in zip(members, (2.0, 1.2, 0.7)):
        history = (AccountantStep(sigma, 0.02, 300),)
        accountant = RDPAccountant()
        accountant.history = [h.as_opacus() for h in history]
        eps = accountant.get_epsilon(1e-5)
        member.privacy = PrivacyMetadata(eps, 1e-5, ("toy-train",), "rdp", history)
    data = DedupData(classification_score, public_val=batches[:3], public_test=batches[3:])
    report = deduplicate_family(members, data, DedupConfig(block_size=BLOCK, threshold=0.03), tmp_path / "s")
    for m in report.targets:
        ledger = m.ledger
        assert ledger.epsilon_tight is not None
        assert ledger.delta_tight == ledger.delta_loose > 1e-5  # both at the summed δ
        assert ledger.epsilon_tight <= ledger.epsilon_loose  # at one δ the min of the two is valid
        record = m.dedup_record(next(x.privacy for x in members if x.name == m.name))
        assert record.delta_after == LooseTight(ledger.delta_loose, ledger.delta_tight)
        own = record.tight_at_training_delta  # only this one is comparable with ε before (same δ)
        assert own.delta == pytest.approx(1e-5) and own.epsilon > m.epsilon_before


def test_member_record_feeds_the_model_card(tmp_path):
    from hf_dpdedup.hub.cards import member_card
    from hf_dpdedup.store.member import read_constitution

    members, batches = make_family()
    data = DedupData(classification_score, public_val=batches[:3], public_test=batches[3:],
                     public_test_dataset="toy/public-test")
    deduplicate_family(members, data, DedupConfig(block_size=BLOCK, threshold=0.03), tmp_path / "s")
    record = read_constitution(tmp_path / "s" / "members" / "eps8").dedup
    assert 0 < record.compression < 1
    assert record.public_test.dataset == "toy/public-test"
    assert record.public_test.after == pytest.approx(record.public_test_accuracy.after)
    card = member_card(read_constitution(tmp_path / "s" / "members" / "eps8"), repo_id="ns/eps8",
                       store_repo="ns/fam-blocks", store_commit="a" * 40)
    assert card.data.eval_results[0].dataset_type == "toy/public-test"
    assert "of its original blocks" in card.text


def test_agreement_validation_bounds_the_share_of_changed_predictions(tmp_path):
    from hf_dpdedup.dedup.tasks import classification_predict

    members, batches = make_family()
    reference = {m.name: [classification_predict(m.model, b) for b in batches[:3]] for m in members}
    data = DedupData(classification_score, public_val=batches[:3], public_test=batches[3:],
                     predict_fn=classification_predict)
    config = DedupConfig(block_size=BLOCK, threshold=0.02, agreement=True, interactive=False)
    report = deduplicate_family(members, data, config, tmp_path / "s")
    for m in report.targets:
        model = next(x.model for x in members if x.name == m.name)
        changed = sum(int((classification_predict(model, b) != r).sum()) for b, r in zip(batches[:3], reference[m.name]))
        assert changed <= 0.02 * 300
        assert m.from_base + m.from_self > 0
    with pytest.raises(ConfigError, match="interactive=False"):
        DedupConfig(agreement=True, interactive=True)
    assert DedupConfig(agreement=True).interactive is False  # the default follows agreement


def test_private_agreement_through_svt_never_reads_unnoised(tmp_path):
    from hf_dpdedup.dedup.tasks import classification_predict

    members, batches = make_family()
    rows = {"input_ids": torch.cat([b["input_ids"] for b in batches[:3]]),
            "labels": torch.cat([b["labels"] for b in batches[:3]])}
    private = PrivateDataset(rows, dataset_id="toy-train", public_size=300, batch_size=100)
    data = DedupData(classification_score, public_val=batches[3:4], public_test=batches[4:],
                     private_val=private, predict_fn=classification_predict)
    # |D| = 300: the SVT noise (scale 2cΔ/ε₂ ≈ 0.05) needs a threshold well above it to accept anything
    config = DedupConfig(block_size=BLOCK, threshold=0.25, validation="svt", agreement=True, interactive=False,
                         svt_epsilon=1.0, svt_cutoff=3, noise_seed=3)
    report = deduplicate_family(members, data, config, tmp_path / "store")
    assert private.raw_accesses == 0 and private.charged_reads > 0
    assert all(m.svt_epsilon == pytest.approx(1.0) for m in report.targets)
    assert any(m.from_base + m.from_self > 0 for m in report.targets)


def test_a_seeded_run_draws_all_its_noise_from_one_sampler(tmp_path):
    """Issue 13 (minor): a fresh Random(seed) per mechanism made every mechanism draw the same noise."""
    calls = []

    class CountingConfig(DedupConfig):
        def sampler(self):
            calls.append(1)
            return super().sampler()

    members, batches = make_family()
    rows = {"input_ids": torch.cat([b["input_ids"] for b in batches[:3]]),
            "labels": torch.cat([b["labels"] for b in batches[:3]])}
    private = PrivateDataset(rows, dataset_id="toy-train", public_size=300, batch_size=100)
    data = DedupData(classification_score, public_val=batches[3:4], public_test=batches[4:], private_val=private)
    config = CountingConfig(block_size=BLOCK, threshold=0.03, validation="svt", noise_seed=5)
    report = deduplicate_family(members, data, config, tmp_path / "store")
    assert len(calls) == 1
    assert "seconds" not in report.models[1].to_dict()  # no noise-dependent wall time is published


def test_seeded_training_is_marked_through_ledger_record_dedup_info_and_card(tmp_path):
    """Issue 13 (critical 2): a member trained with seeded noise taints everything built from it."""
    from card_support import card_metadata
    from hf_dpdedup.hub.cards import member_card
    from hf_dpdedup.store.member import read_constitution

    members, batches = make_family()
    members = [members[0], members[2]]
    members[0].privacy = PrivacyMetadata(1.0, 1e-5, ("toy-train",), seeded=True)  # the base
    data = DedupData(classification_score, public_val=batches[:3], public_test=batches[3:])
    report = deduplicate_family(members, data, DedupConfig(block_size=BLOCK, threshold=0.03), tmp_path / "s")
    target = {m.name: m for m in report.models}["eps8"]
    assert target.ledger.seeded and target.seeded and target.to_dict()["noise"] != "secure"
    assert "not a privacy guarantee" in report.table()
    loaded = DedupedModel.from_pretrained(tmp_path / "s" / "members" / "eps8")
    assert loaded.dedup_info.seeded and loaded.dedup_info.privacy.seeded  # its own training was secure
    card = member_card(read_constitution(tmp_path / "s" / "members" / "eps8"), repo_id="ns/eps8",
                       store_repo="ns/b", store_commit="a" * 40)
    assert card_metadata(card)["privacy"]["seeded"] and "not a privacy guarantee" in card.text
