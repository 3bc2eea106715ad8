"""hf_dpdedup: deduplicate families of differentially private fine-tuned models and ship them
through the Hugging Face Hub.

Quick start::

    from hf_dpdedup import FamilyStore, DedupedModel

    family = FamilyStore.create("family", block_size=65536)
    family.add_model("eps1", model_eps1, tokenizer=tokenizer)
    model = DedupedModel.from_pretrained(family.member_path("eps1"))
"""

from .errors import HfDpDedupError
from .modeling import DedupedModel, DedupInfo
from .store import FORMAT, BlockStore, FamilyStore

__version__ = "0.1.0"

__all__ = ["FORMAT", "BlockStore", "DedupInfo", "DedupedModel", "FamilyStore", "HfDpDedupError", "__version__"]
