"""Refine Myself by Teaching Myself: Feature Refinement via Self-Knowledge Distillation (Ji, Shin, Hwang, Park, Moon, CVPR 2021)."""
