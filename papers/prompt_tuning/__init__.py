"""Prompt tuning: The Power of Scale for Parameter-Efficient Prompt Tuning (Lester, Al-Rfou, Constant, EMNLP 2021)."""
