"""The short soak (bench/soak.py): a few thousand requests with aborts, dropped streams,
cancels, backend terminations and a restart leave nothing behind in the gunicorn worker."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.soak import SoakConfig, run_soak
from tests.fix_faults import FaultServer


@pytest.mark.slow
def test_short_soak_grows_nothing_and_leaks_nothing(fault_pg: FaultServer, tmp_path: Path) -> None:
    cfg = SoakConfig(
        requests=3000, clients=4, samples=4, terminate_every=1000, restart=True,
        max_rss_mb=20, slack=2,  # generous: the figures come from the full soak
        no_500=True,
    )  # fmt: skip
    result = run_soak(fault_pg, cfg, tmp_path)
    verdict, outcomes, last = result["verdict"], result["outcomes"], result["samples"][-1]
    # Growth, leaks, hangs, a changed worker: what today's library already handles.
    assert verdict["ok"], verdict["problems"]
    assert last["checked_out"] == 0
    # The traffic and the faults really happened.
    for op in ("abort:sent", "cancel:sent", "select:200", "stream:200"):
        assert outcomes.get(op, 0) > 0, (op, outcomes)
    assert sum(n for k, n in outcomes.items() if k.startswith("stream_drop:")) > 0
    assert last["cancelled"] > 0, "the watcher cancelled no query of a departed client"
    assert last["client_gone"] > 0
    assert any("restarted" in e for e in result["events"])
    terminated = [e for e in result["events"] if "backends terminated" in e]
    assert len(terminated) >= 2 and not all(e.split()[1] == "0" for e in terminated)
    assert last["pool"]["connections_num"] > 4  # the pool reconnected after the faults
    # Statuses: 200, or 503 after a termination or the restart (a connection lost mid-way,
    # or the pool reconnecting); never a 500 (the verdict checks it too: no_500).
    statuses = {k.split(":", 1)[1] for k in outcomes if k.startswith(("select:", "stream:"))}
    assert statuses <= {"200", "503", "error"}, outcomes
