"""Search spaces: ``tune_spaces/*.yaml`` -> distributions over dotted ``JobConfig`` keys. No Ray here.

A space file has three sections::

    space:                              # dotted job key -> one distribution
      model.depth: {choice: [56, 92]}
      optim.lr: {loguniform: [0.01, 0.3]}
      model.depth,model.p,model.t:      # keys joined by commas: one choice of a tuple of values,
        choice: [[56, 1, 2], [92, 2, 4]]  # for keys that are only valid together
    set:                                # dotted job key -> value, applied to every trial
      train.epochs: 10
    search:                             # how to search (SearchSettings)
      num_samples: 8
      scheduler: asha

Distributions: ``choice`` (sampled), ``grid`` (every value, each ``num_samples`` times),
``uniform`` / ``loguniform`` (floats in [lo, hi]), ``randint`` (integers in [lo, hi], both ends
included). :func:`check_space` applies every value a distribution can take to the job, so an
unknown key or an invalid value is reported before Ray starts.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ran.config import (
    ConfigError, DuplicateKeyError, JobConfig, apply_overrides, check_keys, flatten, load_yaml,
    parse_config, set_dotted,
)
from ran.tracking.names import EPOCH_METRICS, VALIDATION_METRICS

_EXPONENT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")
KINDS = ("choice", "grid", "uniform", "loguniform", "randint")
_SECTIONS = ("space", "set", "search", "description")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TrialResources(_Strict):
    """What one trial holds. The driver (which runs the TorchTrainer) takes a CPU fraction; the
    workers take ``scaling.*`` of the job, overridden here for every trial when set."""

    driver_cpus: float = Field(0.1, gt=0, le=1)  # CPU of the per-trial driver (not the workers)
    num_workers: int | None = Field(None, ge=1)  # overrides scaling.num_workers
    cpus_per_worker: float | None = Field(None, gt=0)  # overrides scaling.cpus_per_worker
    use_gpu: bool | None = None  # overrides scaling.use_gpu

    def overrides(self) -> dict[str, Any]:
        """The ``scaling.*`` keys these settings replace."""
        pairs = {"scaling.num_workers": self.num_workers,
                 "scaling.cpus_per_worker": self.cpus_per_worker, "scaling.use_gpu": self.use_gpu}
        return {k: v for k, v in pairs.items() if v is not None}


class SearchSettings(_Strict):
    """The ``search:`` section of a space file."""

    num_samples: int = Field(1, ge=1)  # samples of the space; a grid runs whole this many times
    metric: str = "eval/top1"  # reported metric to optimise (each validation reports it)
    mode: Literal["max", "min"] = "max"  # maximise or minimise the metric
    scheduler: Literal["asha", "fifo"] = "asha"  # asha: stop weak trials early; fifo: run all out
    grace_period: int = Field(1, ge=1)  # asha: epochs before a trial may be stopped
    reduction_factor: float = Field(2.0, gt=1)  # asha: keep the top 1/reduction_factor per rung
    max_t: int | None = Field(None, ge=1)  # asha: epochs of a full trial; None: the job's length
    search_alg: Literal["random", "optuna"] = "random"  # optuna: TPE (needs the optuna extra)
    max_concurrent_trials: int | None = Field(None, ge=1)  # None: as many as the cluster holds
    seed: int | None = None  # seeds the sampler (random and optuna)
    top_k: int = Field(5, ge=1)  # trials printed at the end
    resources: TrialResources = TrialResources()

    @model_validator(mode="after")
    def _consistent(self) -> "SearchSettings":
        if self.max_t is not None and self.grace_period > self.max_t:
            raise ValueError(f"grace_period {self.grace_period} exceeds max_t {self.max_t}")
        return self


@dataclass(frozen=True)
class Distribution:
    """One searched parameter: ``keys`` (one, or several set together) and how to draw values."""

    keys: tuple[str, ...]
    kind: str  # one of KINDS
    values: tuple[Any, ...]  # choice/grid: the options; uniform/loguniform/randint: (lo, hi)

    @property
    def name(self) -> str:
        """The parameter name Tune sees: the keys joined by commas."""
        return ",".join(self.keys)

    def probes(self) -> list[Any]:
        """Values that cover what the distribution can draw (options, or both bounds)."""
        return list(self.values)

    def assignments(self, value: Any) -> dict[str, Any]:
        """``{dotted key: value}`` for one drawn value (a joint value is decoded and split)."""
        if len(self.keys) == 1:
            return {self.keys[0]: value}
        return dict(zip(self.keys, json.loads(value) if isinstance(value, str) else value))

    def to_tune(self) -> Any:
        """The Ray Tune domain (imported lazily: this module works without Ray)."""
        from ray import tune

        if self.kind in ("choice", "grid"):
            # Joint values travel as JSON strings: searchers (Optuna) only take scalars.
            options = [json.dumps(v) for v in self.values] if len(self.keys) > 1 else list(self.values)
            return tune.choice(options) if self.kind == "choice" else tune.grid_search(options)
        lo, hi = self.values
        if self.kind == "randint":
            return tune.randint(lo, hi + 1)  # Tune's upper bound is exclusive; ours is not
        return tune.uniform(lo, hi) if self.kind == "uniform" else tune.loguniform(lo, hi)


@dataclass(frozen=True)
class SearchSpace:
    """A parsed space file."""

    name: str  # the file's stem
    params: dict[str, Distribution]  # Tune parameter name -> distribution
    fixed: dict[str, Any] = field(default_factory=dict)  # the ``set:`` section
    settings: SearchSettings = field(default_factory=SearchSettings)
    description: str = ""

    @property
    def searched_keys(self) -> list[str]:
        """Every dotted job key a trial varies."""
        return [k for d in self.params.values() for k in d.keys]

    def param_space(self) -> dict[str, Any]:
        """The ``param_space`` for ``tune.Tuner``."""
        return {name: d.to_tune() for name, d in self.params.items()}

    def trial_overrides(self, params: dict[str, Any]) -> dict[str, Any]:
        """A trial's Tune params -> ``{dotted key: value}`` for :func:`ran.config.apply_overrides`."""
        out: dict[str, Any] = {}
        for name, dist in self.params.items():
            out.update(dist.assignments(params[name]))
        return out


