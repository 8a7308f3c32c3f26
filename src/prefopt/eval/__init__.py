"""Evaluation: sequence-level KL from samples, clustered standard errors, result tables and plots."""

from .kl import (
           KLEstimate,
           MeanEstimate,
           best_of_n_kl,
           clustered_mean,
           estimate_kl,
           kl_from_logps,
           sequence_logps,
)

__all__ = ["KLEstimate", "MeanEstimate", "best_of_n_kl", "clustered_mean", "estimate_kl", "kl_from_logps",
           "sequence_logps"]
