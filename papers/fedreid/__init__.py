"""FedReID: Performance Optimization for Federated Person Re-identification via Benchmark Analysis (Zhuang et al., ACM MM 2020)."""
