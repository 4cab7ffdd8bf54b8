"""Does Knowledge Distillation Really Work? (Stanton, Izmailov, Kirichenko, Alemi, Wilson, NeurIPS 2021)."""
