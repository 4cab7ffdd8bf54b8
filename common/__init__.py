"""Shared building blocks of the paper-benchmark suite: data, models, federated engine, results, reports."""
