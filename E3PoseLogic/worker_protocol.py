"""The line protocol between ``comparison.WorkerMethod`` and the external registration workers (``ants_worker.py``,
``fireants_worker.py``).

The workers run under another environment's Python, so they import this file as a sibling script (their folder is
``sys.path[0]``), never through the package: it needs nothing but the standard library.
"""
from __future__ import annotations

import json
import sys


def serve(register, reply_to=None) -> int:
    """Answer one JSON request per stdin line, ``{"volume": PATH, "start": START}``, with
    ``{"matrix": 3x3, "offset": 3}`` from ``register(volume, start)`` (fixed LPS point p -> template LPS point
    M p + offset), or ``{"error": ...}``: a volume the tool fails on is reported, the caller counts it as a failure, and
    the worker goes on. ``reply_to``: the stream for the replies (default stdout)."""
    out = sys.stdout if reply_to is None else reply_to
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        try:
            m, off = register(req["volume"], req.get("start", "com"))
            reply = {"matrix": m.tolist(), "offset": off.tolist()}
        except Exception as exc:  # reported per volume; the caller counts it as that volume's failure
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()
    return 0
