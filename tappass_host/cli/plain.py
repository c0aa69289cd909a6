"""Commands declared once, as tables: click builds its commands from them,
and the plain parser reads the hot commands' common forms from them without
importing click (issue 13: click is half of what `status` costs).

The plain parser only takes what it reads exactly as click would (options by
their full names, `--opt=VALUE`, values that convert); anything else
(`--help`, an unknown option, a bad value, a missing argument) is left to
click, so help and usage errors come from one place."""

import os
import sys
from collections import namedtuple
from pathlib import Path

# collections.namedtuple, not typing.NamedTuple: `typing` alone costs a hot
# command a tenth of its instructions (issue 13).
# flags: e.g. ("-f", "--follow"); kind: None for a flag, else the value's type
# (str, int, float, or Path for a file).
Option = namedtuple("Option", "flags dest help kind default metavar show_default",
                    defaults=(str, None, None, False))
# run(host, **values), its docstring the help; arguments: ((dest, required), ...)
Command = namedtuple("Command", "name run arguments options hidden", defaults=((), False))


def echo(text: str, err: bool = False) -> None:
    """click.echo(text) without importing click where the result is the same:
    click strips ANSI escapes off a stream that is not a terminal and re-wraps
    a stream whose encoding is ASCII; such text goes through click itself."""
    stream = sys.stderr if err else sys.stdout
    encoding = getattr(stream, "encoding", None) or "ascii"
    if "\x1b" in text or not (text.isascii() or encoding.lower().replace("-", "") != "ascii"):
        import click

        click.echo(text, err=err)
        return
    stream.write(text + "\n")
    stream.flush()


def parse_options(args: list[str], options: tuple, values: dict,
                  up_to_name: bool = False) -> list[str] | None:
    """Set `values[dest]` for each of `options` in `args` (the last one given
    wins, as in click); return the other arguments, or None for anything the
    plain parser does not read exactly as click. `up_to_name`: stop at the
    first argument that is not an option (a command's name) and return it
    with everything after it."""
    by_flag = {flag: option for option in options for flag in option.flags}
    rest = []
    args = list(args)
    while args:
        arg = args.pop(0)
        if arg == "--" or arg == "-":
            return None
        if not arg.startswith("-"):
            rest.append(arg)
            if up_to_name:
                return rest + args
            continue
        flag, equals, value = arg.partition("=")
        option = by_flag.get(flag)
        if option is None or (equals and not flag.startswith("--")):
            return None
        if option.kind is None:
            if equals:
                return None
            values[option.dest] = True
            continue
        if not equals:
            if not args or args[0].startswith("-"):
                return None
            value = args.pop(0)
        if not value:
            return None
        if option.kind is Path and os.path.exists(value) and (
                os.path.isdir(value) or not os.access(value, os.R_OK)):
            return None  # click.Path(dir_okay=False) says why
        try:
            values[option.dest] = option.kind(value)
        except ValueError:
            return None
    return rest


def parse(command: Command, args: list[str], common: tuple) -> dict | None:
    """The values `command` gets from `args` (after its name), its own options'
    and `common`'s; None: leave it to click."""
    values = {option.dest: option.default if option.kind else False for option in command.options}
    given = {}
    rest = parse_options(args, command.options + common, given)
    if rest is None or len(rest) > len(command.arguments):
        return None
    for (dest, required), value in zip(command.arguments, rest + [None] * len(command.arguments)):
        if value is None and required:
            return None
        values[dest] = value
    return {**values, **given}


def click_options(options: tuple, **extra) -> list:
    """`options` as click options (`extra`: more keywords for each)."""
    import click

    return [click.Option(
        [*option.flags, option.dest], is_flag=option.kind is None, help=option.help,
        metavar=option.metavar, show_default=option.show_default,
        **({"default": option.default} if option.default is not None else {}),
        **({"type": click.Path(dir_okay=False, path_type=Path) if option.kind is Path
            else option.kind} if option.kind not in (None, str) else {}),
        **extra) for option in options]


def click_command(command: Command, pass_host):
    """`command` as a click command whose callback gets the invocation's Host."""
    import click

    return click.Command(
        command.name, callback=pass_host(command.run), help=command.run.__doc__,
        hidden=command.hidden,
        params=[click.Argument([dest], required=required) for dest, required in command.arguments]
        + click_options(command.options))