def check_search_metric(settings: SearchSettings, job: JobConfig) -> None:
    """``search.metric`` is a score training reports (:data:`ran.tracking.EPOCH_METRICS` or, with
    validation every epoch, :data:`ran.tracking.VALIDATION_METRICS`) and ``search.mode`` the
    direction in which it is better.

    Raises:
        ConfigError: one line naming the metric or mode and the ones to use.
    """
    every = {**EPOCH_METRICS, **VALIDATION_METRICS}
    scores = ", ".join(sorted(k for k, v in every.items() if v))
    metric, mode = settings.metric, settings.mode
    if metric not in every:
        raise ConfigError(f"search.metric {metric!r} is not reported by training; use one of "
                          f"{scores}")
    better = every[metric]
    if better is None:
        raise ConfigError(f"search.metric {metric!r} is a count, not a score to optimise; use one "
                          f"of {scores}")
    if mode != better:
        raise ConfigError(f"search.mode {mode} with search.metric {metric}: {metric} is better "
                          f"{'higher' if better == 'max' else 'lower'}; set search.mode: {better}")
    if metric in VALIDATION_METRICS and job.train.eval_every > 1:
        raise ConfigError(f"search.metric {metric} is reported only on validation epochs; with "
                          f"train.eval_every={job.train.eval_every} use eval/top1 (carried between "
                          "validations) or set train.eval_every=1")


def load_space(path: str | Path) -> SearchSpace:
    """Read and parse a space YAML; ConfigError says what is wrong and where."""
    try:
        raw = load_yaml(Path(path).read_text())
    except OSError as err:
        raise ConfigError(f"cannot read search space {path}: {err.strerror}") from None
    except DuplicateKeyError as err:
        raise ConfigError(f"search space {path}: {err}; keep one") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"search space {path} is not valid YAML: {err}") from None
    return parse_space(raw, source=str(path), name=Path(path).stem)


