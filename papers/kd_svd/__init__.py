"""Self-supervised Knowledge Distillation Using Singular Value Decomposition (Lee, Kim, Song, ECCV 2018) and
Knowledge Transfer via Decomposing Essential Information in Convolutional Neural Networks (Lee, Song, TNNLS)."""
