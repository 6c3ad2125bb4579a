"""MLflow model registry: the registered backbone, champion/challenger promotion, the model card.

The package, by job:

- ``dinoflow.registry.model``: ``RegisteredBackbone``, the registered model ``dinoflow-backbone``
  (the teacher backbone plus the preprocessing it was trained with), and ``weights_sha256``; no
  MLflow.
- ``dinoflow.registry.promotion``: the promotion policy, pure: ``RegistrationConfig``, the
  promotion metric (``resolve_registration_metric``) and ``decide`` (does a version beat the
  champion on the same evaluation data).
- ``dinoflow.registry.card``: the model card text, pure.
- ``dinoflow.registry.store``: everything that talks to MLflow: logging and registering,
  aliases, the registration lock, the repair of half-made versions, lineage, and the
  registration job ``register_pretrained``.

Registered versions are pickled with the class path ``dinoflow.registry.RegisteredBackbone``
(the path every registered version is stored under): unpickling one in a fresh process only
needs this package, which
imports no MLflow; the package source also travels with the model (``code_paths``) for machines
without dinoflow. Models are loaded by ``dinoflow.artifacts.load_model``.
"""

from __future__ import annotations

from dinoflow.registry.card import model_card
from dinoflow.registry.model import PREPROCESSING, RegisteredBackbone, weights_sha256
from dinoflow.registry.promotion import (
    AUTO_LABEL_FREE_METRIC,
    AUTO_LABELLED_METRIC,
    AUTO_METRIC,
    CHALLENGER,
    CHAMPION,
    MODEL_NAME,
    RegistrationConfig,
    decide,
    resolve_registration_metric,
)
from dinoflow.registry.store import (
    EXPERIMENT,
    MAX_DESCRIPTION,
    TAG_COMPLETE,
    TAG_DECISION,
    TAG_EVAL_DATA,
    TAG_METRIC,
    TAG_PREVIOUS_CHAMPION,
    TAG_PROMOTION_METRIC,
    TAG_STARTED,
    TAG_WEIGHTS,
    log_and_register,
    promote,
    register_pretrained,
    registered_with_weights,
    registry_lock,
    repair_half_made_versions,
)

__all__ = [
    "AUTO_LABELLED_METRIC",
    "AUTO_LABEL_FREE_METRIC",
    "AUTO_METRIC",
    "CHALLENGER",
    "CHAMPION",
    "EXPERIMENT",
    "MAX_DESCRIPTION",
    "MODEL_NAME",
    "PREPROCESSING",
    "TAG_COMPLETE",
    "TAG_DECISION",
    "TAG_EVAL_DATA",
    "TAG_METRIC",
    "TAG_PREVIOUS_CHAMPION",
    "TAG_PROMOTION_METRIC",
    "TAG_STARTED",
    "TAG_WEIGHTS",
    "RegisteredBackbone",
    "RegistrationConfig",
    "decide",
    "log_and_register",
    "model_card",
    "promote",
    "register_pretrained",
    "registered_with_weights",
    "registry_lock",
    "repair_half_made_versions",
    "resolve_registration_metric",
    "weights_sha256",
]
