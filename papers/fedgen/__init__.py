"""FedGen: Data-Free Knowledge Distillation for Heterogeneous Federated Learning (Zhu, Hong, Zhou, ICML 2021)."""
