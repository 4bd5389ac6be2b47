"""The storm's command line: one click command for ``flask reqconn storm`` and
``python -m flask_reqconn.storm``.

Its options are made from :class:`StormConfig`'s fields (defaults included), so the two
entry points and the Python API cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

import click

from .config import ABORT_STYLES, MAX_SECONDS, STALL_STYLES, StormConfig, StormError
from .phases import run_storm
from .report import format_report, result_json
from .results import Progress

#: The program name shown by ``python -m flask_reqconn.storm``.
PROG = "python -m flask_reqconn.storm"

#: Exit status when interrupted (Ctrl-C), as a shell reports SIGINT.
EXIT_INTERRUPTED = 130

_DESCRIPTION = (
    "Abort storm against URL, a running app on this machine: normal load, then aborted load,"
    " then (with --abort-styles stalled) clients that stall while probes must keep getting"
    " 2xx, then a health check and a final load that must all be 2xx and, with a leak"
    " oracle, zero connections left checked out. Exit status: 0 ok, 1 failed, 2 usage error."
)
#: The --abort-styles word for every stall style that applies.
STALLED = "stalled"


class ProgressPrinter:
    """A bar per phase on a terminal; otherwise one line per phase start and finish."""

    def __init__(self, stream: TextIO, tty: bool) -> None:
        self.stream = stream
        self.tty = tty
        self.last_draw = 0.0
        self.phase_began: dict[str, float] = {}

    def __call__(self, event: Progress) -> None:
        now = time.monotonic()
        if event.done == 0 and not event.finished:
            self.phase_began[event.phase] = now
        elapsed = now - self.phase_began.get(event.phase, now)
        count = f"{event.done}/{event.total}" if event.total else ""
        if not self.tty:
            if event.finished:
                line = f"storm: {event.phase} finished {count} in {elapsed:.1f} s"
            elif event.done == 0:
                line = f"storm: {event.phase} started"
                if event.total:
                    line += f" ({event.total} request{'s' if event.total != 1 else ''})"
            else:
                return
            self.stream.write(" ".join(line.split()) + "\n")
            self.stream.flush()
            return
        if not event.finished and event.done and now - self.last_draw < 0.1:
            return
        self.last_draw = now
        width = 30
        filled = width * event.done // event.total if event.total else 0
        bar = ("#" * filled + "." * (width - filled)) if event.total else " " * width
        end = f" {elapsed:.1f} s\n" if event.finished else ""
        self.stream.write(f"\r{event.phase:<7}[{bar}] {count}{end}")
        self.stream.flush()


# (section, config field, type or None for a string, help): the options taken from
# StormConfig, in the order --help shows them.
_OPTIONS: tuple[tuple[str, str, type[int] | type[float] | None, str], ...] = (
    ("normal load", "normal_count", int, "requests"),
    ("normal load", "normal_concurrency", int, "client threads"),
    ("normal load", "normal_timeout", float, "seconds per request"),
    ("aborted load", "abort_count", int, "requests the client drops"),
    ("aborted load", "abort_concurrency", int, "client threads"),
    ("aborted load", "abort_timeout", float, "seconds per abort (connect, send, first chunk)"),
    ("aborted load", "abort_delay", float, "seconds before closing in the 'delay' style"),
    ("aborted load", "stream_path", None,
     "streamed URL or path for the 'stream' and 'stop-reading' styles"),
    ("aborted load", "body_path", None,
     "URL or path the body styles POST to (default: the target URL)"),
    ("aborted load", "body_size", int, "Content-Length the body styles announce"),
    ("aborted load", "body_interval", float,
     "seconds between the bytes of 'slow-body', and before 'body-reset' resets"),
    ("stalled clients", "stall_count", int, "clients that stall, all at once"),
    ("stalled clients", "stall_seconds", float, "how long they stay"),
    ("stalled clients", "probe_interval", float, "pause between probes of the target URL"),
    ("stalled clients", "probe_timeout", float,
     "seconds per probe (above the app's pool timeout)"),
    ("stalled clients", "pool_size", int,
     "the app's pool size (default: pool_max in the stats JSON)"),
    ("drain", "drain_pause", float, "seconds to wait after the aborts without a leak oracle"),
    ("drain", "drain_timeout", float, "longest wait for the oracle to read 0 (twice)"),
    ("health check", "health_path", None, "URL or path (default: the target URL)"),
    ("health check", "health_timeout", float, "seconds it may take"),
    ("final load (must be all 2xx)", "final_count", int, "requests"),
    ("final load (must be all 2xx)", "final_concurrency", int, "client threads"),
    ("final load (must be all 2xx)", "final_timeout", float, "seconds per request"),
    ("leak oracle", "stats_url", None, "URL or path of a JSON stats endpoint"),
    ("leak oracle", "stats_key", None, "dotted key of the checked-out count"),
    ("leak oracle", "dsn", None, "PostgreSQL conninfo (password via PGPASSWORD or .pgpass)"),
    ("leak oracle", "application_name", None, "application_name of the app's sessions"),
    ("limits", "max_seconds", float, f"deadline for the whole storm (at most {MAX_SECONDS:g})"),
)
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(StormConfig)}
_OTHER = "requests and output"


def _parse_header(_ctx: click.Context, _param: click.Parameter, value: Any) -> Any:
    headers = []
    for text in value:
        name, sep, rest = text.partition(":")
        if not sep or not name.strip():
            raise click.BadParameter(f"expected 'Name: value', got {text!r}")
        headers.append((name.strip(), rest.strip()))
    return tuple(headers)


def _parse_styles(_ctx: click.Context, _param: click.Parameter, value: Any) -> Any:
    if value is None:
        return ()
    styles = tuple(s.strip() for s in value.split(",") if s.strip())
    if not styles or any(s not in (*ABORT_STYLES, STALLED) for s in styles):
        raise click.BadParameter(
            f"choose a comma-separated subset of {','.join(ABORT_STYLES)} ({STALLED}: every"
            " stall style that applies)"
        )
    return styles


def _expand_styles(styles: tuple[str, ...], stream_path: str | None) -> tuple[str, ...]:
    """``stalled`` -> the stall styles (``stop-reading`` only with a stream path)."""
    out: list[str] = []
    for style in styles:
        chosen = [
            s for s in STALL_STYLES if s != "stop-reading" or stream_path
        ] if style == STALLED else [style]  # fmt: skip
        out.extend(s for s in chosen if s not in out)
    return tuple(out)


def _params() -> tuple[list[click.Parameter], dict[str, str]]:
    """The command's parameters and the --help section of each option."""
    params: list[click.Parameter] = [click.Argument(["url"])]
    sections: dict[str, str] = {}

    def add(section: str, option: click.Option) -> None:
        params.append(option)
        sections[option.name or ""] = section

    for section, name, kind, help_text in _OPTIONS:
        if kind is None:
            metavar = name.rsplit("_", 1)[-1].upper()
        else:
            metavar = "N" if kind is int else "SECONDS"
        default = _DEFAULTS[name]
        add(section, click.Option(
            ["--" + name.replace("_", "-"), name], type=kind or str, default=default,
            metavar=metavar, help=help_text, show_default=default is not None,
        ))
        if name == "abort_delay":
            add(section, click.Option(
                ["--abort-styles", "abort_styles"], metavar="STYLES", callback=_parse_styles,
                help=f"comma-separated subset of {','.join(ABORT_STYLES)}, or {STALLED}"
                " for every stall style that applies  [default: close,delay,rst and, with"
                " --stream-path, stream]",
            ))
        if name == "health_timeout":
            add(section, click.Option(
                ["--early-stop/--no-early-stop", "early_stop"], default=True,
                help="when the health check gets no answer (server dead or hung), give the"
                " verdict at once without the final load  [default: early stop]",
            ))
    add(_OTHER, click.Option(
        ["-H", "--header", "headers"], multiple=True, metavar="'NAME: VALUE'",
        callback=_parse_header, help="extra request header (repeatable)",
    ))
    add(_OTHER, click.Option(
        ["--allow-remote", "allow_remote"], is_flag=True,
        help="allow a target that is not loopback (only for servers you operate)",
    ))
    add(_OTHER, click.Option(["-q", "--quiet", "quiet"], is_flag=True, help="no progress output"))
    add(_OTHER, click.Option(["--json", "as_json"], is_flag=True, help="print the result as JSON"))
    return params, sections


