"""``held_out_batches``: one public data set cut into a search part and a confirmation part."""

from __future__ import annotations

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_dpdedup.data.sources import DataSource
from hf_dpdedup.dedup.tasks import held_out_batches, source_batches
from hf_dpdedup.errors import DataSourceError

from conftest import minilm_path


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(minilm_path())


def write_tsv(path, n: int, labels=("0", "1")) -> DataSource:
    rows = [f"sentence number {i} {'good' if i % 3 else 'bad'}\t{labels[i % len(labels)]}" for i in range(n)]
    path.write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    return DataSource(str(path))


def examples(batches) -> list[tuple[tuple[int, ...], int]]:
    """(token ids without padding, label) of every example."""
    out = []
    for b in batches:
        for ids, mask, label in zip(b["input_ids"], b["attention_mask"], b["labels"]):
            out.append((tuple(ids[mask.bool()].tolist()), int(label)))
    return out


@settings(max_examples=15, deadline=None)
@given(n=st.integers(4, 40), fraction=st.floats(0.1, 0.9), seed=st.integers(0, 3))
def test_parts_are_disjoint_cover_the_set_and_keep_its_labels(tmp_path_factory, tokenizer, n, fraction, seed):
    source = write_tsv(tmp_path_factory.mktemp("d") / "val.tsv", n)
    if not 1 <= round(n * fraction) < n:
        with pytest.raises(DataSourceError, match="leaves one part empty"):
            held_out_batches(tokenizer, source, "text-classification", fraction=fraction, seed=seed, batch_size=8)
        return
    search, confirm = held_out_batches(tokenizer, source, "text-classification", fraction=fraction, seed=seed,
                                       batch_size=8)
    whole = examples(source_batches(tokenizer, source, "text-classification", batch_size=8))
    a, b = examples(search), examples(confirm)
    assert len(b) == round(n * fraction) and len(a) + len(b) == n
    assert sorted(a + b) == sorted(whole)  # same examples, same class ids: nothing lost, nothing renumbered
    again = held_out_batches(tokenizer, source, "text-classification", fraction=fraction, seed=seed, batch_size=8)
    assert examples(again[1]) == b  # the cut is a function of the seed


def test_class_names_map_alike_in_both_parts(tmp_path, tokenizer):
    """Named classes get their ids from the label names in either part, also a class one part lacks."""
    path = tmp_path / "val.tsv"
    path.write_text("sentence\tlabel\n" + "\n".join([f"a{i}\tzebra" for i in range(9)] + ["b\tant"]) + "\n")
    source = DataSource(str(path), label_names=("ant", "zebra"))
    search, confirm = held_out_batches(tokenizer, source, "text-classification", fraction=0.5)
    labels = torch.cat([b["labels"] for b in search + confirm])
    assert sorted(labels.tolist()) == [0] + [1] * 9  # "ant" = 0, "zebra" = 1 in both parts


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.2, 1.5])
def test_a_fraction_outside_the_open_unit_interval_is_refused(tmp_path, tokenizer, fraction):
    with pytest.raises(DataSourceError, match=r"in \(0, 1\)"):
        held_out_batches(tokenizer, write_tsv(tmp_path / "v.tsv", 10), "text-classification", fraction=fraction)
