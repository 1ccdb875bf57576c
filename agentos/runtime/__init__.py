"""The in-daemon runtime: how one agent's tasks are run, supervised, hibernated and woken.

:mod:`agentos.runtime.loop` runs the observe/plan/act/learn loop of one task (shared
with :mod:`agentos.testing`); :mod:`agentos.runtime.runner` supervises one agent in a
daemon.
"""
