"""FedNTD: Preservation of the Global Knowledge by Not-True Distillation in Federated Learning (Lee et al., NeurIPS 2022)."""
