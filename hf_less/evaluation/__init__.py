"""Evaluation: target loss and task metrics (:mod:`hf_less.evaluation.metrics`), data-quality scorers
used as selection baselines (:mod:`hf_less.evaluation.quality`: IFD, Superfiltering, AlpaGasus).

The names of the 0.1 module ``hf_less.evaluation`` (the metrics) are re-exported here.
"""

from .metrics import (
    batch_logits,
    beside_baselines,
    distance_bins,
    distance_loss_analysis,
    evaluate_model,
    exact_match,
    generate_answers,
    is_multiple_choice,
    mc_accuracy,
    mc_grade,
    normalize_answer,
    option_completion,
    option_logliks,
    per_example_losses,
    pir,
    rankdata,
    sdf,
    sequence_logprob,
    spearman,
    target_loss,
    task_metric,
)

__all__ = [
    "batch_logits", "beside_baselines", "distance_bins", "distance_loss_analysis", "evaluate_model", "exact_match",
    "generate_answers", "is_multiple_choice", "mc_accuracy", "mc_grade", "normalize_answer", "option_completion",
    "option_logliks", "per_example_losses", "pir", "rankdata", "sdf", "sequence_logprob", "spearman", "target_loss",
    "task_metric",
]
