"""Per-example utility scores: values, padding, and bounds (the SVT sensitivity needs [0, 1])."""

from __future__ import annotations

import torch

from hf_dpdedup.training import classification_correct, mean_score, next_token_accuracy


def test_classification_correct_per_example():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    assert classification_correct(logits, torch.tensor([0, 1, 1])).tolist() == [1.0, 1.0, 0.0]


def _one_hot_logits(predicted: list[list[int]], vocab: int = 5) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(predicted), vocab).float()


def test_next_token_accuracy_counts_real_next_tokens_only():
    input_ids = torch.tensor([[1, 2, 3, 0], [4, 4, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    # sentence 0: predicts 2 (right), 0 (wrong) — the padded position does not count
    # sentence 1: predicts 4 (right)
    logits = _one_hot_logits([[2, 0, 0, 0], [4, 3, 3, 3]])
    scores = next_token_accuracy(logits, input_ids, mask)
    assert scores.tolist() == [0.5, 1.0]


def test_next_token_accuracy_of_a_one_token_sentence_is_zero_and_bounded():
    input_ids = torch.tensor([[3, 0, 0]])
    scores = next_token_accuracy(torch.randn(1, 3, 5), input_ids, torch.tensor([[1, 0, 0]]))
    assert scores.tolist() == [0.0]
    torch.manual_seed(0)
    many = next_token_accuracy(torch.randn(64, 6, 5), torch.randint(0, 5, (64, 6)), torch.ones(64, 6, dtype=torch.long))
    assert ((many >= 0) & (many <= 1)).all()


def test_mean_score():
    assert mean_score(torch.tensor([1.0, 0.0, 1.0, 1.0])) == 0.75
