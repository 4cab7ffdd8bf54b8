"""FedKD: communication-efficient federated learning via knowledge distillation (Wu et al., Nature Communications 2022)."""
