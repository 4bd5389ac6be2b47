"""Clients that stall, from a separate process: the attack of the stalled-clients figure.

``python bench/stallload.py http://127.0.0.1:PORT/upload --clients 6 --seconds 8`` keeps
*clients* connections, round-robin over ``slow-body`` (a POST head announcing
``--body-size`` bytes, then one byte every ``--body-interval``) and ``stalled-body``
(the head and 10 bytes, then nothing), for *seconds*; a client whose request is answered
starts another; at the end every connection still sending its body is reset. The same
clients as the storm's stall phase (:mod:`flask_reqconn.storm`).

Prints a JSON summary. Loopback targets only; bounded in count and time.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections import Counter
from typing import Any

from loadgen import check_loopback

from flask_reqconn.storm.client import post_head_bytes, resolve, stalled_request

STYLES = ("slow-body", "stalled-body")
#: Requests one client may start: a cap far above what the stall needs.
MAX_PER_CLIENT = 1000


def attack(url: str, *, clients: int, seconds: float, body_size: int,
           body_interval: float) -> dict[str, Any]:
    check_loopback(url)
    target = resolve(url, allow_remote=False, what="target")
    head = post_head_bytes(target, (), body_size)
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()
    start = time.monotonic()
    window_end = start + seconds

    def client(style: str) -> None:
        for _ in range(MAX_PER_CLIENT):
            if time.monotonic() >= window_end:
                return
            began = time.monotonic()
            outcome = stalled_request(
                target, head, style, body_size=body_size, body_interval=body_interval,
                window_end=window_end,
            )  # fmt: skip
            name = outcome.error or (str(outcome.status) if outcome.status else "held")
            with lock:
                outcomes[f"{style}:{name}"] += 1
            if time.monotonic() - began < 0.1:
                time.sleep(0.1)

    threads = [
        threading.Thread(target=client, args=(STYLES[i % len(STYLES)],), daemon=True)
        for i in range(clients)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 30)
    return {
        "clients": clients,
        "outcomes": dict(sorted(outcomes.items())),
        "seconds": round(time.monotonic() - start, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="clients that stall (loopback only)")
    parser.add_argument("url", help="the upload to stall, e.g. http://127.0.0.1:8000/upload")
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--body-size", type=int, default=1000)
    parser.add_argument("--body-interval", type=float, default=0.5)
    args = parser.parse_args(argv)
    if not 1 <= args.clients <= 256 or not 0 < args.seconds <= 600:
        parser.error("clients must be 1..256 and seconds 0..600")
    print(json.dumps(attack(args.url, clients=args.clients, seconds=args.seconds,
                            body_size=args.body_size, body_interval=args.body_interval)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
