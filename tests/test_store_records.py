"""The typed, versioned records of a constitution: round trips, old unversioned records, newer
versions refused, wrong types named."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from block_support import as_format_3
from conftest import tiny_model
from hf_dpdedup import FamilyStore
from hf_dpdedup.errors import ConstitutionError, UnsupportedFormatVersionError
from hf_dpdedup.privacy import AccountantStep, PrivacyMetadata
from hf_dpdedup.store.constitution import Constitution, decode_rows
from hf_dpdedup.store.records import (
    RECORD_VERSION,
    AtDelta,
    BeforeAfter,
    BlocksRecord,
    DedupRecord,
    Fairness,
    LooseTight,
    PrivateValidation,
    PublicTest,
    privacy_from_dict,
    privacy_to_dict,
)

# written by the engine before records were versioned (tests/test_dedup_engine.py's family, member eps8)
OLD = Path(__file__).parent / "data" / "constitution_unversioned.json"

names = st.text("abcdefgh-", min_size=1, max_size=8)
finite = st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_infinity=False)
epsilons = st.one_of(finite, st.just(math.inf))
deltas = st.floats(min_value=0, max_value=0.5, exclude_max=True, allow_nan=False)
maybe = st.none().__or__
privacies = st.builds(
    PrivacyMetadata, epsilon=epsilons, delta=deltas, datasets=st.lists(names, min_size=1, max_size=3).map(tuple),
    accountant=maybe(st.sampled_from(["rdp", "prv", "hf_dpdedup-ledger"])),
    history=st.lists(st.builds(AccountantStep, st.floats(0.1, 10), st.floats(0.001, 1), st.integers(1, 10**6)),
                     max_size=2).map(tuple),
    seeded=st.booleans())
records = st.builds(
    DedupRecord,
    role=maybe(st.sampled_from(["base", "target", "dropped"])),
    base=maybe(names),
    original_privacy=maybe(privacies),
    ledger=maybe(st.dictionaries(names, st.one_of(finite, names), max_size=3)),
    epsilon_after=maybe(st.builds(LooseTight, epsilons, maybe(finite))),
    delta_after=maybe(st.builds(LooseTight, deltas, maybe(deltas))),
    tight_at_training_delta=maybe(st.builds(AtDelta, finite, deltas)),
    svt_epsilon=maybe(finite),
    private_validation=st.dictionaries(names, st.builds(PrivateValidation, finite, st.dictionaries(
        st.sampled_from(["svt", "laplace", "naive_laplace"]), st.integers(1, 9))), max_size=2),
    fairness=maybe(st.builds(Fairness, st.booleans(), st.lists(names, max_size=2).map(tuple),
                             st.lists(names, max_size=2).map(tuple), st.sampled_from(["public test", "public validation"]))),
    seeded=st.booleans(),
    noise=st.sampled_from(["secure", "TEST ONLY"]),
    blocks=maybe(st.builds(BlocksRecord, st.integers(0, 10**6), st.integers(0, 100), st.integers(0, 100))),
    validations=maybe(st.integers(0, 1000)),
    public_test_accuracy=maybe(st.builds(BeforeAfter, maybe(finite), maybe(finite))),
    compression=maybe(finite),
    public_test=maybe(st.builds(PublicTest, names, finite, maybe(finite), names, names, maybe(names), maybe(names))),
)


@settings(max_examples=150, deadline=None)
@given(records)
def test_dedup_record_round_trips_through_json(record):
    data = json.loads(json.dumps(record.to_dict(), allow_nan=False))  # standard JSON: ∞ is "inf"
    assert data["version"] == RECORD_VERSION
    assert DedupRecord.from_dict(data) == record


@settings(max_examples=100, deadline=None)
@given(privacies)
def test_privacy_record_round_trips_through_json(privacy):
    data = json.loads(json.dumps(privacy_to_dict(privacy), allow_nan=False))
    assert data["version"] == RECORD_VERSION
    assert privacy_from_dict(data) == privacy


def test_an_unversioned_constitution_reads_as_version_1_and_writes_the_same_bytes_plus_versions():
    raw = OLD.read_text()
    constitution = Constitution.from_dict(json.loads(raw))
    dedup, privacy = constitution.dedup, constitution.privacy
    assert isinstance(dedup, DedupRecord) and isinstance(privacy, PrivacyMetadata)
    assert (dedup.role, dedup.base, dedup.original_privacy.epsilon, privacy.epsilon) == ("target", "eps1", 8.0, 11.0)
    assert dedup.blocks == BlocksRecord(174, 147, 0) and dedup.blocks.own == 27
    assert dedup.fairness == Fairness(False, (), ("eps1", "eps2"), "public test")
    assert dedup.public_test.dataset == "stanfordnlp/sst2" and dedup.ledger["loose"]["epsilon"] == 11.0
    data = constitution.to_dict()
    assert data["privacy"].pop("version") == 1 and data["dedup"].pop("version") == 1
    # rewritten, its consecutive row ids become runs (format 4, which names its adapter record: none,
    # and leaves out what the file implies)
    assert data["format"] == "hf_dpdedup/4" and data.pop("adapter") is None
    assert any(isinstance(item, list) for t in data["tensors"] for item in t["rows"])
    data = as_format_3(data)
    data["format"] = "hf_dpdedup/1"
    for t in data["tensors"]:
        t["rows"] = list(decode_rows(t["rows"], t["name"]))
    assert json.dumps(data, indent=2) + "\n" == raw  # nothing else changed, byte for byte


def old_data() -> dict:
    return json.loads(OLD.read_text())


@pytest.mark.parametrize("key", ["privacy", "dedup"])
def test_a_newer_record_version_asks_to_upgrade(key):
    data = old_data()
    data[key]["version"] = RECORD_VERSION + 1
    with pytest.raises(UnsupportedFormatVersionError, match=rf"'{key}' record has version 2.*Upgrade hf_dpdedup"):
        Constitution.from_dict(data)


@pytest.mark.parametrize("path, value, field", [
    (("dedup", "version"), "1", "dedup.version"),
    (("dedup", "version"), 0, "dedup.version"),
    (("dedup",), [1], "dedup"),
    (("privacy",), "eps 2", "privacy"),
    (("dedup", "blocks", "from_base"), "147", "dedup.blocks.from_base"),
    (("dedup", "blocks", "total"), 1.5, "dedup.blocks.total"),
    (("dedup", "epsilon_after", "loose"), None, "dedup.epsilon_after.loose"),
    (("dedup", "epsilon_after", "tight"), "big", "dedup.epsilon_after.tight"),
    (("dedup", "fairness", "flagged"), "no", "dedup.fairness.flagged"),
    (("dedup", "fairness", "compared_with"), "eps1", "dedup.fairness.compared_with"),
    (("dedup", "seeded"), 0, "dedup.seeded"),
    (("dedup", "validations"), True, "dedup.validations"),
    (("dedup", "compression"), float("nan"), "dedup.compression"),
    (("dedup", "ledger"), [], "dedup.ledger"),
    (("dedup", "public_test", "after"), None, "dedup.public_test.after"),
    (("dedup", "private_validation"), {"d": {"epsilon": 1.0, "mechanisms": {"svt": "1"}}},
     "dedup.private_validation.d.mechanisms.svt"),
    (("dedup", "original_privacy", "datasets"), "toy-train", "dedup.original_privacy.datasets"),
    (("privacy", "epsilon"), "11", "privacy.epsilon"),
    (("privacy", "seeded"), "false", "privacy.seeded"),
    (("privacy", "history"), [{"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": "5"}], "privacy.history[0].steps"),
])
def test_a_wrong_type_names_the_field_and_says_to_resave(path, value, field):
    data = old_data()
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(ConstitutionError, match=re.escape(f"'{field}' must be ") + ".*download it again"):
        Constitution.from_dict(data)


def test_an_invalid_budget_is_a_constitution_error():
    data = old_data()
    data["privacy"]["delta"] = 2.0
    with pytest.raises(ConstitutionError, match="'privacy'.*delta.*download it again"):
        Constitution.from_dict(data)


def test_older_scalar_forms_and_unknown_fields_are_read_and_kept():
    record = DedupRecord.from_dict({"epsilon_after": 5.5, "delta_after": 2e-5, "base_model": "acme/m",
                                    "blocks": {"total": 10, "from_base": 3, "own": 7}})
    assert record.epsilon_after == LooseTight(5.5, None) and record.delta_after == LooseTight(2e-5, 2e-5)
    assert record.to_dict()["base_model"] == "acme/m" and record.to_dict()["blocks"]["own"] == 7


def test_add_model_takes_typed_records_only(tmp_path):
    family = FamilyStore.create(tmp_path / "f", block_size=128)
    with pytest.raises(TypeError, match="DedupRecord"):
        family.add_model("m", tiny_model("bert"), dedup={"base": "m"})
    with pytest.raises(TypeError, match="PrivacyMetadata"):
        family.add_model("m", tiny_model("bert"), privacy={"epsilon": 1.0})
    assert family.members() == [] and family.blocks.index.total_rows == 0  # refused before anything was written
    family.add_model("m", tiny_model("bert"), privacy=PrivacyMetadata(1.0, 1e-5, ("d",)), dedup=DedupRecord(base="m"))
    stored = family.constitution("m")
    assert stored.dedup == DedupRecord(base="m") and stored.privacy == PrivacyMetadata(1.0, 1e-5, ("d",))
