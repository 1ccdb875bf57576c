"""The pure decision cores: data and ``now`` in, decisions out; no I/O, no event loop.

Everything here is unit-tested by tables. Drivers (the runtime, the governor, the store,
the CLI) perform what these modules decide. Nothing in this package imports anyio,
redis, opentelemetry or an engine; import-linter keeps it that way.
"""
