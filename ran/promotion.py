"""Gated promotion through MLflow registry aliases, and the registry as a table.

``ran promote NAME --version V --alias champion`` moves ``@champion`` to version V only if V beats
the version that holds it now, on the same data:

- by default on the validation metrics recorded when the versions were registered (version tags
  ``eval/top1``, ``eval/top5``, ``eval/loss``), which compare only if both runs validated on the
  same data by content (the digest of the validation split each run logged as its MLflow dataset,
  :mod:`ran.tracking.basis`: the same shards at two paths are the same data); otherwise it refuses
  and asks for ``--eval-data``;
- with ``--eval-data PATH``, on a fresh evaluation of both versions on those shards.

A version whose recorded metrics or weights are not finite (a diverged run) is refused whatever
its numbers. The candidate must have a strictly higher top-1 than the holder and, with ``--min-top1``, at least
that top-1 (a fraction, 0.75 for 75%). A refusal leaves the alias where it was. A promotion moves
the alias (``set_registered_model_alias``) and records who, when, why and the metrics as tags on
the promoted version (``promotion.<alias>.*``) and on the version it replaced
(``promotion.<alias>.replaced_by`` and ``.replaced_at``). Aliases are the registry's mutable
pointers; stages are deprecated and not used.
"""

from __future__ import annotations

import argparse
import datetime as dt
import getpass
import os
from dataclasses import dataclass, field
from typing import Any

from ran import runtime, tracking
from ran.table import format_table
from ran.tracking.basis import Basis, run_basis
from ran.tracking.validate import check_alias


class PromotionError(ValueError):
    """A promotion request that cannot be evaluated (unknown version, no comparable metrics)."""


@dataclass
class Standing:
    """One version's metrics on one basis."""

    version: str
    top1: float
    top5: float | None = None
    loss: float | None = None
    basis: str = ""  # what the metrics were measured on, for messages and tags
    data: Basis | None = None  # the recorded validation data (None: evaluated here on one path)


@dataclass
class Decision:
    """The outcome of a promotion request."""

    outcome: str  # "promoted", "refused" or "unchanged"
    reason: str  # one line, for people
    candidate: Standing | None = None
    holder: Standing | None = None
    tags: dict[str, str] = field(default_factory=dict)  # recorded on the candidate

    @property
    def promoted(self) -> bool:
        return self.outcome == "promoted"


# ---------------------------------------------------------------------------------------------
# Reading the registry


def recorded_standing(mv: Any) -> Standing:
    """The validation metrics recorded with a version, and the data they were measured on (by
    content: :func:`ran.tracking.basis.run_basis`)."""
    tags = {k: tracking.version_metric(mv.tags or {}, k) for k in tracking.METRIC_TAGS}
    if tags["eval/top1"] is None:
        raise PromotionError(f"version {mv.version} of {mv.name!r} has no recorded eval/top1 tag; "
                             "pass --eval-data PATH to evaluate it")
    data = run_basis(mv.run_id)
    return Standing(str(mv.version), float(tags["eval/top1"]), _float(tags.get("eval/top5")),
                    _float(tags.get("eval/loss")), basis=f"{data.where} (recorded)", data=data)


def _float(text: str | None) -> float | None:
    return None if text is None else float(text)


def evaluated_standing(ref: str, version: str, data: str) -> Standing:
    """A fresh evaluation of the model ``ref`` names (``models:/NAME/VERSION`` for the gate; any
    reference :meth:`ran.runtime.ModelBundle.load` takes) on the ``val`` split of ``data``, as
    ``version``."""
    m = runtime.ModelBundle.load(ref).evaluate(data, "val")
    return Standing(str(version), m["top1"], m["top5"], m["loss"], basis=f"{data} [val] (evaluated)")


def not_finite(name: str, mv: Any) -> str:
    """What of version ``mv`` is not finite: its recorded validation metrics (version tags), else
    its weights (:func:`ran.runtime.read_model`); "" when all is (:func:`ran.tracking.nonfinite_reason`)."""
    bad = tracking.nonfinite_reason(mv.tags or {})
    if bad:
        return bad
    state = runtime.read_model(f"models:/{name}/{mv.version}").state
    return tracking.nonfinite_reason({}, tracking.nonfinite_tensors(state), len(state))


