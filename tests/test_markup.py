"""Square brackets are text on every message path (issue 12 item 8): a property test over every
error class, the CLI's error printer and the tables, with generated bracket-heavy values."""

from __future__ import annotations

import io

from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

import packager.cli as cli
from packager import errors
from packager.tables import print_table

#: Text full of what rich would parse as markup: tags, closing tags, escapes, links.
BRACKETY = st.lists(st.sampled_from(["[/x]", "[bold]", "[/]", "[link=file:///etc]", "\\[", "[red on blue]", "[",
                                      "]", "a", " ", "=", ":"]), min_size=1, max_size=8).map("".join)


def _all_errors() -> list[type[errors.PackagerError]]:
    found, todo = [], [errors.PackagerError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


ERRORS = _all_errors()


def _console(markup: bool = False) -> tuple[Console, io.StringIO]:
    """A console configured like the CLI's (``markup`` on: stricter than the CLI)."""
    buffer = io.StringIO()
    return Console(file=buffer, markup=markup, highlight=False, width=10_000, color_system=None), buffer


@settings(max_examples=60, deadline=None)
@given(cls=st.sampled_from(ERRORS), subject=BRACKETY, got=BRACKETY, fix=BRACKETY)
def test_every_error_prints_its_values_verbatim(cls, subject: str, got: str, fix: str) -> None:
    console, buffer = _console(markup=True)  # the printer must not rely on markup being off
    original = cli.err
    cli.err = console
    try:
        exc = cls(subject, "is wrong", expected="x", got=got, fix=fix)
        code = cli._report(exc, debug=False)
    finally:
        cli.err = original
    # Rendering never fails: a MarkupError would surface as exit 1 (fidelity) or 70.
    assert code == int(exc.exit_code) != int(errors.ExitCode.INTERNAL)
    assert buffer.getvalue() == f"error {exc.message}\n"
    for value in (subject, got, fix):
        assert value in buffer.getvalue()


@settings(max_examples=40, deadline=None)
@given(title=BRACKETY, cells=st.lists(BRACKETY, min_size=2, max_size=2), terminal=st.booleans())
def test_tables_print_cells_verbatim(title: str, cells: list[str], terminal: bool) -> None:
    console, buffer = _console()
    console._force_terminal = terminal  # boxed on a terminal, plain aligned text elsewhere
    print_table(console, title, ["name", "value"], [cells])
    text = buffer.getvalue()
    for value in cells:
        assert value.strip() in text  # trailing blanks of the last column are trimmed
