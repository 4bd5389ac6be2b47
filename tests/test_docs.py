"""The docs match the code: the stats tables list the declared keys, quoted log lines exist."""

from __future__ import annotations

import ast
import importlib
import json
import re
import textwrap
from pathlib import Path
from typing import Any

from flask_reqconn.integrations.prometheus import COUNTERS
from flask_reqconn.names import Stat
from flask_reqconn.stats import APP_KEYS, POOL_KEYS

ROOT = Path(__file__).resolve().parent.parent
OPERATIONS = (ROOT / "docs" / "operations.rst").read_text()


def section(text: str, start: str, end: str) -> str:
    return text.split(start, 1)[1].split(end, 1)[0]


def first_column_keys(table: str) -> list[str]:
    """The ``keys`` of the first column of a list-table (header row left out)."""
    keys: list[str] = []
    for row in re.split(r"\n   \* - ", table)[2:]:
        cell = row.split("\n     - ", 1)[0]
        keys += re.findall(r"``(\w+)``", cell)
    return keys


def test_the_stats_tables_list_exactly_the_declared_keys() -> None:
    stats = section(OPERATIONS, ".. _stats:", ".. _leak-detection:")
    top = section(stats, "Top level\n~~~~~~~~~", "Each pool\n~~~~~~~~~")
    pool = section(stats, "Each pool\n~~~~~~~~~", "**Histograms.**")
    assert first_column_keys(top) == list(APP_KEYS)
    assert sorted(first_column_keys(pool)) == sorted(POOL_KEYS)


def test_the_stats_example_has_every_declared_key() -> None:
    example = section(OPERATIONS, ".. code-block:: json\n", "\nThe keys described below")
    data = json.loads(example)
    assert list(data) == list(APP_KEYS)
    assert list(data["pools"]["default"]) == list(POOL_KEYS)


def test_every_counter_has_a_prometheus_metric_and_a_row_in_the_metrics_table() -> None:
    assert set(COUNTERS) == set(Stat)
    table = section(OPERATIONS, ".. _prometheus:", "Several gunicorn workers")
    for stat, (name, _doc) in COUNTERS.items():
        assert f"``flask_reqconn_{name}_total``" in table, stat


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def logged_formats() -> dict[str, list[tuple[str, str]]]:
    """(logger, "format") of each ``logger.<level>("format", ...)`` of the package, by level."""
    found: dict[str, list[tuple[str, str]]] = {}
    for path in (ROOT / "flask_reqconn").rglob("*.py"):
        tree = ast.parse(path.read_text())
        loggers = {  # the module's ``name = logging.getLogger(...)``
            target.id: module_name(path) if isinstance(arg, ast.Name) else str(arg.value)
            for node in tree.body
            if isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Call)
            and ast.unparse(node.value.func) == "logging.getLogger"
            and isinstance(arg := node.value.args[0], (ast.Name, ast.Constant))
            for target in node.targets
            if isinstance(target, ast.Name)
        }
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            level = node.func.attr
            if level not in ("debug", "info", "warning", "error", "exception"):
                continue
            logger = loggers.get(ast.unparse(node.func.value))
            if logger and node.args and isinstance(node.args[0], ast.Constant):
                level = "error" if level == "exception" else level
                found.setdefault(level.upper(), []).append((logger, str(node.args[0].value)))
    return found


def as_pattern(fmt: str) -> re.Pattern[str]:
    escaped = re.escape(" ".join(fmt.split()))
    return re.compile(re.sub(r"%(\\\.\d)?[sdrf]", ".*?", escaped).replace("%%", "%"))


