"""Names checked before work starts, by MLflow's own rules (pinned here: they are MLflow-private)."""

from __future__ import annotations

import pytest

from ran.config import ConfigError, load_config
from ran.tracking.validate import check_alias, check_names, tag_keys


def test_every_tag_key_ran_writes_is_one_mlflow_takes():
    keys = tag_keys()
    assert {"ran.storage", "mlflow.parentRunId", "ran.registered_version"} <= set(keys)
    check_names(load_config(None, {}))  # the defaults pass, tag keys included


@pytest.mark.parametrize("name", ["team/tiny", "a:b", "/x", " "])
def test_registered_model_names_mlflow_refuses(name):
    with pytest.raises(ConfigError, match=r"^tracking\.registered_model .* is refused by MLflow"):
        check_names(load_config(None, {"tracking.registered_model": name}))


@pytest.mark.parametrize("name", ["ran-demo", "Team Model 2", "résumé_v2"])
def test_registered_model_names_mlflow_takes(name):
    check_names(load_config(None, {"tracking.registered_model": name}))


@pytest.mark.parametrize(("alias", "ok"), [("champion", True), ("staging-2", True), ("v2", False),
                                           ("V10", False), ("Latest", False), ("a b", False),
                                           ("a/b", False), ("", False)])
def test_aliases(alias, ok):
    if ok:
        check_alias(alias)
    else:
        with pytest.raises(ConfigError, match=r"^alias .* is refused by MLflow"):
            check_alias(alias)


def test_run_name_length_is_mlflows_limit():
    check_names(load_config(None, {"tracking.run_name": "r" * 250}))
    with pytest.raises(ConfigError, match=r"tracking.run_name must be 1 to 250 characters \(got 251\)"):
        check_names(load_config(None, {"tracking.run_name": "r" * 251}))
