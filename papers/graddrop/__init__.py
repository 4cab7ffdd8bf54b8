"""Gradient Dropping: Sparse Communication for Distributed Gradient Descent (Aji & Heafield, EMNLP 2017)."""