# ---------------------------------------------------------------------------------------------
# Deciding and recording


def decide(candidate: Standing, holder: Standing | None, alias: str,
           min_top1: float | None = None) -> Decision:
    """The gate: at least ``min_top1``, and strictly better top-1 than the holder."""
    if min_top1 is not None and candidate.top1 < min_top1:
        return Decision("refused", f"version {candidate.version} has top-1 {candidate.top1:.4f} "
                        f"on {candidate.basis}, below --min-top1 {min_top1:.4f}", candidate, holder)
    if holder is None:
        return Decision("promoted", f"{alias!r} was unassigned; version {candidate.version} takes "
                        f"it with top-1 {candidate.top1:.4f} on {candidate.basis}", candidate)
    if candidate.top1 <= holder.top1:
        return Decision("refused", f"version {candidate.version} (top-1 {candidate.top1:.4f}) does "
                        f"not beat {alias!r} version {holder.version} (top-1 {holder.top1:.4f}) on "
                        f"{holder.basis}", candidate, holder)
    return Decision("promoted", f"version {candidate.version} (top-1 {candidate.top1:.4f}) beats "
                    f"{alias!r} version {holder.version} (top-1 {holder.top1:.4f}) on "
                    f"{holder.basis}", candidate, holder)


def current_user() -> str:
    """Who is promoting: MLflow's user name if set, else the OS user."""
    for key in ("MLFLOW_TRACKING_USERNAME", "USER", "LOGNAME"):
        if os.environ.get(key):
            return os.environ[key]
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def promotion_tags(decision: Decision, alias: str, user: str, reason: str,
                   when: dt.datetime) -> dict[str, str]:
    """``promotion.<alias>.*`` tags for the promoted version."""
    c, h = decision.candidate, decision.holder
    assert c is not None
    tags = {"by": user, "at": when.isoformat(timespec="seconds"), "reason": reason or "-",
            "basis": c.basis, "top1": f"{c.top1:.6f}",
            "previous_version": h.version if h else "none"}
    if c.top5 is not None:
        tags["top5"] = f"{c.top5:.6f}"
    if c.loss is not None:
        tags["loss"] = f"{c.loss:.6f}"
    if h is not None:
        tags["previous_top1"] = f"{h.top1:.6f}"
    return {f"promotion.{alias}.{k}": v for k, v in tags.items()}


def promote(name: str, version: str, alias: str = "champion", *, min_top1: float | None = None,
            eval_data: str | None = None, reason: str = "", user: str | None = None) -> Decision:
    """Move ``alias`` of ``name`` to ``version`` if it passes the gate; see the module docstring.

    Raises:
        PromotionError: no comparable metrics; tracking.ProvenanceError: ``version`` is not a
            model ran logged (:func:`ran.tracking.provenance.check_ran_model`); the alias stays.
    """
    check_alias(alias, "--alias")
    tracking.existing_store()
    if min_top1 is not None and not 0.0 <= min_top1 <= 1.0:
        raise PromotionError(f"--min-top1 {min_top1}: give top-1 as a fraction, e.g. 0.75 for 75%")
    mv = tracking.model_version(name, version)
    # Only ran's own models are promoted: the gate's metrics say nothing about a version whose
    # pyfunc would serve something else (a pickled python_model, shipped code).
    tracking.download_checked(tracking.version_source(f"models:/{name}/{mv.version}", mv))
    holder_mv = tracking.alias_holder(name, alias)
    if holder_mv is not None and str(holder_mv.version) == str(mv.version):
        return Decision("unchanged", f"version {mv.version} already holds {alias!r}")
    bad = not_finite(name, mv)
    if bad:
        return Decision("refused", f"version {mv.version} of {name!r} is not finite ({bad}); "
                        "retrain it, a diverged model cannot hold an alias")
    if eval_data:
        candidate = evaluated_standing(f"models:/{name}/{mv.version}", str(mv.version), eval_data)
        holder = (evaluated_standing(f"models:/{name}/{holder_mv.version}", str(holder_mv.version),
                                     eval_data) if holder_mv else None)
    else:
        candidate = recorded_standing(mv)
        holder = recorded_standing(holder_mv) if holder_mv else None
        if holder is not None and not candidate.data.same_data(holder.data):
            raise PromotionError(
                f"recorded metrics are not comparable: version {candidate.version} validated on "
                f"{candidate.basis}, version {holder.version} on {holder.basis}; pass --eval-data "
                "PATH to evaluate both on the same shards")
    decision = decide(candidate, holder, alias, min_top1)
    if not decision.promoted:
        return decision
    when = dt.datetime.now(dt.timezone.utc)
    decision.tags = promotion_tags(decision, alias, user or current_user(), reason, when)
    replaced = str(holder_mv.version) if holder_mv is not None else None
    tracking.move_alias(name, alias, str(mv.version), decision.tags, replaced, {
        f"promotion.{alias}.replaced_by": str(mv.version),
        f"promotion.{alias}.replaced_at": decision.tags[f"promotion.{alias}.at"]})
    return decision