def parse_space(raw: Any, source: str = "<dict>", name: str = "space") -> SearchSpace:
    """Parse the ``space`` / ``set`` / ``search`` sections of a space file."""
    if not isinstance(raw, dict) or not isinstance(raw.get("space"), dict) or not raw["space"]:
        raise ConfigError(f"search space {source}: needs a `space:` map of dotted job keys to "
                          f"distributions, e.g. `space: {{optim.lr: {{loguniform: [0.01, 0.3]}}}}`")
    unknown = sorted(set(raw) - set(_SECTIONS))
    if unknown:
        raise ConfigError(f"search space {source}: unknown section(s) {', '.join(unknown)}; "
                          f"valid sections: {', '.join(_SECTIONS)}")
    params = {}
    for key, spec in raw["space"].items():
        dist = parse_distribution(str(key), spec, source)
        params[dist.name] = dist
    fixed = raw.get("set") or {}
    if not isinstance(fixed, dict):
        raise ConfigError(f"search space {source}: `set:` must map dotted job keys to values")
    check_keys([str(k) for k in fixed], f"search space {source}: set")
    _check_no_overlap(params, fixed, source)
    try:
        settings = SearchSettings.model_validate(raw.get("search") or {})
    except ValidationError as err:
        raise ConfigError(f"search space {source}: {_format_settings_error(err)}") from None
    if settings.search_alg == "optuna" and any(d.kind == "grid" for d in params.values()):
        raise ConfigError(f"search space {source}: search_alg optuna cannot run a grid; use "
                          "`choice` for those keys or search_alg: random")
    return SearchSpace(name, params, dict(fixed), settings, str(raw.get("description") or ""))


def parse_distribution(key: str, spec: Any, source: str = "<dict>") -> Distribution:
    """``{kind: args}`` for ``key`` (one dotted key, or several joined by commas)."""
    where = f"search space {source}: {key}"
    keys = tuple(k.strip() for k in key.split(","))
    check_keys(list(keys), f"search space {source}")
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
        raise ConfigError(f"{where}: expected one of {{{': ..., '.join(KINDS)}: ...}}, e.g. "
                          f"{{choice: [a, b]}} or {{loguniform: [1e-4, 1e-1]}}; got {spec!r}")
    kind, args = next(iter(spec.items()))
    if not isinstance(args, list) or not args:
        raise ConfigError(f"{where}: {kind} takes a non-empty list, got {args!r}")
    if kind in ("choice", "grid"):
        _check_joint(keys, args, where)
        return Distribution(keys, kind, tuple(_as_float(a) for a in args))
    if len(keys) > 1:
        raise ConfigError(f"{where}: joint keys take choice or grid of value lists, not {kind}")
    return Distribution(keys, kind, _check_range(kind, args, where))


def _check_joint(keys: tuple[str, ...], options: list[Any], where: str) -> None:
    if len(keys) == 1:
        return
    for option in options:
        if not isinstance(option, list) or len(option) != len(keys):
            raise ConfigError(f"{where}: each option must list {len(keys)} values "
                              f"({', '.join(keys)}), got {option!r}")


def _check_range(kind: str, args: list[Any], where: str) -> tuple[Any, Any]:
    args = [_as_float(a) for a in args]
    number = int if kind == "randint" else (int, float)
    if len(args) != 2 or not all(isinstance(a, number) and not isinstance(a, bool) for a in args):
        kind_of = "integers" if kind == "randint" else "numbers"
        raise ConfigError(f"{where}: {kind} takes [lo, hi], two {kind_of}; got {args!r}")
    lo, hi = args
    ordered = lo <= hi if kind == "randint" else lo < hi
    if not ordered:
        raise ConfigError(f"{where}: {kind} needs lo < hi (randint: lo <= hi); got {args!r}")
    if kind == "loguniform" and lo <= 0:
        raise ConfigError(f"{where}: loguniform needs lo > 0; got {args!r}")
    return lo, hi


def _as_float(value: Any) -> Any:
    """``"1e-4"`` -> 1e-4: PyYAML reads exponents without a dot as strings."""
    if isinstance(value, str) and _EXPONENT.match(value.strip()):
        return float(value)
    return value


