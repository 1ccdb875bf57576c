"""The embedded llama.cpp HTTP server, a child process of the daemon: both of its sides.

``xllamacpp.Server`` serves until its process ends and holds the model, its threads and
its slots; running it in the daemon's own process would tie an engine restart (or a
crash in native code) to the daemon. So the ``llamaserver`` engine starts this module
with ``python -m agentos.engine.llamaserver_child CONFIG_JSON`` and stops it with
SIGTERM (:class:`EmbeddedServer` is the parent's side, which can also start it again
after a stop: an idle Model's server is stopped and restarted on demand). The child
exits when its parent
does (it watches its parent pid), so a killed daemon never leaves a server holding the
port and 300 MB of memory. An API key reaches the child through its environment, not
its command line, which any local user can read with ``ps``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from agentos.engine.base import EngineError

__all__ = ["EmbeddedServer", "main"]

_START_TIMEOUT_S = 120.0
_API_KEY_ENV = "AGENTOS_LLAMASERVER_API_KEY"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedServer:
    """A llama.cpp server from ``xllamacpp`` in a child process on loopback.

    ``chat_template`` is what ``CommonParams.chat_template`` takes: with ``use_jinja``
    a Jinja template's source, without it a llama.cpp built-in name (``gemma``,
    ``chatml``); ``""`` keeps the GGUF's own. With ``api_key`` every endpoint but
    ``/health`` requires ``Authorization: Bearer <api_key>``.
    """

    def __init__(
        self,
        *,
        model_path: Path,
        slot_dir: Path,
        n_ctx: int,
        n_parallel: int,
        n_threads: int,
        swa_full: bool = True,
        port: int | None = None,
        chat_template: str = "",
        use_jinja: bool = True,
        api_key: str | None = None,
    ) -> None:
        slot_dir.mkdir(parents=True, exist_ok=True)
        self.slot_dir = slot_dir
        self.port = port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = {
            "model_path": str(model_path),
            "n_ctx": n_ctx,
            "n_parallel": n_parallel,
            "swa_full": swa_full,
            "n_ctx_checkpoints": 0,  # with swa_full the slot holds all it needs
            "n_threads": n_threads,
            "port": self.port,
            "slot_save_path": str(slot_dir) + "/",  # xllamacpp wants the trailing slash
            "parent_pid": os.getpid(),
            "chat_template": chat_template,
            "use_jinja": use_jinja,
        }
        self._env = dict(os.environ)
        self._env.pop(_API_KEY_ENV, None)
        if api_key:
            self._env[_API_KEY_ENV] = api_key
        self._fixed_port = port is not None
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def log_path(self) -> Path:
        """Where the server's output goes (appended to across restarts)."""
        return self.slot_dir.parent / "server.log"

    @property
    def alive(self) -> bool:
        """Whether the server's process is running."""
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Start the server and wait until it answers ``/health`` (blocking, seconds).

        After :meth:`stop` it starts on the same port, or on a new one if another
        process took it meanwhile (:attr:`url` says which). Raises :class:`EngineError`
        when it exits or does not answer in time.
        """
        if self.alive:
            return
        again = self.process is not None
        try:
            self._start_once()
        except EngineError:
            if self._fixed_port or not again:
                raise
            self.port = _free_port()  # a stopped server's port may have been taken
            self.url = f"http://127.0.0.1:{self.port}"
            self.config["port"] = self.port
            self._start_once()

    def _start_once(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "agentos.engine.llamaserver_child", json.dumps(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=self._env,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + _START_TIMEOUT_S
        with httpx.Client(timeout=2.0) as http:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise EngineError(
                        f"the embedded llama.cpp server exited with {self.process.returncode} "
                        f"(log: {self.log_path})"
                    )
                try:
                    if http.get(self.url + "/health").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.05)  # a child process's readiness has no event to wait on
        raise EngineError(f"the embedded llama.cpp server did not start in {_START_TIMEOUT_S:.0f}s")

    def stop(self) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after 5 s); :meth:`start` may
        start it again."""
        process = self.process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _watch_parent(parent: int) -> None:
    while True:
        if os.getppid() != parent:
            os._exit(0)
        time.sleep(0.5)


def _params(config: dict[str, Any], api_key: str | None = None) -> Any:
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
    p.use_jinja = bool(config.get("use_jinja", True))
    p.chat_template = str(config.get("chat_template") or "")
    if api_key:
        p.api_keys = [api_key]
    return p


def main(argv: list[str]) -> int:
    """Start the server described by the JSON in ``argv[1]``; returns only on error."""
    config = json.loads(argv[1])
    threading.Thread(target=_watch_parent, args=(int(config["parent_pid"]),), daemon=True).start()
    import xllamacpp

    api_key = os.environ.pop(_API_KEY_ENV, None)
    server = xllamacpp.Server(_params(config, api_key))
    # The server runs in its own native threads; this thread only keeps the process alive.
    while True:
        time.sleep(3600)
    del server  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover - run as a child process
    sys.exit(main(sys.argv))
