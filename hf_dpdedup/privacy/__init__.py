"""Privacy core: model metadata, ledger (composition), Sparse Vector Technique, private-data firewall."""

from .metadata import AccountantStep, PrivacyMetadata

__all__ = ["AccountantStep", "PrivacyMetadata"]
