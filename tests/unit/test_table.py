"""The one table printer (ran.table) behind ran models, ran registry, ran jobs list and ran tune."""

from __future__ import annotations

import ast
from pathlib import Path

from ran.table import format_table


def test_columns_align_text_left_numbers_right_and_none_is_a_dash():
    text = format_table(["name", "n", "x"], [["a", 5, None], ["bbb", 12, 0.123456]], right=[1])
    assert text.splitlines() == ["name   n  x", "a      5  -", "bbb   12  0.1235"]


def test_a_free_last_column_does_not_widen_the_others():
    text = format_table(["id", "cmd"], [["a", "x" * 40], ["bb", "y"]], free_last=True)
    assert text.splitlines() == ["id  cmd", "a   " + "x" * 40, "bb  y"]


def test_no_other_module_pads_table_columns_itself():
    """The four printers of before (models, registry, jobs list, tune's top trials) use ran.table."""
    package = Path(__file__).resolve().parents[2] / "ran"
    padders = []
    for path in package.rglob("*.py"):
        if path.name in ("table.py", "bench.py"):  # bench's report is a fixed-width format of its own
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("ljust", "rjust"):
                padders.append(f"{path.relative_to(package)}:{node.lineno}")
    assert padders == [], padders
