"""On-disk format ``hf_dpdedup/1``–``/3`` (see :mod:`.format` and :mod:`.constitution`): block store,
member folders, family folder."""

from .block_store import BlockStore
from .codec import Codec
from .constitution import AdapterRecord, Constitution, StoreRef, TensorEntry
from .family import FamilyStore
from .format import FORMAT
from .records import DedupRecord

__all__ = ["FORMAT", "AdapterRecord", "BlockStore", "Codec", "Constitution", "DedupRecord", "FamilyStore", "StoreRef", "TensorEntry"]
