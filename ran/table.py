"""The one plain-text table of ran's commands (``ran models``, ``ran registry``, ``ran jobs list``,
``ran tune``'s top trials): columns two spaces apart, text left-aligned, numbers right-aligned."""

from __future__ import annotations

from typing import Any, Sequence


def cell(value: Any) -> str:
    """A value as a table shows it: ``-`` for None, 4 significant digits for a float."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_table(header: Sequence[str] | None, rows: Sequence[Sequence[Any]], *,
                 right: Sequence[int] = (), free_last: bool = False) -> str:
    """``header`` (None: no header line) and ``rows`` (values shown by :func:`cell`) as lines of
    aligned columns.

    ``right``: indices of right-aligned (numeric) columns; ``free_last``: the last column is not
    padded and does not widen the others (a long command line). Trailing spaces are stripped.
    """
    table = ([[str(h) for h in header]] if header is not None else []) + [[cell(v) for v in row]
                                                                         for row in rows]
    if not table:
        return ""
    columns = len(table[0])
    sized = columns - 1 if free_last else columns
    widths = [max(len(r[i]) for r in table) for i in range(sized)]
    lines = []
    for row in table:
        cells = [c.rjust(w) if i in right else c.ljust(w)
                 for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells + row[sized:]).rstrip())
    return "\n".join(lines)
