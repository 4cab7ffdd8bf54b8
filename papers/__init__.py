"""One subpackage per reproduced paper: paper.yaml (tables, claims, scales), method.py, README.md."""