def _check_no_overlap(params: dict[str, Distribution], fixed: dict[str, Any], source: str) -> None:
    seen: set[str] = set()
    for dist in params.values():
        for key in dist.keys:
            if key in seen or key in fixed:
                raise ConfigError(f"search space {source}: {key} is set twice (space and set, "
                                  "or two space entries); keep one")
            seen.add(key)


def search_keys() -> list[str]:
    """Every ``search.*`` key ``--set`` may give ``ran tune`` (the space's ``search:`` section)."""
    return sorted(f"search.{k}" for k in flatten(SearchSettings().model_dump()))


def from_command_line(space: SearchSpace, pairs: dict[str, Any]) -> tuple[SearchSpace, dict[str, Any]]:
    """Apply ``ran tune``'s ``--set`` pairs: ``search.*`` keys size the search
    (``--set search.num_samples=2``, :func:`with_search_settings`); the other keys are the job's,
    returned, and win over the space's ``set:`` (which they replace). A searched key is refused.

    Raises:
        ConfigError: a searched key given with ``--set``, an unknown key or an invalid value.
    """
    search = {k: v for k, v in pairs.items() if k.split(".")[0] == "search"}
    job = {k: v for k, v in pairs.items() if k not in search}
    searched = sorted(set(job) & set(space.searched_keys))
    if searched:
        raise ConfigError(f"--set {searched[0]}: search space {space.name} searches this key; "
                          "drop the --set or the key from the space")
    fixed = {k: v for k, v in space.fixed.items() if k not in job}
    return dataclasses.replace(with_search_settings(space, search), fixed=fixed), job


def with_search_settings(space: SearchSpace, changes: dict[str, Any]) -> SearchSpace:
    """``space`` with ``search.*`` keys replaced (``{"search.num_samples": 2}``), set with the one
    dotted-key setter and validated as the space file's ``search:`` section is.

    Raises:
        ConfigError: an unknown ``search.*`` key (naming the valid ones) or an invalid value.
    """
    if not changes:
        return space
    raw = {"search": space.settings.model_dump(exclude_unset=False)}
    keys = search_keys()
    for key, value in changes.items():
        set_dotted(raw, key, value, keys, "--set")
    try:
        settings = SearchSettings.model_validate(raw["search"])
    except ValidationError as err:
        raise ConfigError(f"invalid --set {_format_settings_error(err)}") from None
    if settings.search_alg == "optuna" and any(d.kind == "grid" for d in space.params.values()):
        raise ConfigError(f"--set search.search_alg=optuna: search space {space.name} has a grid, "
                          "which optuna cannot run; use search_alg random")
    return dataclasses.replace(space, settings=settings)


def _format_settings_error(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = "search." + ".".join(str(p) for p in e["loc"]) if e["loc"] else "search"
        if e["type"] == "extra_forbidden":
            fields = ", ".join(SearchSettings.model_fields)
            parts.append(f"unknown setting {loc}; valid settings: {fields}")
        else:
            parts.append(f"{loc}: {e['msg']} (got {e.get('input')!r})")
    return "; ".join(parts)


def base_job(space: SearchSpace, job_raw: dict[str, Any]) -> dict[str, Any]:
    """The job every trial starts from: ``job_raw`` + the space's ``set:`` + trial resources."""
    raw = apply_overrides(copy.deepcopy(job_raw), space.fixed)
    return apply_overrides(raw, space.settings.resources.overrides())


def check_space(space: SearchSpace, job_raw: dict[str, Any]) -> JobConfig:
    """Apply every value each distribution can draw to the base job; ConfigError on the first that
    the job refuses. Returns the base job config (without searched values)."""
    raw = base_job(space, job_raw)
    base = parse_config(copy.deepcopy(raw), "(job + the space's set:)")
    for dist in space.params.values():
        for value in dist.probes():
            trial = apply_overrides(copy.deepcopy(raw), dist.assignments(value))
            try:
                parse_config(trial, f"with {dist.name}={value!r}")
            except ConfigError as err:
                raise ConfigError(f"search space {space.name}: {dist.name}: {err}") from None
    return base
