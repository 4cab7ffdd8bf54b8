"""DOSFL: Distilled One-Shot Federated Learning (Zhou, Pu, Ma, Li, Wu, arXiv 2009.07999)."""
