"""FedDF: Ensemble Distillation for Robust Model Fusion in Federated Learning (Lin et al., NeurIPS 2020)."""
