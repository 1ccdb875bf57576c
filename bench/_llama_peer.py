"""The plain side's server in bench/tool_loop.py: llama.cpp's own defaults but for the
model, context, slots, threads and chat template (run as a child process)."""

from __future__ import annotations

import json
import os
import sys
import threading
import time


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)


def main() -> None:
    import xllamacpp

    config = json.loads(sys.argv[1])
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    p = xllamacpp.CommonParams()
    p.model.path = config["model_path"]
    p.n_ctx = int(config["n_ctx"])
    p.n_parallel = int(config["n_parallel"])
    p.cpuparams.n_threads = int(config["n_threads"])
    p.cpuparams_batch.n_threads = int(config["n_threads"])
    p.hostnames = ["127.0.0.1"]
    p.port = int(config["port"])
    p.endpoint_metrics = True
    p.warmup = False
    p.use_jinja = False  # the built-in template by name, as agentos's embedded server has it
    p.chat_template = config["chat_template"]
    server = xllamacpp.Server(p)
    while True:
        time.sleep(3600)
    del server


if __name__ == "__main__":
    main()