def quoted_log_lines() -> list[tuple[str, str, str]]:
    """(level, logger, message) of each log line quoted in the Logs section."""
    logs = OPERATIONS.split(".. _logs:", 1)[1].split(".. _sizing:", 1)[0]
    lines: list[tuple[str, str, str]] = []
    for block in re.findall(r"::\n\n((?:    .*\n|\n)+)", logs):
        for entry in re.split(r"\n(?=    (?:DEBUG|INFO|WARNING|ERROR) )|\n\s*\n", block):
            text = " ".join(entry.split())
            match = re.match(r"(DEBUG|INFO|WARNING|ERROR) (flask_reqconn(?:\.\w+)+): (.*)", text)
            if match:
                lines.append((match[1], match[2], match[3]))
    return lines


def test_every_quoted_log_line_is_one_the_code_emits() -> None:
    formats = logged_formats()
    quoted = quoted_log_lines()
    assert len(quoted) >= 20  # the parsing above finds the examples
    unknown = [
        f"{level} {logger}: {message}"
        for level, logger, message in quoted
        if not any(
            name == logger and as_pattern(fmt).fullmatch(message)
            for name, fmt in formats.get(level, [])
        )
    ]
    assert unknown == []


def test_the_log_line_check_catches_a_line_no_code_emits() -> None:
    formats = logged_formats()["ERROR"]
    message = "leak check of <PoolHolder 'reqconn:myapp' pid=4711> failed"
    assert not any(as_pattern(fmt).fullmatch(message) for _, fmt in formats)


def test_the_log_line_check_knows_the_logger_of_each_line() -> None:
    """A quoted line names the logger of the module that emits it."""
    formats = logged_formats()
    teardown = [n for n, f in formats["ERROR"] if f.startswith("error while releasing")]
    assert teardown == ["flask_reqconn.checkout"]
    assert ("flask_reqconn.sizing", "could not read the server's connection limits: %s") in (
        formats["DEBUG"]
    )


def test_the_api_page_documents_exactly_all() -> None:
    import flask_reqconn

    api = (ROOT / "docs" / "api.rst").read_text()
    documented = re.findall(r"^\.\. auto(?:class|function|exception|data):: (\w+)", api, re.M)
    assert sorted(documented) == sorted(flask_reqconn.__all__)


def documented_error_handlers() -> list[tuple[str, str]]:
    """(page, code) of each code example of the docs that registers an error handler."""
    found = []
    for page in sorted((ROOT / "docs").glob("*.rst")):
        text = page.read_text()
        for block in re.findall(r"(?:::|\.\. code-block:: python)\n\n((?:[ ]{3,}.*\n|\n)+)", text):
            code = textwrap.dedent(block)
            if "@app.errorhandler(" in code:
                found.append((page.name, code))
    return found


def test_the_documented_error_handlers_keep_retry_after_themselves() -> None:
    """Each handler, on its own (the exception made outside a request: no header added back
    by the library), answers a 503 with the exception's Retry-After."""
    from flask import Flask

    import flask_reqconn
    from flask_reqconn import DatabaseUnavailable, PoolExhausted

    handlers = documented_error_handlers()
    assert {page for page, _ in handlers} >= {"failure-modes.rst", "lifecycle.rst", "pools.rst"}
    for page, code in handlers:
        app = Flask("docs")
        public = {name: getattr(flask_reqconn, name) for name in flask_reqconn.__all__}
        exec(code, {"app": app, **public})
        for exc_class in (PoolExhausted, DatabaseUnavailable):
            for pool in ("default", "replica"):
                handler = app._find_error_handler(exc_class(pool, 7), ())
                if handler is None:
                    continue
                with app.test_request_context():
                    response = app.make_response(handler(exc_class(pool, 7)))
                assert response.status_code == 503, page
                assert response.headers.get("Retry-After") == "7", (page, code)


def page(name: str) -> str:
    return (ROOT / "docs" / name).read_text()


