"""Every name ``ran`` hands to MLflow or Ray, checked before any work starts.

The rules are MLflow's own: its validators are called directly, so a name passes here exactly when
the tracking server would take it. They live in ``mlflow.utils.validation`` (MLflow 3.17 exports
no public checker; tests/unit/test_validate.py pins what they refuse). Ray Train uses the storage
name and the job name as directory names under ``storage.path``.
"""

from __future__ import annotations

import posixpath
from typing import TYPE_CHECKING, Any, Callable

from mlflow.exceptions import MlflowException
from mlflow.utils import validation

from ran.config import ConfigError
from ran.tracking import names

if TYPE_CHECKING:
    from ran.config import JobConfig

ALIAS_RULE = "letters, digits, _ and - (not 'latest', not v<number>)"
MODEL_RULE = "any text without '/' or ':'"
DIRECTORY_RULE = "one directory name: no '/', not '.' or '..', not empty"


def _mlflow_check(check: Callable[[str], Any], value: str, what: str, rule: str) -> None:
    try:
        check(value)
    except MlflowException as err:
        raise ConfigError(f"{what} {value!r} is refused by MLflow ({err.message.rstrip('.')}); "
                          f"use {rule}") from None


def check_alias(alias: str, what: str = "alias") -> None:
    """A registered-model alias MLflow accepts (``champion``, ``staging``).

    Raises:
        ConfigError: one line naming the alias and what is allowed.
    """
    _mlflow_check(validation._validate_model_alias_name, alias, what, ALIAS_RULE)
    _mlflow_check(validation._validate_model_alias_name_reserved, alias, what, ALIAS_RULE)


def check_directory_name(name: str, what: str) -> None:
    """A name used as one directory under ``storage.path`` (Ray Train's run name).

    Raises:
        ConfigError: one line naming the value and what is allowed.
    """
    if not name or "/" in name or "\\" in name or posixpath.normpath(name) in (".", ".."):
        raise ConfigError(f"{what} {name!r} cannot name a run directory; use {DIRECTORY_RULE}")


def check_names(cfg: "JobConfig") -> None:
    """Every name of a job that reaches MLflow or Ray: the registered model, the experiment, the
    run name, the storage and job names, and the tag keys ``ran`` writes.

    Raises:
        ConfigError: the first refused name, with its config key and what is allowed.
    """
    t = cfg.tracking
    if t.registered_model is not None:
        _mlflow_check(validation._validate_model_name, t.registered_model,
                      "tracking.registered_model", MODEL_RULE)
    _mlflow_check(validation._validate_experiment_name, t.experiment, "tracking.experiment",
                  "a non-empty name of at most 500 characters")
    if t.run_name is not None and not 0 < len(t.run_name) <= validation.MAX_ENTITY_KEY_LENGTH:
        raise ConfigError(f"tracking.run_name must be 1 to {validation.MAX_ENTITY_KEY_LENGTH} "
                          f"characters (got {len(t.run_name)})")
    check_directory_name(cfg.name, "name (the job name)")
    if cfg.storage.name is not None:
        check_directory_name(cfg.storage.name, "storage.name")
    for key in tag_keys():
        _mlflow_check(validation._validate_tag_name, key, "tag key", "MLflow's tag key rules")


def tag_keys() -> list[str]:
    """Every run tag key ``ran`` defines (``names.TAG_*``)."""
    return [value for key, value in vars(names).items() if key.startswith("TAG_")]
