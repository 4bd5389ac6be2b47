"""``flask reqconn ...``: commands added to the app's CLI by ``init_app``.

- ``check``: connect, run ``select 1``, show the server settings that matter,
  and warn when the pools of all workers cannot fit in ``max_connections``;
- ``activity``: the app's sessions in ``pg_stat_activity`` by state, flagging
  long idle-in-transaction ones;
- ``storm``: the abort storm (:mod:`flask_reqconn.storm`), imported only when it runs or
  its help is shown, so serving workers never load it.
"""

from __future__ import annotations

import importlib
import os
import typing as t

import click
import psycopg
from flask import current_app
from flask.cli import AppGroup, with_appcontext
from psycopg.rows import tuple_row

from .netdefaults import conninfo_keys
from .sizing import ServerLimits, connections_problem
from .state import state_of

if t.TYPE_CHECKING:
    from .config import PoolSettings
    from .state import AppState

_SETTINGS = (
    "max_connections",
    "superuser_reserved_connections",
    "reserved_connections",
    "statement_timeout",
    "idle_in_transaction_session_timeout",
    "idle_session_timeout",
    "client_connection_check_interval",
)


def _state() -> AppState:
    return state_of(current_app)


def _connection(state: AppState) -> t.Any:
    return state.ext.connection(app=current_app)


@click.command("check")
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Worker processes sharing the database (default: $WEB_CONCURRENCY or 1).",
)
@click.option(
    "--others",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Connections other clients need at the same time (other apps, cron, admin).",
)
@with_appcontext
def check_command(workers: int | None, others: int) -> None:
    """Connect, run select 1, and check the pools fit their servers."""
    state = _state()
    if workers is None:
        workers = int(os.environ.get("WEB_CONCURRENCY", "1") or 1)
    servers: dict[tuple[str, str, str], list[str]] = {}
    for name, holder in state.pools.items():
        servers.setdefault(_server_key(holder.settings.conninfo), []).append(name)
    problems: list[str] = []
    for names in servers.values():
        if len(servers) > 1:
            click.echo(f"-- pools {', '.join(names)}")
        problems += _check_server(state, names, workers, others)
    for problem in problems:
        click.secho(f"WARNING: {problem}", fg="yellow", err=True)
    if problems:
        raise SystemExit(1)
    click.echo("ok")


def _server_key(conninfo: str) -> tuple[str, str, str]:
    from psycopg.conninfo import conninfo_to_dict

    params = conninfo_to_dict(conninfo)
    host, port, hostaddr = (str(params.get(k, "")) for k in ("host", "port", "hostaddr"))
    return host, port, hostaddr


def _check_connect_args(settings: PoolSettings) -> dict[str, t.Any]:
    """The pool's connect arguments for the check's own connection (tuple rows).

    A ``connect_timeout`` of the conninfo or of ``REQCONN_CONNECT_ARGS`` (or added by
    ``REQCONN_TCP_DEFAULTS``) is kept; without one the wait is bounded by
    ``REQCONN_TIMEOUT``, between 1 and 10 seconds.
    """
    kwargs = {k: v for k, v in settings.connect_args.items() if k != "row_factory"}
    if "connect_timeout" not in kwargs and "connect_timeout" not in conninfo_keys(
        settings.conninfo
    ):
        kwargs["connect_timeout"] = max(1, min(10, int(settings.timeout)))
    return kwargs


