"""FedGKT: Group Knowledge Transfer (He, Annavaram, Avestimehr, NeurIPS 2020)."""
