"""The deduplication engine: saliency, nearest blocks, search strategies, validators, planner, reports.

Entry point: :func:`hf_dpdedup.dedup.planner.deduplicate_family`.
"""
