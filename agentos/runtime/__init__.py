"""The in-daemon runtime: how one agent's tasks are run, supervised, hibernated and woken.

:mod:`agentos.runtime.loop` runs the observe/plan/act/learn loop of one task (shared
with :mod:`agentos.testing`); :mod:`agentos.runtime.runner` supervises one agent in a
daemon: one :class:`~agentos.runtime.runner.AgentRunner` owns the agent's state
(:mod:`agentos.runtime.state`) and calls its collaborators with it (:mod:`.idling`,
:mod:`.intake`, :mod:`.starting`, :mod:`.tasking`, :mod:`.securing`, :mod:`.closing`,
:mod:`.faults`, :mod:`.waits`, :mod:`.releasing`, :mod:`.calls`).
"""
