"""Experiments from the DPO paper: ``sentiment`` (Figure 2, reward vs KL) and its built-in review corpus."""
