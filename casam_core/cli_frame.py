"""The one CLI frame every casam command runs in: one error line, one exit code.

At the edge the person reading an error is rarely the one who can read Python, so every
command (``casam-train``, ``casam-export``, ``casam-infer``, ``casam-serve``) ends the same way:

- a ``CasamError`` or a click usage error → ``casam-<cmd>: error: <one line>``, exit 2;
- Ctrl-C → ``casam-<cmd>: error: interrupted``, exit 130;
- anything else (a bug) → one line naming the exception and ``--debug``, exit 1. With
  ``--debug`` the traceback is printed instead. The test suite never reaches this branch.

Use ``cls=CasamCommand`` on ``@click.command`` or ``cls=CasamGroup`` on ``@click.group``
(its subcommands get ``CasamCommand`` too).
"""

from __future__ import annotations

import sys
from typing import Any, NoReturn, Optional

import click

from casam_core.errors import CasamError

_debug = False


def _set_debug(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    global _debug
    _debug = _debug or bool(value)


def _debug_option() -> click.Option:
    return click.Option(["--debug"], is_flag=True, expose_value=False, is_eager=True, callback=_set_debug,
                        help="On an unexpected internal error, print the Python traceback instead of one line.")


def one_line(message: Any) -> str:
    """A message on one line: newlines (a library's multi-line text) become '; '."""
    return "; ".join(part.strip() for part in str(message).splitlines() if part.strip()) or "unknown error"


def fail(prog: str, message: Any, code: int = 2) -> NoReturn:
    """Print ``prog: error: message`` on stderr and exit with ``code``."""
    click.echo(f"{prog}: error: {one_line(message)}", err=True)
    sys.exit(code)


def _prog(name: Optional[str], prog_name: Optional[str]) -> str:
    """The command's own name (``casam-infer``) wins over how it was invoked (a test runner
    calls it by its function's name)."""
    if name and name.startswith("casam"):
        return name
    return prog_name or name or "casam"


class _Frame:
    """The ``main`` shared by ``CasamCommand`` and ``CasamGroup`` (mixed in first)."""

    def main(self, args: Optional[Any] = None, prog_name: Optional[str] = None, **extra: Any) -> Any:  # type: ignore[override]
        prog = _prog(self.name, prog_name)  # type: ignore[attr-defined]
        global _debug
        _debug = False  # set again by --debug's callback while parsing
        standalone = extra.get("standalone_mode", True)  # False: a caller (a bench loop) wants a return
        extra["standalone_mode"] = False
        try:
            result = super().main(args, prog_name, **extra)  # type: ignore[misc]
        except click.exceptions.Abort:
            fail(prog, "interrupted", 130)
        except click.ClickException as exc:  # usage errors, bad option values, missing files
            fail(prog, exc.format_message(), exc.exit_code if exc.exit_code else 2)
        except CasamError as exc:
            fail(prog, exc, 2)
        except KeyboardInterrupt:
            fail(prog, "interrupted", 130)
        except Exception as exc:  # a bug: one line, not a traceback, unless --debug
            if _debug:
                raise
            fail(prog, f"internal error ({type(exc).__name__}: {one_line(exc)}); rerun with --debug for the "
                       "traceback and report it", 1)
        if not standalone:
            return result
        sys.exit(result if isinstance(result, int) else 0)


class CasamCommand(_Frame, click.Command):
    """A click command with casam's error frame and a ``--debug`` flag."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not any(p.name == "debug" for p in self.params):
            self.params.append(_debug_option())


class CasamGroup(_Frame, click.Group):
    """A click group with casam's error frame; its subcommands are ``CasamCommand``s."""

    command_class = CasamCommand

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not any(p.name == "debug" for p in self.params):
            self.params.append(_debug_option())
