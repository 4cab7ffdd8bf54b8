"""Markdown reports: the paper's tables beside ours, claims checked on our numbers, plots, provenance."""
