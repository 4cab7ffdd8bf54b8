"""FedAlign: Local Learning Matters: Rethinking Data Heterogeneity in Federated Learning (Mendieta et al., CVPR 2022)."""
