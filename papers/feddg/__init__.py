"""FedDG: Federated Domain Generalization on Medical Image Segmentation via Episodic Learning in Continuous
Frequency Space (Liu, Chen, Qin, Dou, Heng; CVPR 2021)."""
