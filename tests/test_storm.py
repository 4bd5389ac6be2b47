"""The abort-storm tool against real server subprocesses (tests/apps/stormtarget.py)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import psycopg
import pytest
from click.testing import CliRunner

from flask_reqconn.storm import (
    MAX_REQUESTS_PER_PHASE,
    Progress,
    StormConfig,
    StormError,
    StormResult,
    format_report,
    main,
    make_storm_command,
    run_storm,
)
from flask_reqconn.storm.cli import ProgressPrinter
from flask_reqconn.storm.client import resolve
from flask_reqconn.storm.report import result_json
from flask_reqconn.testing.servers import ORPHAN_STOP
from flask_reqconn.testing.watchdog import shared_watchdog

REPO = Path(__file__).resolve().parent.parent
APP = "tests.apps.stormtarget"

# Small storms: the whole module should stay well under a minute on two cores.
SMALL: dict[str, Any] = {
    "normal_count": 10,
    "normal_concurrency": 4,
    "abort_count": 16,
    "abort_concurrency": 8,
    "final_count": 8,
    "final_concurrency": 4,
    "drain_pause": 0.2,
    "drain_timeout": 5.0,
    "max_seconds": 60.0,
}


# -- a private server helper (start in a new session, stop by PID) ---------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGCONT)  # a test may have frozen the group
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # the group: gunicorn workers included
    proc.wait(timeout=5)


@contextlib.contextmanager
def _serve(kind: str, log_dir: Path, env: dict[str, str] | None = None) -> Iterator[str]:
    with _serve_process(kind, log_dir, env) as (url, _proc):
        yield url


@contextlib.contextmanager
def _serve_process(
    kind: str, log_dir: Path, env: dict[str, str] | None = None
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Serve the storm target; yield its URL and its process (the leader of its group)."""
    port = _free_port()
    if kind == "werkzeug":
        argv = [
            sys.executable, "-m", "flask", "--app", APP, "run", "--host", "127.0.0.1",
            "--port", str(port), "--no-reload", "--no-debugger", "--with-threads",
        ]
    elif kind == "gunicorn":
        argv = [
            sys.executable, "-m", "gunicorn", "-b", f"127.0.0.1:{port}", "-w", "1",
            "-k", "gthread", "--threads", "16", "--graceful-timeout", "2", f"{APP}:app",
        ]
    else:
        raise ValueError(kind)
    child_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    child_env.pop("FLASK_APP", None)
    log_path = log_dir / f"{kind}-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            argv, cwd=REPO, env=child_env, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
    # in a session of its own, as the kit's servers: the watchdog stops it if pytest dies
    guard = shared_watchdog().stop_group(proc.pid, "python", ORPHAN_STOP)
    try:
        deadline = time.monotonic() + 20
        while not _accepts(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{kind} did not start:\n{log_path.read_text()}")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}", proc
    finally:
        _stop(proc)
        shared_watchdog().forget(guard)


def _get_json(url: str) -> Any:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=10) as response:
        return json.load(response)


