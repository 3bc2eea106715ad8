"""The deduplication engine: saliency, nearest blocks, search strategies, validators, planner, reports.

Entry point: :func:`hf_dpdedup.dedup.planner.deduplicate_family`, configured by
:class:`hf_dpdedup.dedup.config.DedupConfig`.
"""
