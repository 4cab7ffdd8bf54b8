"""FedPer: Federated Learning with Personalization Layers (Arivazhagan et al., 2019)."""
