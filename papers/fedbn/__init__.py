"""FedBN: Federated Learning on Non-IID Features via Local Batch Normalization (Li et al., ICLR 2021)."""
