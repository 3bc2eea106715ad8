"""TSV loading errors, deterministic disjoint splits, the digits halves."""

from __future__ import annotations

import pytest

from hf_dpdedup.errors import TrainingConfigError
from hf_dpdedup.training import TextClassificationData, load_digits_halves, read_tsv, split_indices, split_private


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_reads_labels_and_sentences(tmp_path):
    data = read_tsv(_write(tmp_path / "d.tsv", "label\tsentence\n0\tbad film\n1\tgood \"film\"\n"))
    assert data.texts == ("bad film", 'good "film"')
    assert data.labels == (0, 1)
    assert data.num_labels == 2


@pytest.mark.parametrize(
    "text, message",
    [
        ("label\tsentence\n", "no examples"),
        ("sentence\nhello\n", "label"),
        ("label\tsentence\n\thello\n", "not a non-negative integer"),
        ("label\tsentence\npos\thello\n", "not a non-negative integer"),
    ],
)
def test_rejects_empty_or_unlabelled_data(tmp_path, text, message):
    with pytest.raises(TrainingConfigError, match=message):
        read_tsv(_write(tmp_path / "d.tsv", text))


def test_missing_file(tmp_path):
    with pytest.raises(TrainingConfigError, match="does not exist"):
        read_tsv(tmp_path / "nope.tsv")


def test_split_is_disjoint_complete_and_deterministic():
    train, val = split_indices(1000, validation_fraction=0.1, seed=3)
    assert len(val) == 100 and len(train) == 900
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(range(1000))
    again, _ = split_indices(1000, validation_fraction=0.1, seed=3)
    other, _ = split_indices(1000, validation_fraction=0.1, seed=4)
    assert (again == train).all() and not (other == train).all()


def test_split_private_keeps_pairs_together():
    data = TextClassificationData(tuple(f"s{i}" for i in range(50)), tuple(i % 2 for i in range(50)))
    train, val = split_private(data, validation_fraction=0.2, seed=0)
    for part in (train, val):
        assert all(int(t[1:]) % 2 == y for t, y in zip(part.texts, part.labels))
    assert len(train) + len(val) == 50


def test_mismatched_lengths_rejected():
    with pytest.raises(TrainingConfigError):
        TextClassificationData(("a", "b"), (0,))


def test_digits_halves_are_disjoint_halves():
    (pub_x, pub_y), (priv_x, priv_y) = load_digits_halves(seed=0)
    assert len(pub_x) + len(priv_x) == 1797 and abs(len(pub_x) - len(priv_x)) <= 1
    assert pub_x.shape[1:] == (8, 8) and 0 <= pub_x.min() and pub_x.max() <= 1
    assert set(pub_y) == set(priv_y) == set(range(10))
