"""MOON: Model-Contrastive Federated Learning (Li, He, Song, CVPR 2021)."""
