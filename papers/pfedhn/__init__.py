"""pFedHN: Personalized Federated Learning using Hypernetworks (Shamsian et al., ICML 2021)."""
