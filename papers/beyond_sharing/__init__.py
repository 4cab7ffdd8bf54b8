"""Beyond Sharing Weights for Deep Domain Adaptation (Rozantsev, Salzmann, Fua; TPAMI 2019)."""