def _check_server(state: AppState, names: list[str], workers: int, others: int) -> list[str]:
    """Check one server shared by the pools *names*; return the problems found."""
    settings = state.pools[names[0]].settings
    click.echo(f"conninfo:        {settings.safe_conninfo}")
    try:
        # a direct connection, not the pool: a refused or failed login shows
        # its own error instead of a pool timeout
        with psycopg.connect(settings.conninfo, **_check_connect_args(settings)) as conn:
            conn.execute("select 1")
            version = conn.info.server_version
            rows = conn.execute(
                "select name, setting, unit from pg_settings where name = any(%s)",
                (list(_SETTINGS),),
            ).fetchall()
            row = conn.execute("select count(*) from pg_stat_activity").fetchone()
            in_use = row[0] if row else 0
    except Exception as exc:
        from .redact import conninfo_passwords, scrub_secrets

        secrets = conninfo_passwords(settings.conninfo, settings.connect_args)
        reason = scrub_secrets(str(exc), secrets)
        raise click.ClickException(
            f"cannot connect or query: {type(exc).__name__}: {reason}"
        ) from None
    values = {name: (setting, unit) for name, setting, unit in rows}
    click.echo(f"server version:  {version // 10000}.{version % 10000}")
    for name in _SETTINGS:
        if name in values:
            setting, unit = values[name]
            shown = f"{setting}{unit or ''}" if setting != "0" else "0 (off)"
            click.echo(f"{name + ':':<38}{shown}")
    max_connections = int(values["max_connections"][0])
    reserved = sum(
        int(values[name][0])
        for name in ("superuser_reserved_connections", "reserved_connections")
        if name in values
    )
    usable = max_connections - reserved
    pool_total = sum(state.pools[name].settings.max_size for name in names)
    needed = workers * pool_total + others
    click.echo(
        f"pool:            max_size {pool_total} x {workers} worker(s)"
        f" + {others} other = {needed} of {usable} usable connections"
        f" ({in_use} in use now)"
    )
    problems = []
    if settings.pgbouncer:
        click.echo(
            "note: behind pgbouncer (REQCONN_PGBOUNCER): the figures above are the server's;"
            " the pools count against pgbouncer's max_client_conn, and its"
            " default_pool_size x databases/users against max_connections"
        )
    elif problem := connections_problem(
        ServerLimits(max_connections, reserved), pool_total, workers=workers, others=others
    ):
        problems.append(problem)
    for name in ("idle_in_transaction_session_timeout",):
        if values.get(name, ("0", None))[0] == "0":
            click.echo(
                f"note: {name} is off: a worker killed mid-transaction keeps its session"
                " until TCP notices; consider REQCONN_SESSION_SETTINGS"
            )
    return problems


@click.command("activity")
@click.option(
    "--idle-threshold",
    type=click.FloatRange(min=0),
    default=5.0,
    show_default=True,
    help="Flag sessions idle in transaction for longer than this many seconds.",
)
@with_appcontext
def activity_command(idle_threshold: float) -> None:
    """Show the app's sessions in pg_stat_activity, grouped by state."""
    state = _state()
    appname = state.pools["default"].settings.application_name
    with _connection(state) as conn:
        # tuple rows whatever REQCONN_CONNECT_ARGS["row_factory"] says
        rows = conn.cursor(row_factory=tuple_row).execute(
            """
            select pid, coalesce(state, '?'), coalesce(extract(epoch from now() - xact_start), 0),
                   coalesce(extract(epoch from now() - state_change), 0), left(query, 80)
            from pg_stat_activity
            where application_name = %s and pid <> pg_backend_pid()
            order by pid
            """,
            (appname,),
        ).fetchall()
    by_state: dict[str, int] = {}
    for _, session_state, *_rest in rows:
        by_state[session_state] = by_state.get(session_state, 0) + 1
    click.echo(f"application_name {appname!r}: {len(rows)} session(s)")
    for session_state, count in sorted(by_state.items()):
        click.echo(f"  {session_state:<32}{count}")
    flagged = [
        row for row in rows if row[1].startswith("idle in transaction") and row[3] > idle_threshold
    ]
    for pid, session_state, xact_age, state_age, query in flagged:
        click.secho(
            f"WARNING: pid {pid} {session_state} for {state_age:.1f} s"
            f" (transaction open {xact_age:.1f} s); last query: {query}",
            fg="yellow",
        )


class ReqConnGroup(AppGroup):
    """The ``reqconn`` group: its own commands, and lazy ones imported only when used.

    A lazy command's module is imported when the command runs or its help is shown
    (:meth:`get_command`); the group's own ``--help`` lists it by its short help alone.
    """

    #: name -> (module, attribute, short help) of each lazy command.
    lazy_commands: t.ClassVar[dict[str, tuple[str, str, str]]] = {
        "storm": (
            "flask_reqconn.storm.cli",
            "storm_command",
            "Abort storm: check the app survives clients that hang up.",
        ),
    }

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy_commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in self.lazy_commands:
            module, attribute, _short_help = self.lazy_commands[cmd_name]
            command = getattr(importlib.import_module(module), attribute)
            self.add_command(command, cmd_name)
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        names = self.list_commands(ctx)
        if not names:
            return
        limit = formatter.width - 6 - max(len(name) for name in names)
        rows = []
        for name in names:
            command = self.commands.get(name)
            if command is None:
                rows.append((name, self.lazy_commands[name][2]))
            elif not command.hidden:
                rows.append((name, command.get_short_help_str(limit)))
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def make_cli() -> AppGroup:
    """Build the ``reqconn`` command group (one per app, no import-time state)."""
    group = ReqConnGroup("reqconn", help="flask-reqconn: pool checks and leak hunting.")
    group.add_command(check_command)
    group.add_command(activity_command)
    return group
