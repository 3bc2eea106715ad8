"""The deduplication engine: saliency, nearest blocks, search strategies, validators, planner, reports.

Entry point: :func:`hf_dpdedup.dedup.storing.deduplicate_family`, configured by
:class:`hf_dpdedup.dedup.config.DedupConfig`.
"""
