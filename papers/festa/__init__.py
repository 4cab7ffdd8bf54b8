"""FeSTA: Federated Split Task-Agnostic Vision Transformer for COVID-19 CXR diagnosis (Park et al., NeurIPS 2021)."""
