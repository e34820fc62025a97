"""casam_core.cli_frame: one error line and one exit code for every command."""

from __future__ import annotations

import click
from click.testing import CliRunner

from casam_core.cli_frame import CasamCommand, CasamGroup
from casam_core.errors import InputError


@click.group(name="casam-demo", cls=CasamGroup)
def demo() -> None:
    pass


@demo.command()
@click.option("--n", type=click.IntRange(min=1), default=1)
@click.option("--what", default="ok")
def go(n: int, what: str) -> None:
    if what == "casam":
        raise InputError("image x.png does not exist\nsecond line")
    if what == "bug":
        raise ZeroDivisionError("division by zero")
    click.echo("fine")


def _run(*args: str):
    return CliRunner().invoke(demo, list(args))


def test_casam_errors_and_usage_errors_are_one_line_exit_2() -> None:
    for args in (["go", "--what", "casam"], ["go", "--n", "0"], ["go", "--nope"], ["nothing"]):
        result = _run(*args)
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("casam-demo: error: "), result.stderr


def test_a_bug_is_one_line_exit_1_and_debug_shows_the_traceback() -> None:
    result = _run("go", "--what", "bug")
    assert result.exit_code == 1
    assert "Traceback" not in result.output and "--debug" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    result = _run("go", "--what", "bug", "--debug")
    assert isinstance(result.exception, ZeroDivisionError)


def test_success_exits_0() -> None:
    result = _run("go")
    assert result.exit_code == 0 and result.stdout == "fine\n"


def test_a_plain_command_gets_the_frame_too() -> None:
    @click.command(name="casam-one", cls=CasamCommand)
    def one() -> None:
        raise InputError("bad")

    result = CliRunner().invoke(one, [])
    assert result.exit_code == 2 and result.stderr == "casam-one: error: bad\n"
