"""The promotion gate and the registry table, without a store (the store: tests/integration)."""

from __future__ import annotations

import datetime as dt

from ran.promotion import Standing, decide, format_registry, promotion_tags

DATA = "/data/synth [val] (recorded)"


def test_a_better_candidate_takes_the_alias():
    d = decide(Standing("2", 0.61, basis=DATA), Standing("1", 0.55, basis=DATA), "champion")
    assert d.promoted
    assert "version 2 (top-1 0.6100) beats 'champion' version 1 (top-1 0.5500)" in d.reason


def test_a_worse_or_equal_candidate_is_refused():
    holder = Standing("2", 0.61, basis=DATA)
    for top1 in (0.40, 0.61):
        d = decide(Standing("1", top1, basis=DATA), holder, "champion")
        assert d.outcome == "refused"
        assert "does not beat 'champion' version 2 (top-1 0.6100)" in d.reason


def test_min_top1_gates_even_an_unassigned_alias():
    d = decide(Standing("1", 0.40, basis=DATA), None, "champion", min_top1=0.5)
    assert d.outcome == "refused" and "below --min-top1 0.5000" in d.reason
    assert decide(Standing("1", 0.60, basis=DATA), None, "champion", min_top1=0.5).promoted


def test_promotion_tags_say_who_when_why_and_the_metrics():
    d = decide(Standing("2", 0.61, 0.9, 1.2, basis=DATA), Standing("1", 0.55, basis=DATA), "champion")
    tags = promotion_tags(d, "champion", "ada", "better mask", dt.datetime(2026, 1, 2, 3, 4, 5,
                                                                           tzinfo=dt.timezone.utc))
    assert tags == {
        "promotion.champion.by": "ada", "promotion.champion.at": "2026-01-02T03:04:05+00:00",
        "promotion.champion.reason": "better mask", "promotion.champion.basis": DATA,
        "promotion.champion.top1": "0.610000", "promotion.champion.top5": "0.900000",
        "promotion.champion.loss": "1.200000", "promotion.champion.previous_version": "1",
        "promotion.champion.previous_top1": "0.550000",
    }


def test_registry_table_aligns_columns():
    rows = [{"model": "ran-model", "version": "12", "aliases": "champion", "top1": "0.6100",
             "top5": "0.9000", "loss": "1.2000", "arch": "attention56", "run": "abc",
             "created": "2026-01-02 03:04"},
            {"model": "ran-model", "version": "3", "aliases": "-", "top1": "-", "top5": "-",
             "loss": "-", "arch": "attention92", "run": "def", "created": "2026-01-01 00:00"}]
    lines = format_registry(rows).splitlines()
    assert lines[0].split() == ["model", "version", "aliases", "eval/top1", "eval/top5", "eval/loss",
                                "arch", "run", "created"]
    assert lines[1].split()[:3] == ["ran-model", "12", "champion"]
    assert len({line.index("attention") for line in lines[1:]}) == 1  # one column
