"""The library's jobs: what a pipeline node, a cluster entry point or a script calls.

Each takes validated configs and returns a typed result (``dinoflow.results``):
``pretrain.run_pretraining`` -> PretrainSummary, ``evaluate.run_evaluation`` -> (metrics,
EvaluationReport), ``register.run_registration`` -> RegistrationDecision,
``tune.run_study`` -> the study summary.
"""
