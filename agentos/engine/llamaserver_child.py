"""The embedded llama.cpp HTTP server, run as a child process of the daemon.

``xllamacpp.Server`` serves until its process ends and holds the model, its threads and
its slots; running it in the daemon's own process would tie an engine restart (or a
crash in native code) to the daemon. So the ``llamaserver`` engine starts this module
with ``python -m agentos.engine.llamaserver_child CONFIG_JSON`` and stops it with
SIGTERM. The child exits when its parent does (it watches its parent pid), so a killed
daemon never leaves a server holding the port and 300 MB of memory.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Any

__all__ = ["main"]


def _watch_parent(parent: int) -> None:
    while True:
        if os.getppid() != parent:
            os._exit(0)
        time.sleep(0.5)


def _params(config: dict[str, Any]) -> Any:
    import xllamacpp

    p = xllamacpp.CommonParams()
    p.model.path = config["model_path"]
    p.n_ctx = int(config["n_ctx"])
    p.n_parallel = int(config["n_parallel"])
    p.kv_unified = bool(config.get("kv_unified", False))
    p.swa_full = bool(config.get("swa_full", True))
    p.n_ctx_checkpoints = int(config.get("n_ctx_checkpoints", 0))
    p.cache_ram_mib = int(config.get("cache_ram_mib", 0))
    threads = int(config.get("n_threads", 2))
    p.cpuparams.n_threads = threads
    p.cpuparams_batch.n_threads = threads
    p.hostnames = ["127.0.0.1"]
    p.port = int(config["port"])
    p.slot_save_path = str(config["slot_save_path"])
    p.endpoint_metrics = True
    p.endpoint_slots = True
    p.warmup = False
    return p


def main(argv: list[str]) -> int:
    """Start the server described by the JSON in ``argv[1]``; returns only on error."""
    config = json.loads(argv[1])
    threading.Thread(target=_watch_parent, args=(int(config["parent_pid"]),), daemon=True).start()
    import xllamacpp

    server = xllamacpp.Server(_params(config))
    # The server runs in its own native threads; this thread only keeps the process alive.
    while True:
        time.sleep(3600)
    del server  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover - run as a child process
    sys.exit(main(sys.argv))
