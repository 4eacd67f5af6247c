"""Every verb's --help: a one-line help with its default for each flag, and examples at the end."""

from __future__ import annotations

import argparse

import pytest

from ran.cli import build_parser, main


def _verbs(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    """(words, parser) of every leaf command, e.g. (("jobs", "logs"), parser)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield prefix, parser
        return
    for name, child in subs[0].choices.items():
        yield from _verbs(child, (*prefix, name))


VERBS = dict(_verbs(build_parser()))


def test_every_verb_is_walked():
    assert {"train", "tune", "eval", "promote", "registry", "explain", "submit", "models"} <= \
        {words[0] for words in VERBS}
    assert {("jobs", "list"), ("jobs", "logs"), ("data", "build"), ("data", "synth")} <= set(VERBS)


@pytest.mark.parametrize("words", sorted(VERBS))
def test_help_ends_with_examples_that_use_the_verb(words, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*words, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    examples = out.split("examples:\n", 1)[1].splitlines()
    assert 1 <= len(examples) <= 3
    assert all(line.startswith("  ran " + " ".join(words)) or "ran " + " ".join(words) in line
               for line in examples), examples


@pytest.mark.parametrize("words", sorted(VERBS))
def test_every_flag_has_help_with_its_default(words):
    for action in VERBS[words]._actions:
        if not action.option_strings or action.dest == "help":
            continue
        text = action.help or ""
        assert "(default:" in text or "(required)" in text or "(repeatable; default" in text, \
            f"ran {' '.join(words)} {action.option_strings[0]}: {text!r}"


def test_the_same_flag_has_the_same_fallback_everywhere():
    texts = {words: next(a.help for a in p._actions if "--address" in a.option_strings)
             for words, p in VERBS.items() if any("--address" in a.option_strings for a in p._actions)}
    assert {t.rsplit("(default:", 1)[1] for t in texts.values()} == {" RAY_ADDRESS)",
                                                                      " RAY_ADDRESS, else a local Ray)"}
    assert not any(a.required for p in VERBS.values() for a in p._actions
                   if "--address" in a.option_strings)