def test_the_requirements_are_pyprojects() -> None:
    """index.rst and quickstart.rst give every bound of pyproject's dependencies."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    block = pyproject.split("\ndependencies = [\n", 1)[1].split("\n]\n", 1)[0]
    bounds = {
        name.lower(): re.findall(r"[<>]=?\s*([\d.]+)", spec)
        for name, spec in re.findall(r'^\s*"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?([^"]*)"', block, re.M)
    }
    python = re.findall(r'requires-python = ">=([\d.]+)"', pyproject)
    assert bounds["psycopg-pool"] == ["3.2.1", "3.4"] and python == ["3.10"]
    index = page("index.rst").split("Requirements:", 1)[1].split("\n\n", 1)[0]
    quickstart = page("quickstart.rst").split("The dependencies are", 1)[1].split("\n\n", 1)[0]
    for text in (" ".join(index.split()), " ".join(quickstart.split())):
        for name, versions in bounds.items():
            if name == "werkzeug":  # comes with Flask
                continue
            shown = name.replace("flask", "Flask")
            assert shown in text.replace("``", "").replace("[pool]", ""), (name, text)
            for version in versions:
                assert version in text, (name, version, text)
    assert "Python 3.10" in index


def test_the_quickstart_says_reqconn_connection_is_reset_and_it_is(
    make_app: Any,
) -> None:
    text = page("quickstart.rst").split("Outside of requests\n", 1)[1].split("\nRows by name", 1)[0]
    assert "without" not in text and "does not outlive the block" in text
    app = make_app(max_size=1)
    reqconn = app.extensions["test_reqconn"]
    with reqconn.connection(app=app) as conn:
        pid = conn.info.backend_pid
        conn.execute("SET work_mem = '1234kB'")
    with reqconn.connection(app=app) as conn:
        assert conn.info.backend_pid == pid  # the same connection, reset
        assert conn.execute("SHOW work_mem").fetchone() != ("1234kB",)


def test_lifecycle_says_blueprints_are_matched_by_object_as_policy_does() -> None:
    from flask_reqconn import policy
    from tests import test_policy

    text = " ".join(page("lifecycle.rst").split("A blueprint is matched", 1)[1].split())
    assert text.startswith("by object, not by name")
    assert "Blueprints are matched by object" in " ".join((policy.__doc__ or "").split())
    # what the page says about it, tested
    assert test_policy.test_blueprint_registered_under_another_name_is_still_exempt
    assert test_policy.test_exempting_one_blueprint_leaves_a_namesake_in_another_parent_alone


def test_the_docs_import_paths_are_current() -> None:
    """Each ``from flask_reqconn... import`` of the docs works, and none is an old path."""
    pages = [*(ROOT / "docs").glob("*.rst"), *(ROOT / "docs" / "api").glob("*.rst")]
    seen = 0
    for path in pages:
        for module, names in re.findall(
            r"^\s*from (flask_reqconn[\w.]*) import ([\w, ]+)$", path.read_text(), re.M
        ):
            seen += 1
            imported = importlib.import_module(module)
            for name in names.split(","):
                assert hasattr(imported, name.strip()), (path.name, module, name)
    assert seen >= 10


def test_the_warnings_name_the_pool_as_stats_does(make_app: Any, pg_dsn: str, caplog: Any) -> None:
    app = make_app(max_size=1, timeout=0.2, pools={"replica": {"CONNINFO": pg_dsn, "MAX_SIZE": 1}})
    reqconn = app.extensions["test_reqconn"]
    app.register_blueprint(reqconn.health_blueprint())

    @app.get("/<name>")
    def view(name: str) -> str:
        from flask_reqconn import get_conn

        get_conn(name)
        return "never"

    client = app.test_client()
    caplog.set_level("WARNING", logger="flask_reqconn")
    for name in ("default", "replica"):
        with reqconn.connection(name, app=app):
            assert client.get(f"/{name}").status_code == 503
    assert set(client.get("/stats").get_json()["pools"]) == {"default", "replica"}
    exhausted = [r.getMessage() for r in caplog.records if "exhausted" in r.getMessage()]
    assert exhausted[0].startswith(f"pool 'default' (reqconn:{app.name}) exhausted: GET /default")
    assert exhausted[1].startswith(
        f"pool 'replica' (reqconn:{app.name}:replica) exhausted: GET /replica"
    )