def cli_promote(args: argparse.Namespace) -> int:
    decision = promote(args.name, args.version, args.alias, min_top1=args.min_top1,
                       eval_data=args.eval_data, reason=args.reason)
    if decision.outcome == "refused":
        print(f"refused: {decision.reason}; {args.alias!r} unchanged")
        return 1
    if decision.outcome == "unchanged":
        print(f"unchanged: {decision.reason}")
        return 0
    print(f"promoted: {args.name}@{args.alias} -> version {args.version}: {decision.reason}")
    return 0


# ---------------------------------------------------------------------------------------------
# The registry as a table


def registry_rows(name: str | None = None) -> list[dict[str, str]]:
    """One row per registered version: model, version, aliases, recorded metrics, run, created."""
    tracking.existing_store()
    models = [tracking.registered_model(name)] if name else tracking.registered_models()
    rows = []
    for model in models:
        aliases: dict[str, list[str]] = {}
        for alias, version in model.aliases.items():
            aliases.setdefault(str(version), []).append(alias)
        for mv in tracking.model_versions(model.name):
            tags = mv.tags or {}
            rows.append({
                "model": model.name, "version": str(mv.version),
                "aliases": ",".join(sorted(aliases.get(str(mv.version), []))) or "-",
                "top1": _metric(tracking.version_metric(tags, "eval/top1")),
                "top5": _metric(tracking.version_metric(tags, "eval/top5")),
                "loss": _metric(tracking.version_metric(tags, "eval/loss")), "arch": tags.get("model", "-"),
                "run": mv.run_id or "-",  # whole: what ran eval and the UI search take
                "created": dt.datetime.fromtimestamp(mv.creation_timestamp / 1000).strftime(
                    "%Y-%m-%d %H:%M"),
            })
    return rows


def _metric(text: str | None) -> str:
    return "-" if text is None else f"{float(text):.4f}"


REGISTRY_COLUMNS = {"model": "model", "version": "version", "aliases": "aliases",
                    "top1": "eval/top1", "top5": "eval/top5", "loss": "eval/loss", "arch": "arch",
                    "run": "run", "created": "created"}


def format_registry(rows: list[dict[str, str]]) -> str:
    """:func:`registry_rows` as a table (:func:`ran.table.format_table`; numbers right-aligned)."""
    keys = list(REGISTRY_COLUMNS)
    right = [keys.index(k) for k in ("version", "top1", "top5", "loss")]
    return format_table(list(REGISTRY_COLUMNS.values()), [[r[k] for k in keys] for r in rows],
                        right=right)


def cli_registry(args: argparse.Namespace) -> int:
    rows = registry_rows(args.name)
    if not rows:
        print(f"no registered model versions in {tracking.shown(tracking.tracking_uri())}")
        return 0
    print(format_registry(rows))
    return 0