def _wait_for_hits(base: str, key: str, at_least: int) -> dict[str, int]:
    """Poll /hits until ``key`` reaches ``at_least`` (hang guard 10 s); return the last."""
    deadline = time.monotonic() + 10
    while True:
        hits: dict[str, int] = _get_json(base + "/hits")
        if hits.get(key, 0) >= at_least or time.monotonic() > deadline:
            return hits
        time.sleep(0.05)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A healthy werkzeug dev server shared by the tests that do not need fresh counters."""
    with _serve("werkzeug", tmp_path_factory.mktemp("storm-logs")) as url:
        yield url


@pytest.fixture
def fresh_server(tmp_path: Path) -> Iterator[str]:
    with _serve("werkzeug", tmp_path) as url:
        yield url


# -- verdicts against real servers -------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["werkzeug", "gunicorn"])
def test_healthy_app_gets_ok_verdict_with_every_abort_style(kind: str, tmp_path: Path) -> None:
    events: list[Progress] = []
    with _serve(kind, tmp_path) as base:
        before = _get_json(base + "/hits").get("stream_dropped", 0)
        config = StormConfig(
            base + "/slow", stream_path="/stream", stats_url="/stats", **SMALL
        )
        result = run_storm(config, progress=events.append)
        hits = _wait_for_hits(base, "stream_dropped", before + 4)

    assert result.ok, format_report(result)
    assert result.verdict.startswith("OK:")
    assert result.normal.statuses == {200: 10}
    assert result.abort.styles == {"close": 4, "delay": 4, "rst": 4, "stream": 4}
    assert result.abort.aborted == 16 and result.abort.error_count == 0
    assert result.abort.statuses == {200: 4}  # what the stream style saw before dropping
    assert result.health.statuses == {200: 1}
    assert result.final.all_ok and result.final.error_count == 0
    (reading,) = result.leaks
    assert (reading.source, reading.before, reading.after_drain, reading.at_end) == (
        "stats", 0, 0, 0,
    )
    # The streamed responses really were dropped mid-way: the generator saw GeneratorExit.
    assert hits["stream_dropped"] >= before + 4
    # Progress: every phase starts (done == 0) and finishes exactly once, in order.
    starts = [e.phase for e in events if e.done == 0 and not e.finished]
    finishes = [e.phase for e in events if e.finished]
    assert starts == finishes == ["normal", "abort", "drain", "health", "final", "settle"]
    assert [e.done for e in events if e.phase == "final" and not e.finished] == list(range(9))


@pytest.mark.slow
def test_constant_checked_out_in_stats_fails_the_verdict(tmp_path: Path) -> None:
    with _serve("werkzeug", tmp_path, env={"STORMTARGET_CHECKED_OUT": "2"}) as base:
        config = StormConfig(
            base + "/", stats_url=base + "/stats", **{**SMALL, "drain_timeout": 0.5}
        )
        result = run_storm(config)

    assert not result.ok
    assert result.health.all_ok and result.final.all_ok  # the app answers; it leaks
    (reading,) = result.leaks
    assert (reading.before, reading.after_drain, reading.at_end) == (2, 2, 2)
    assert result.verdict.startswith("FAIL:")
    assert "checked_out = 2 after the drain" in result.verdict
    assert "checked_out = 2 after the final load" in result.verdict
    assert format_report(result).splitlines()[-1] == f"verdict: {result.verdict}"


@pytest.mark.slow
def test_requests_that_leak_fail_the_verdict_with_nested_stats(fresh_server: str) -> None:
    config = StormConfig(
        fresh_server + "/leak", stats_url="/stats?nested=1",
        **{**SMALL, "drain_timeout": 0.5},
    )
    result = run_storm(config)

    assert not result.ok
    (reading,) = result.leaks
    assert reading.before == 0
    assert reading.after_drain is not None and reading.after_drain >= 10
    # Aborted requests run the view too: the leak can only grow.
    assert reading.at_end is not None and reading.at_end >= reading.after_drain + 9
    assert "after the drain" in result.verdict


@pytest.mark.slow
@pytest.mark.parametrize(
    ("style", "seen_by_server"),
    [("rst", "probe_reset"), ("delay", "probe_eof"), ("close", "probe_eof")],
)
def test_abort_styles_really_abort_and_the_server_still_answers(
    server: str, style: str, seen_by_server: str
) -> None:
    before = _get_json(server + "/hits").get(seen_by_server, 0)
    config = StormConfig(
        server + "/probe", abort_styles=(style,),
        **{**SMALL, "normal_count": 0, "abort_count": 6, "final_count": 3},
    )
    result = run_storm(config)
    hits = _wait_for_hits(server, seen_by_server, before + 6)

    assert result.abort.aborted == 6 and result.abort.error_count == 0
    # /probe peeks at the client socket 0.2 s in: RST -> ConnectionResetError, FIN -> b"".
    assert hits[seen_by_server] - before == 6
    assert result.health.all_ok and result.final.all_ok, format_report(result)
    assert result.ok


@pytest.mark.slow
def test_pg_stat_activity_oracle_sees_a_session_left_in_transaction(
    server: str, pg_dsn: str
) -> None:
    name = f"storm-test-{os.getpid()}"
    config = StormConfig(
        server + "/", dsn=pg_dsn, application_name=name,
        **{**SMALL, "normal_count": 2, "abort_count": 3, "final_count": 2, "drain_timeout": 0.5},
    )
    with psycopg.connect(pg_dsn, application_name=name) as victim:
        victim.execute("SELECT 1")  # opens a transaction: "idle in transaction"
        leaking = run_storm(config)
        victim.rollback()
        clean = run_storm(config)

    (reading,) = leaking.leaks
    assert (reading.source, reading.before, reading.after_drain, reading.at_end) == (
        "pg", 1, 1, 1,
    )
    assert not leaking.ok and "non-idle sessions = 1" in leaking.verdict
    assert clean.ok, format_report(clean)
    assert [(r.after_drain, r.at_end) for r in clean.leaks] == [(0, 0)]


@pytest.mark.slow
def test_dead_target_fails_with_socket_errors_not_statuses(tmp_path: Path) -> None:
    port = _free_port()  # nothing listens there
    config = StormConfig(
        f"http://127.0.0.1:{port}/", early_stop=False,  # the full run, final load included
        **{**SMALL, "normal_count": 3, "final_count": 3},
    )
    result = run_storm(config)

    assert not result.ok
    assert result.stopped_early is None and result.final.requests == 3
    assert result.final.statuses == {}
    assert result.final.errors == {"ERR:ConnectionRefused": 3}
    assert result.health.errors == {"ERR:ConnectionRefused": 1}
    assert "health check failed (ERR:ConnectionRefused:1" in result.verdict


@pytest.mark.slow
def test_max_seconds_bounds_the_storm(server: str) -> None:
    # 1000 requests of 0.2 s two at a time would take 100 s; the deadline stops it at ~1 s.
    config = StormConfig(
        server + "/slow", **{**SMALL, "normal_count": 1000, "normal_concurrency": 2,
                             "max_seconds": 1.0},
    )
    result = run_storm(config)

    assert result.seconds < 10  # hang guard only
    assert result.deadline_hit and not result.ok
    assert result.normal.skipped > 900 and result.final.requests == 0
    assert "--max-seconds" in result.verdict
    assert "skipped" in format_report(result)


@pytest.mark.slow
def test_unreadable_stats_url_is_a_usage_error_before_any_load(server: str) -> None:
    before = _get_json(server + "/hits").get("probe_alive", 0)
    with pytest.raises(StormError, match="cannot read the leak oracle.*answered 404"):
        run_storm(StormConfig(server + "/probe", stats_url="/no-such-stats", **SMALL))
    assert _get_json(server + "/hits").get("probe_alive", 0) == before


# -- the loopback guard (no traffic) ----------------------------------------------------


@pytest.fixture
def no_connect(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: socket.socket, address: Any) -> None:
        raise AssertionError(f"tried to connect to {address!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


@pytest.mark.usefixtures("no_connect")
def test_non_loopback_target_is_refused_before_connecting() -> None:
    with pytest.raises(StormError, match=r"192\.0\.2\.1.*not a loopback.*--allow-remote"):
        run_storm(StormConfig("http://192.0.2.1:8080/", **SMALL))


@pytest.mark.usefixtures("no_connect")
def test_non_loopback_stats_url_is_refused_too() -> None:
    with pytest.raises(StormError, match="stats URL.*--allow-remote"):
        run_storm(StormConfig("http://127.0.0.1:9/", stats_url="http://192.0.2.1/stats"))


@pytest.mark.usefixtures("no_connect")
def test_non_loopback_body_url_is_refused_too() -> None:
    with pytest.raises(StormError, match="body URL.*--allow-remote"):
        run_storm(StormConfig("http://127.0.0.1:9/", abort_styles=("slow-body",),
                              body_path="http://192.0.2.1/upload"))  # fmt: skip


@pytest.mark.usefixtures("no_connect")
def test_main_exits_2_for_a_remote_target(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["http://192.0.2.1/", "-q"]) == 2
    assert "--allow-remote" in capsys.readouterr().err


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8000/", "http://127.8.9.10/x?y=1", "http://[::1]:80/", "http://localhost/"]
)
def test_loopback_targets_are_allowed(url: str) -> None:
    target = resolve(url, allow_remote=False, what="target")
    assert target.path.startswith("/")


def test_allow_remote_lifts_the_guard() -> None:
    target = resolve("http://192.0.2.1/", allow_remote=True, what="target")
    assert target.sockaddr[0] == "192.0.2.1"


# -- configuration and the command line ---------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"abort_count": MAX_REQUESTS_PER_PHASE + 1}, "abort_count"),
        ({"normal_concurrency": 0}, "normal_concurrency"),
        ({"max_seconds": 0}, "max_seconds"),
        ({"abort_styles": ("stream",)}, "stream_path"),
        ({"abort_styles": ("stop-reading",)}, "stream_path"),
        ({"body_size": 1}, "body_size"),
        ({"stall_count": 0}, "stall_count"),
        ({"probe_timeout": 0}, "probe_timeout"),
        ({"pool_size": 0}, "pool_size"),
        ({"abort_styles": ("nope",)}, "unknown abort style"),
        ({"dsn": "dbname=x"}, "application_name"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        StormConfig("http://127.0.0.1/", **kwargs)


def test_stall_styles_run_in_their_own_phase_and_stalled_names_those_that_apply() -> None:
    from flask_reqconn.storm.cli import _expand_styles

    config = StormConfig(
        "http://127.0.0.1/", abort_styles=("rst", "slow-body", "body-reset", "stop-reading"),
        stream_path="/export",
    )  # fmt: skip
    assert config.quick_styles == ("rst", "body-reset")
    assert config.stall_styles == ("slow-body", "stop-reading")
    assert StormConfig("http://127.0.0.1/").stall_styles == ()  # not by default
    assert _expand_styles(("stalled",), None) == ("slow-body", "stalled-body")
    assert _expand_styles(("close", "stalled", "slow-body"), "/s") == (
        "close", "slow-body", "stalled-body", "stop-reading",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "saw", "words"),
    [
        ({"held": True, "answered": 3}, True, "the app holds a connection"),
        ({"held": False, "answered": 3}, True, "answered 3 of the 4 requests reset"),
        ({"held": False, "answered": 0}, False, "your proxy buffers request bodies"),
        ({"held": False, "answered": None}, None, "or the app reads them before"),
        ({"held": None, "answered": None, "stats": False}, None, "add --stats-url"),
    ],
)
def test_front_end_finding(kwargs: dict[str, Any], saw: bool | None, words: str) -> None:
    from flask_reqconn.storm.report import front_end_finding

    found = front_end_finding(**{"body_clients": 4, "bodies_reset": 4, "stats": True, **kwargs})
    assert found[0] is saw and words in found[1]


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["http://127.0.0.1/", "--normal-count", "many"]) == 2
    assert main(["http://127.0.0.1/", "--abort-styles", "close,bogus"]) == 2
    assert main(["http://127.0.0.1/", "--abort-styles", "stop-reading", "-q"]) == 2
    assert main(["http://127.0.0.1/", "--final-count", str(MAX_REQUESTS_PER_PHASE + 1)]) == 2
    assert main(["ftp://127.0.0.1/", "-q"]) == 2
    assert main(["--help"]) == 0
    assert "--stats-key" in capsys.readouterr().out


def test_terminal_progress_draws_a_bar_per_phase() -> None:
    stream = io.StringIO()
    printer = ProgressPrinter(stream, tty=True)
    for event in [Progress("final", 0, 4), Progress("final", 4, 4),
                  Progress("final", 4, 4, finished=True), Progress("drain", 0, 0),
                  Progress("drain", 0, 0, finished=True)]:
        printer(event)
    lines = stream.getvalue().split("\n")
    assert lines[0].rsplit("\r", 1)[-1].startswith("final  [" + "#" * 30 + "] 4/4 ")
    assert lines[1].rsplit("\r", 1)[-1].startswith("drain  [" + " " * 30 + "] ")


def _tiny(base: str) -> list[str]:
    return [
        base + "/", "--normal-count", "3", "--abort-count", "4", "--final-count", "3",
        "--drain-pause", "0.1",
    ]


@pytest.mark.slow
def test_main_prints_report_and_exits_0(server: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*_tiny(server), "--stats-url", "/stats"]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].split() == ["phase", "requests", "statuses", "errors", "p50", "ms", "p99", "ms"]
    assert [line.split()[0] for line in lines[1:5]] == ["normal", "abort", "health", "final"]
    assert lines[-1].startswith("verdict: OK:")
    # stderr is not a terminal here: one line per phase start and finish.
    assert "storm: abort started (4 requests)" in err
    assert "storm: final finished 3/3" in err


@pytest.mark.slow
def test_main_exits_1_and_json_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with _serve("werkzeug", tmp_path, env={"STORMTARGET_CHECKED_OUT": "1"}) as base:
        status = main([*_tiny(base), "--stats-url", "/stats", "--drain-timeout", "0.3",
                       "--json", "-q"])
    out, err = capsys.readouterr()
    assert status == 1 and err == ""
    data = json.loads(out)
    assert data["ok"] is False and data["verdict"].startswith("FAIL:")
    assert data["leaks"][0]["after_drain"] == 1


@pytest.mark.slow
def test_python_dash_m_runs_the_tool(server: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "flask_reqconn.storm", *_tiny(server)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[-1].startswith("verdict: OK:")


def test_click_command_has_the_options_of_python_dash_m() -> None:
    group = click.Group("reqconn")
    group.add_command(make_storm_command())
    runner = CliRunner()
    shown = runner.invoke(group, ["storm", "--help"])
    assert shown.exit_code == 0
    assert "Usage: reqconn storm [OPTIONS] URL" in shown.output
    assert "--abort-styles" in shown.output and "--stats-url" in shown.output
    assert runner.invoke(group, ["storm", "--abort-count", "x", "http://127.0.0.1/"]).exit_code == 2


@pytest.mark.slow
def test_click_command_runs_a_storm(server: str) -> None:
    result = CliRunner().invoke(make_storm_command(), [*_tiny(server), "-q"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1].startswith("verdict: OK:")


def test_report_of_a_failed_result_ends_with_the_verdict(server_less_result: StormResult) -> None:
    report = format_report(server_less_result).splitlines()
    assert report[-1] == f"verdict: {server_less_result.verdict}"
    assert report[-1].startswith("verdict: FAIL:")


@pytest.fixture
def server_less_result() -> StormResult:
    """A real (failed) run against a port nothing listens on: no server needed."""
    config = StormConfig(
        f"http://127.0.0.1:{_free_port()}/",
        **{**SMALL, "normal_count": 1, "abort_count": 1, "final_count": 1, "drain_pause": 0},
    )
    return run_storm(config)


# -- early stop: a health check without an answer ends the storm --------------------------

# The final load of a default storm: against a server that accepts connections but never
# answers, 100 requests of 10 s, 16 at a time, take 70 s.
DEFAULT_FINAL: dict[str, Any] = {"final_count": 100, "final_concurrency": 16,
                                 "final_timeout": 10.0}


@pytest.mark.slow
def test_hung_gunicorn_stops_the_storm_at_the_health_check(tmp_path: Path) -> None:
    frozen: list[float] = []
    with _serve_process("gunicorn", tmp_path) as (base, proc):

        def freeze_at_drain(event: Progress) -> None:
            if event.phase == "drain" and event.done == 0 and not event.finished:
                # Master and worker stopped: the kernel still accepts into the listen
                # backlog, so every request connects and then waits (a hung server).
                os.killpg(proc.pid, signal.SIGSTOP)
                frozen.append(time.monotonic())

        config = StormConfig(
            base + "/", stats_url="/stats",
            **{**SMALL, **DEFAULT_FINAL, "health_timeout": 3.0, "drain_timeout": 2.0,
               "max_seconds": 300.0},
        )
        result = run_storm(config, progress=freeze_at_drain)
        after_freeze = time.monotonic() - frozen[0]

    assert result.normal.all_ok and result.abort.aborted == 16  # alive until the drain
    assert result.health.errors == {"timeout": 1}
    assert result.final.requests == 0 and result.final.planned == 100
    assert after_freeze < 30, format_report(result)  # hang guard; the full run takes 70 s+
    assert result.stopped_early is not None
    assert "no answer (timeout:1)" in result.stopped_early
    assert not result.ok
    assert "stopped early: the health check got no answer (timeout:1)" in result.verdict
    assert "the final load (100 requests) and the last oracle reading skipped" in result.verdict
    assert "--no-early-stop" in result.verdict
    assert "final load 0/100" not in result.verdict  # not sent is not failed
    (reading,) = result.leaks
    assert reading.before == 0 and reading.at_end is None
    report = format_report(result)
    assert "0 (stopped early)" in report
    assert report.splitlines()[-1] == f"verdict: {result.verdict}"


@pytest.mark.slow
def test_killed_gunicorn_stops_the_storm_at_the_health_check(tmp_path: Path) -> None:
    events: list[Progress] = []
    with _serve_process("gunicorn", tmp_path) as (base, proc):

        def kill_at_drain(event: Progress) -> None:
            events.append(event)
            if event.phase == "drain" and event.done == 0 and not event.finished:
                os.killpg(proc.pid, signal.SIGKILL)  # master and worker, by the group's PID
                proc.wait(timeout=10)

        config = StormConfig(base + "/", **{**SMALL, **DEFAULT_FINAL, "max_seconds": 300.0})
        result = run_storm(config, progress=kill_at_drain)

    assert result.normal.all_ok
    assert result.health.errors == {"ERR:ConnectionRefused": 1}
    assert result.final.requests == 0
    assert result.seconds < 30  # hang guard only
    assert result.stopped_early is not None and "ConnectionRefused" in result.stopped_early
    assert result.verdict.startswith("FAIL: health check failed (ERR:ConnectionRefused:1")
    assert "stopped early" in result.verdict
    # The phases after the health check send no progress: they did not run.
    assert [e.phase for e in events if e.finished] == ["normal", "abort", "drain", "health"]


def test_nothing_listening_stops_early_and_no_early_stop_runs_the_final_load(
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = f"http://127.0.0.1:{_free_port()}/"  # nothing listens there
    tiny = [url, "--normal-count", "2", "--abort-count", "2", "--final-count", "3",
            "--drain-pause", "0", "--json", "-q"]

    assert main(tiny) == 1
    early = json.loads(capsys.readouterr().out)
    assert early["config"]["early_stop"] is True
    assert "ERR:ConnectionRefused" in early["stopped_early"]
    assert early["final"]["requests"] == 0 and "stopped early" in early["verdict"]

    assert main([*tiny, "--no-early-stop"]) == 1
    full = json.loads(capsys.readouterr().out)
    assert full["config"]["early_stop"] is False and full["stopped_early"] is None
    assert full["final"]["errors"] == {"ERR:ConnectionRefused": 3}
    assert full["stall"] is None  # no stall style chosen
    assert "stopped early" not in full["verdict"] and "final load 0/3 2xx" in full["verdict"]


@pytest.mark.slow
def test_health_check_answered_with_an_error_status_runs_the_final_load(server: str) -> None:
    config = StormConfig(
        server + "/", health_path="/no-such-page",
        **{**SMALL, "normal_count": 2, "abort_count": 2, "final_count": 3},
    )
    result = run_storm(config)

    assert result.health.statuses == {404: 1}  # alive, only unhealthy: no early stop
    assert result.stopped_early is None and result.final.all_ok
    assert not result.ok and "health check failed (404:1" in result.verdict


# -- entry points and lazy loading ---------------------------------------------------------

_IMPORTS_PROBE = """
import json, sys
import click
from flask import Flask
from flask.cli import ScriptInfo

