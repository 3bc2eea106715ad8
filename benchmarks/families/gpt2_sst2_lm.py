"""Build the ``gpt2-sst2-lm`` benchmark family: a tiny GPT-2 LM DP fine-tuned on private sentences.

    python benchmarks/families/gpt2_sst2_lm.py          # builds benchmarks/families/gpt2-sst2-lm/

For this family ``train.tsv`` is split (seed 7) into a public slice (pre-training and the WordPiece
vocabulary) and a private part, which is split again into a private training subset and a
disjoint private validation part (for the dedup engine's SVT). ``dev.tsv`` sentences are the
public validation, ``test.tsv`` sentences the public test. A GPT-2-style causal LM (2 layers,
hidden 64, vocabulary 1,024 trained offline with ``tokenizers``) is pre-trained without DP on the
public slice, then every member is DP fine-tuned from it on the private training subset. The token
and position embeddings (tied to the LM head) are frozen; the transformer blocks and the final
LayerNorm are DP-trained. Utility: mean per-sentence next-token accuracy
(:func:`hf_dpdedup.training.tasks.next_token_accuracy`), a mean of per-example scores in [0, 1].
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from hf_dpdedup.data import builtin_path
from hf_dpdedup.training import DPConfig, read_tsv, train_members
from hf_dpdedup.training.data import seed_everything
from hf_dpdedup.training.tasks import mean_score, next_token_accuracy
from minilm_sst2 import fairness_drops, write_figures  # sibling build script


HERE = Path(__file__).resolve().parent
DATA = builtin_path("sst2", "dev").parent  # SST-2 ships with the package
SEED = 7
EPSILONS = [1.0, 2.0, 4.0, 6.0, 8.0]
DELTA = 1e-5
N_PUBLIC, N_PRIVATE_TRAIN, N_PRIVATE_VAL = 20_000, 8_192, 2_000
MAX_LENGTH, VOCAB = 20, 1024
PRETRAIN_EPOCHS = 4
CONFIG = DPConfig(
    epsilon=1.0, delta=DELTA, epochs=2, batch_size=512, lr=0.1, optimizer="sgd", momentum=0.9,
    max_grad_norm=1.0, grad_sample_mode="ghost", seed=SEED,
)


class SequenceCrossEntropy(nn.Module):
    """Next-token cross-entropy averaged per sentence: the privacy unit is one sentence.

    With ``reduction="none"`` (what Opacus' ghost clipping sets) it returns one loss per sentence.
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        input_ids, mask = targets[:, 0], targets[:, 1]
        token_loss = nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), input_ids[:, 1:], reduction="none"
        )
        weights = mask[:, 1:].float()
        per_sentence = (token_loss * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return per_sentence if self.reduction == "none" else per_sentence.mean()


def public_private_order(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of ``train.tsv``'s public slice and of its private part (seed 7); ``bert_sst2.py`` cuts the same way."""
    order = np.random.default_rng(SEED).permutation(n)
    return order[:N_PUBLIC], order[N_PUBLIC:]


def load_splits():
    sentences = list(read_tsv(DATA / "train.tsv").texts)
    public, private = ([sentences[i] for i in part] for part in public_private_order(len(sentences)))
    return {
        "public": public,
        "private_train": private[:N_PRIVATE_TRAIN],
        "private_val": private[N_PRIVATE_TRAIN : N_PRIVATE_TRAIN + N_PRIVATE_VAL],
        "public_val": list(read_tsv(DATA / "dev.tsv").texts),
        "public_test": list(read_tsv(DATA / "test.tsv").texts),
    }


def train_tokenizer(public: list[str]):
    """A WordPiece vocabulary trained offline on the public slice, wrapped for transformers."""
    from tokenizers import BertWordPieceTokenizer
    from transformers import PreTrainedTokenizerFast

    wp = BertWordPieceTokenizer(lowercase=True)
    wp.train_from_iterator(public, vocab_size=VOCAB, min_frequency=2, show_progress=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=wp._tokenizer, unk_token="[UNK]", pad_token="[PAD]", bos_token="[CLS]",
        eos_token="[SEP]", model_max_length=MAX_LENGTH,
    )


def encode(tokenizer, texts: list[str]) -> torch.Tensor:
    """``[N, 2, L]``: token ids and attention mask stacked (the LM's 'targets' are its inputs)."""
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    return torch.stack([enc["input_ids"], enc["attention_mask"]], dim=1)


def build_model(tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    seed_everything(SEED)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=MAX_LENGTH, n_embd=64, n_layer=2, n_head=4,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


def forward(module: nn.Module, batch):
    (packed,) = batch
    ids, mask = packed[:, 0], packed[:, 1]
    positions = torch.arange(ids.shape[1]).repeat(ids.shape[0], 1)  # per batch and contiguous (Opacus)
    return module(input_ids=ids, attention_mask=mask, position_ids=positions).logits, packed


def pretrain(model: nn.Module, packed: torch.Tensor, epochs: int = PRETRAIN_EPOCHS) -> None:
    """Non-private pre-training on the public slice (AdamW, batch 128)."""
    torch.manual_seed(SEED)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loader = torch.utils.data.DataLoader(TensorDataset(packed), batch_size=128, shuffle=True)
    criterion = SequenceCrossEntropy()
    model.train()
    for _ in range(epochs):
        for batch in loader:
            opt.zero_grad()
            criterion(*forward(model, batch)).backward()
            opt.step()


@torch.no_grad()
def utility(model: nn.Module, packed: torch.Tensor) -> float:
    """Mean per-sentence next-token accuracy."""
    model.eval()
    scores = []
    for start in range(0, len(packed), 512):
        logits, batch = forward(model, (packed[start : start + 512],))
        scores.append(next_token_accuracy(logits, batch[:, 0], batch[:, 1]))
    model.train()
    return mean_score(torch.cat(scores))


def freeze_embeddings(model: nn.Module) -> list[str]:
    for p in (*model.transformer.wte.parameters(), *model.transformer.wpe.parameters()):
        p.requires_grad_(False)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def build_base(base_dir: Path):
    """Train the vocabulary and pre-train the public base; save both under ``base_dir``.

    Returns ``(model, tokenizer, splits, packed, public test utility)``. Used by this family and by
    ``gpt2_sst2_lora.py`` (which starts from the same base).
    """
    started = time.perf_counter()
    splits = load_splits()
    tokenizer = train_tokenizer(splits["public"])
    packed = {k: encode(tokenizer, v) for k, v in splits.items()}
    model = build_model(tokenizer)
    pretrain(model, packed["public"])
    pre = utility(model, packed["public_test"])
    print(f"pre-trained: public test next-token accuracy {pre:.4f} ({time.perf_counter() - started:.0f}s)",
          file=sys.stderr)
    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    return model, tokenizer, splits, packed, pre


def load_base(base_dir: Path):
    """``(model, tokenizer, splits, packed splits)``: the saved public base, built first if missing.

    An existing base is reused rather than pre-trained again, so that the families built on it
    (this one, ``gpt2_sst2_lora.py``) start from the very same weights.
    """
    from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

    if not (base_dir / "config.json").exists():
        model, tokenizer, splits, packed, _ = build_base(base_dir)
        return model, tokenizer, splits, packed
    tokenizer = PreTrainedTokenizerFast.from_pretrained(base_dir)
    model = GPT2LMHeadModel.from_pretrained(base_dir)
    splits = load_splits()
    packed = {k: encode(tokenizer, v) for k, v in splits.items()}
    return model, tokenizer, splits, packed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "gpt2-sst2-lm")
    parser.add_argument("--epsilons", type=float, nargs="+", default=EPSILONS)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model, tokenizer, splits, packed = load_base(args.out / "base")
    pre = utility(model, packed["public_test"])
    trained = freeze_embeddings(model)
    rows = train_members(
        model=model, module=model, train_set=TensorDataset(packed["private_train"]), forward=forward,
        criterion=SequenceCrossEntropy(),
        evaluate=lambda m: (utility(m, packed["public_val"]), utility(m, packed["public_test"])),
        epsilons=args.epsilons, config=CONFIG, out=args.out,
        dataset_id=f"glue/sst2:train.tsv#lm-private-train(seed={SEED},n={N_PRIVATE_TRAIN})",
        trained_names=trained, processor=tokenizer,
        extra_args={"base": "GPT-2 (2x64) pre-trained on a public slice of SST-2 train (no DP)",
                    "utility": "mean per-sentence next-token accuracy",
                    "pretrain_public_test_utility": pre, "splits": {k: len(v) for k, v in splits.items()}},
    )
    total = time.perf_counter() - started
    write_figures("gpt2_sst2_lm_family", rows, total)
    print(json.dumps({"wall_seconds": round(total, 1), "pretrain_public_test": pre,
                      "members": [r.__dict__ for r in rows], "fairness_prefilter_drops": fairness_drops(rows)},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
