"""Tables that stay readable: boxed on a terminal, plain aligned text in CI logs and pipes.

A boxed table narrower than its content breaks cell text mid-name ("onnxruntim" / "e") at
80 columns; a log reader wants columns that ``grep`` and ``awk`` can read. So off a terminal
every cell is printed whole, columns padded to their widest cell.
"""

from __future__ import annotations

from typing import Sequence

from rich.console import Console
from rich.table import Table
from rich.text import Text

def print_table(console: Console, title: str, columns: Sequence[str], rows: Sequence[Sequence[str | Text]],
                *, right: Sequence[str] = ()) -> None:
    """Print ``rows`` under ``columns``.

    Args:
        console: Where to print; ``console.is_terminal`` picks boxed or plain.
        title: Printed above the table.
        columns: Header of each column.
        rows: One sequence of cells per row (``Text`` keeps its style on a terminal).
        right: Columns to right-align (numbers).
    """
    if console.is_terminal:
        table = Table(title=title)
        for i, col in enumerate(columns):
            # The first column names the row (a cell, a format): never broken mid-name.
            table.add_column(col, justify="right" if col in right else "left", no_wrap=i == 0,
                             overflow="ellipsis" if i == 0 else "fold")
        for row in rows:
            table.add_row(*[c if isinstance(c, Text) else Text(str(c)) for c in row])
        console.print(table)
        return
    plain = [[c.plain if isinstance(c, Text) else str(c) for c in row] for row in rows]
    widths = [max([len(col), *(len(r[i]) for r in plain)]) for i, col in enumerate(columns)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if col in right else c.ljust(w)
                         for c, w, col in zip(cells, widths, columns)).rstrip()

    console.print(Text(title), soft_wrap=True)
    console.print(Text(line(columns)), soft_wrap=True)
    console.print(Text(line(["-" * w for w in widths])), soft_wrap=True)
    for cells in plain:
        console.print(Text(line(cells)), soft_wrap=True)