class _StormCommand(click.Command):
    """A command whose --help lists its options in sections, as the storm's phases go."""

    def __init__(self, sections: dict[str, str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sections = sections

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        grouped: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            if not isinstance(param, click.Option):
                continue
            record = param.get_help_record(ctx)
            if record is not None:
                section = self.sections.get(param.name or "", _OTHER)
                grouped.setdefault(section, []).append(record)
        for section, records in grouped.items():
            with formatter.section(section.capitalize()):
                formatter.write_dl(records)


def _storm(*, quiet: bool, as_json: bool, **values: Any) -> None:
    ctx = click.get_current_context()
    values["abort_styles"] = _expand_styles(values["abort_styles"], values["stream_path"])
    try:
        config = StormConfig(**values)
    except ValueError as exc:
        raise click.UsageError(str(exc), ctx) from None
    progress = None if quiet else ProgressPrinter(sys.stderr, sys.stderr.isatty())
    try:
        result = run_storm(config, progress=progress)
    except StormError as exc:
        click.echo(f"{ctx.command_path}: error: {exc}", err=True)
        ctx.exit(2)
    except KeyboardInterrupt:
        click.echo(f"{ctx.command_path}: interrupted", err=True)
        ctx.exit(EXIT_INTERRUPTED)
    if as_json:
        click.echo(json.dumps(result_json(result), indent=2))
    else:
        click.echo(format_report(result))
    ctx.exit(0 if result.ok else 1)


def _make_command() -> click.Command:
    params, sections = _params()
    return _StormCommand(
        sections,
        name="storm",
        params=params,
        callback=_storm,
        help=_DESCRIPTION,
        short_help="Abort storm: check the app survives clients that hang up.",
        context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    )


#: The ``storm`` command, as ``flask reqconn storm`` and ``python -m flask_reqconn.storm``
#: run it.
storm_command = _make_command()


def make_storm_command() -> click.Command:
    """The storm's ``click.Command``, to add to a click group of your own.

    ``flask reqconn storm`` is this command; ``python -m flask_reqconn.storm`` runs it
    through :func:`main`. Both take the same options and exit with the same statuses.

    .. versionadded:: 0.1
    """
    return storm_command


def main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    """Command-line entry point: ``python -m flask_reqconn.storm URL [options]``.

    :param argv: arguments without the program name (default: ``sys.argv[1:]``).
    :param prog: program name shown in help and errors.
    :return: 0 if the verdict is ok, 1 if not, 2 for usage errors (130 if interrupted).

    .. versionadded:: 0.1
    """
    try:
        status = storm_command.main(
            list(argv) if argv is not None else None,
            prog_name=prog or PROG,
            standalone_mode=False,
        )
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.Abort:
        click.echo(f"{prog or PROG}: interrupted", err=True)
        return EXIT_INTERRUPTED
    return status if isinstance(status, int) else 0