# Flask, click and werkzeug import no argparse themselves (gunicorn does, so this runs a
# plain Flask app): anything of it found below was added by flask-reqconn.
before = {"argparse": "argparse" in sys.modules}

from flask_reqconn import ReqConn

app = Flask("probe")
app.config["REQCONN_CONNINFO"] = "postgresql://nobody@127.0.0.1:1/none"  # never connected
ReqConn(app)
ctx = click.Context(app.cli, info_name="flask", obj=ScriptInfo(create_app=lambda: app))
group = app.cli.get_command(ctx, "reqconn")
names = group.list_commands(ctx)
group_help = group.get_help(click.Context(group, info_name="reqconn", parent=ctx))

def loaded():
    return {
        "argparse": "argparse" in sys.modules,
        "storm": sorted(m for m in sys.modules if m.startswith("flask_reqconn.storm")),
    }

after_init = loaded()
storm = group.get_command(ctx, "storm")
print(json.dumps({"before": before, "after_init": after_init, "names": names,
                  "group_help": group_help, "storm": storm.name, "after_storm": loaded()}))
"""


def test_reqconn_app_and_its_cli_import_neither_the_storm_nor_argparse() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORTS_PROBE], cwd=REPO, capture_output=True, text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)
    assert seen["before"] == {"argparse": False}
    assert seen["after_init"] == {"argparse": False, "storm": []}
    # The group lists the storm, with its short help, without importing it ...
    assert "storm" in seen["names"]
    listed = [line.split(None, 1) for line in seen["group_help"].splitlines()]
    assert ["storm", "Abort storm: check the app survives clients that hang up."] in listed
    # ... and imports it once asked for the command (so the probe above can see an import).
    assert seen["storm"] == "storm"
    assert "flask_reqconn.storm.cli" in seen["after_storm"]["storm"]
    assert seen["after_storm"]["argparse"] is False


def test_lazy_short_help_is_the_commands_own() -> None:
    from flask_reqconn.cli import ReqConnGroup

    *_where, short_help = ReqConnGroup.lazy_commands["storm"]
    assert short_help == make_storm_command().short_help


def _help_of(argv: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "RC_DSN": "postgresql://nobody@127.0.0.1:1/x"}
    env.pop("FLASK_APP", None)
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("argv", "usage"),
    [
        (["-m", "flask", "--app", "tests.apps.reqconn_app:create_app()", "reqconn", "storm",
          "--help"], "Usage: python -m flask reqconn storm [OPTIONS] URL"),
        (["-m", "flask_reqconn.storm", "--help"],
         "Usage: python -m flask_reqconn.storm [OPTIONS] URL"),
    ],
    ids=["flask-reqconn-storm", "python-m"],
)
def test_both_entry_points_show_the_same_help(argv: list[str], usage: str) -> None:
    proc = _help_of([sys.executable, *argv])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(usage), proc.stdout
    for option in ("--abort-styles", "--stats-url", "--no-early-stop", "--max-seconds", "-H"):
        assert option in proc.stdout
    body = proc.stdout.split("\n", 1)[1]
    assert body == _help_of(
        [sys.executable, "-m", "flask_reqconn.storm", "--help"]
    ).stdout.split("\n", 1)[1]


def test_reference_page_documents_every_option() -> None:
    lines = (REPO / "docs" / "storm.rst").read_text().splitlines()
    documented = {
        opt.split()[0]
        for line in lines if line.startswith(".. option:: ")
        for opt in line.removeprefix(".. option:: ").split(", ")
    }
    command = make_storm_command()
    expected = {
        opt
        for param in command.params if isinstance(param, click.Option)
        for opt in (*param.opts, *param.secondary_opts)
    }
    assert expected and documented == expected


# -- clients that stall, against the example apps under gunicorn gthread -------------------

# The naive app takes its connection in before_request and reads the body in its view;
# flask-reqconn's reads the body first. A pool of 2, gunicorn gthread with 8 threads.
STALL_POOL = 2
STALL_STORM: dict[str, Any] = {
    "normal_count": 4, "normal_concurrency": 2, "abort_count": 0, "final_count": 4,
    "final_concurrency": 2, "final_timeout": 8.0, "body_path": "/upload",
    "stream_path": "/export", "stall_seconds": 6.0, "probe_interval": 0.2,
    "probe_timeout": 10.0, "stats_url": "/stats", "health_path": "/health",
    "health_timeout": 8.0, "drain_timeout": 8.0, "max_seconds": 120.0,
}  # fmt: skip


def _example(spawn: Any, pg_dsn: str, module: str, env: dict[str, str] | None = None) -> Any:
    from flask_reqconn.testing.postgres import unique_name, with_conninfo

    appname = unique_name("storm_stall")
    return spawn(
        "gunicorn", f"examples.{module}:create_app()", worker_class="gthread", threads=8,
        graceful_timeout=2,
        env={"DATABASE_URL": with_conninfo(pg_dsn, application_name=appname),
             "POOL_SIZE": str(STALL_POOL), "POOL_TIMEOUT": "5", **(env or {})},
    )  # fmt: skip


# (style, stalled clients): the body styles outnumber the pool; two readers that stop
# are as many as the pool, taken back by REQCONN_MAX_HOLD=1 in flask-reqconn's app.
STALLS = [("slow-body", 3), ("stalled-body", 3), ("stop-reading", STALL_POOL)]
#: The stall window where flask-reqconn's app (or a buffering proxy) holds no connection
#: while the bodies arrive: 4 s is ~19 probes (5 asserted), and never stuck (checked_out
#: stays below the pool size). The stop-reading readers keep STALL_STORM's 6 s: they hold
#: the whole pool until REQCONN_MAX_HOLD takes it back (about 3.5 s), and "not stuck"
#: needs that done within the first half of the window.
BODY_STALL_SECONDS = 4.0


@pytest.mark.slow
@pytest.mark.parametrize(("style", "clients"), STALLS, ids=[s for s, _ in STALLS])
def test_stalled_clients_starve_the_naive_app(
    spawn: Any, pg_dsn: str, style: str, clients: int
) -> None:
    server = _example(spawn, pg_dsn, "naive_app")
    # the naive app's pool stays taken after the stall: its health check, final load and
    # drain only wait out their timeouts, so they get short ones
    short = {"health_timeout": 2.0, "final_timeout": 2.0, "drain_timeout": 2.0}
    result = run_storm(StormConfig(
        server.url + "/", abort_styles=(style,), stall_count=clients, **{**STALL_STORM, **short}
    ))  # fmt: skip

    report = format_report(result)
    assert not result.ok, report
    stall = result.stall
    assert stall is not None, report
    assert stall.clients.styles.get(style, 0) >= clients, report
    # Once the attack is in, a probe waits the pool's 5 s and gets the naive app's 500
    # (PoolTimeout); one that came while the pool was still opening its second
    # connection may get through.
    assert stall.probes.statuses.get(500, 0) >= 1, report
    assert stall.probes.ok_count <= stall.probes.requests - 1, report
    assert stall.pool_size == STALL_POOL and stall.stuck, report
    # the first sample may come before the attackers got their connections
    assert stall.checked_out[-1] == STALL_POOL and max(stall.checked_out) == STALL_POOL, report
    assert "starve the app" in result.verdict
    assert f"checked_out stuck at the pool size ({STALL_POOL})" in result.verdict
    if style != "stop-reading":
        assert stall.app_saw_bodies is True
        assert "the app holds a connection while a request body arrives" in result.verdict
    else:  # the dropped streams never gave their connections back
        (reading,) = result.leaks
        assert reading.after_drain == STALL_POOL, report


@pytest.mark.slow
@pytest.mark.parametrize(("style", "clients"), STALLS, ids=[s for s, _ in STALLS])
def test_stalled_clients_do_not_starve_flask_reqconn(
    spawn: Any, pg_dsn: str, style: str, clients: int
) -> None:
    server = _example(spawn, pg_dsn, "reqconn_app", env={"MAX_HOLD": "1"})
    window = {} if style == "stop-reading" else {"stall_seconds": BODY_STALL_SECONDS}
    result = run_storm(StormConfig(
        server.url + "/", abort_styles=(style,), stall_count=clients,
        **{**STALL_STORM, **window},
    ))  # fmt: skip

    report = format_report(result)
    assert result.ok, report
    stall = result.stall
    assert stall is not None
    assert stall.probes.requests >= 5 and stall.probes.ok_count == stall.probes.requests
    assert stall.probes.max_ms is not None and stall.probes.max_ms < 5000, report  # pool wait
    assert stall.pool_size == STALL_POOL and not stall.stuck, report
    if style == "stop-reading":
        assert stall.clients.statuses == {200: clients}, report  # both streams had begun
    else:
        assert max(stall.checked_out) <= 1, report  # a probe's, at most
        assert stall.bodies_reset >= clients, report
        assert stall.answered_by_app is not None and stall.answered_by_app >= 1, report
        assert stall.app_saw_bodies is True
        assert "held no connection while they arrived" in result.verdict
    assert [(r.after_drain, r.at_end) for r in result.leaks] == [(0, 0)], report
    assert "Traceback" not in server.log_text()
    data = json.loads(json.dumps(result_json(result)))  # the --json output
    assert data["stall"]["front_end"] == stall.front_end
    assert data["stall"]["probes"]["statuses"] == {"200": stall.probes.requests}


@pytest.mark.slow
def test_body_reset_is_a_499_for_flask_reqconn_and_a_500_traceback_for_the_naive_app(
    spawn: Any, pg_dsn: str
) -> None:
    """Half a body, then a reset. Neither app loses a connection (the naive one answers
    500 and gives it back), so both pass the storm; only their logs differ."""
    servers = {
        name: _example(spawn, pg_dsn, f"{name}_app") for name in ("naive", "reqconn")
    }
    config = {**STALL_STORM, "abort_count": 6, "abort_concurrency": 3, "body_interval": 0.2}
    for server in servers.values():
        result = run_storm(StormConfig(server.url + "/", abort_styles=("body-reset",), **config))
        assert result.ok, format_report(result)
        assert result.abort.styles == {"body-reset": 6} and result.abort.aborted == 6
        assert result.stall is None
    stats = _get_json(servers["reqconn"].url + "/stats")
    assert stats["client_gone"] == 6 and stats["checked_out"] == 0
    assert "Traceback" not in servers["reqconn"].log_text()
    naive_log = servers["naive"].log_text()
    assert naive_log.count("Exception on /upload [POST]") == 6
    assert "ConnectionResetError" in naive_log


@pytest.mark.slow
@pytest.mark.parametrize("module", ["naive_app", "reqconn_app"])
def test_a_proxy_that_buffers_bodies_is_named_and_keeps_slow_uploads_off_the_app(
    spawn: Any, pg_dsn: str, module: str
) -> None:
    from tests.bufferproxy import buffering_proxy

    server = _example(spawn, pg_dsn, module)
    with buffering_proxy(server.url) as proxy:
        result = run_storm(StormConfig(
            proxy.url + "/", abort_styles=("slow-body", "stalled-body"), stall_count=3,
            **{**STALL_STORM, "stall_seconds": BODY_STALL_SECONDS},
        ))  # fmt: skip
        dropped = proxy.dropped

    report = format_report(result)
    assert result.ok, report  # behind the proxy, even the naive app keeps answering
    stall = result.stall
    assert stall is not None and stall.bodies_reset >= 3, report
    assert dropped >= stall.bodies_reset  # not one of them reached the app
    assert max(stall.checked_out) <= 1, report
    if module == "reqconn_app":  # its client_gone counter did not move: a proxy buffers
        assert stall.answered_by_app == 0 and stall.app_saw_bodies is False, report
        assert "your proxy buffers request bodies" in result.verdict
    else:  # no such counter: the storm cannot tell the proxy from an app that reads first
        assert stall.answered_by_app is None and stall.app_saw_bodies is None, report
        assert "held no connection while the slow bodies arrived" in result.verdict
