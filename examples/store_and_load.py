"""Store two members of a family built from the bundled MiniLM, then load one back.

    python examples/store_and_load.py OUT_DIR

The second member differs from the first only in its classifier head, so almost all of its blocks
are shared with the first (exact deduplication).
"""

import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer, BertForSequenceClassification

from hf_dpdedup import DedupedModel, FamilyStore
from hf_dpdedup.demo import minilm_folder
from hf_dpdedup.privacy import PrivacyMetadata

out = Path(sys.argv[1] if len(sys.argv) > 1 else "example_family")
folder = minilm_folder()
tokenizer = AutoTokenizer.from_pretrained(folder)
first = BertForSequenceClassification.from_pretrained(folder, num_labels=2).eval()
second = BertForSequenceClassification.from_pretrained(folder, num_labels=2).eval()
with torch.no_grad():
    second.classifier.weight.mul_(-1)

family = FamilyStore.create(out, block_size=65536)
family.add_model("eps1", first, tokenizer=tokenizer, privacy=PrivacyMetadata(1.0, 1e-5, ("demo",)))
family.add_model("eps8", second, tokenizer=tokenizer, privacy=PrivacyMetadata(8.0, 1e-5, ("demo",)))

model = DedupedModel.from_pretrained(family.member_path("eps8"))
original, rebuilt = second.state_dict(), model.state_dict()
assert all(torch.equal(original[k], rebuilt[k]) for k in original)
batch = tokenizer(["a gripping film ."], return_tensors="pt")
with torch.no_grad():
    print("eps8 predicts", model(**batch).logits.softmax(-1).tolist())
print(f"{family.members()} stored in {family.stored_bytes() / 2**20:.1f} MiB; eps8 weights reload bit-exactly")
