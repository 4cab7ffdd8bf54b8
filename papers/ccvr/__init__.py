"""CCVR: No Fear of Heterogeneity: Classifier Calibration for Federated Learning with Non-IID Data (Luo et al., NeurIPS 2021)."""
