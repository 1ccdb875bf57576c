"""When an agent's time triggers fire next, computed purely from the triggers and ``now``.

Heartbeats and fixed intervals fire every so many seconds, cron schedules at the next
matching minute in their time zone, one-shot ``at`` triggers once. The supervisor asks
:class:`TriggerClock` for the next deadline and for the triggers that are due; the
arithmetic is here so that it can be tested as a table without sleeping.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from croniter import croniter

from agentos.core.spec.agent import Trigger

__all__ = ["DONE", "MAX_CATCH_UP", "ON_TIME_S", "Fire", "Missed", "TriggerClock", "next_fire"]


def next_fire(trigger: Trigger, after: float) -> float | None:
    """The first time strictly after ``after`` (epoch seconds) that ``trigger`` fires.

    Returns None for triggers that are not time based (inbox) and for an ``at``
    trigger whose time has passed.
    """
    if trigger.heartbeat is not None:
        return after + trigger.heartbeat
    if trigger.every is not None:
        return after + trigger.every
    if trigger.at is not None:
        at = trigger.at.timestamp()
        return at if at > after else None
    if trigger.schedule is not None:
        zone = ZoneInfo(trigger.timezone)
        fixed_hour = trigger.schedule.split()[1] != "*"
        schedule = croniter(trigger.schedule, datetime.fromtimestamp(after, tz=zone))
        while True:
            fire: datetime = schedule.get_next(datetime)
            # Like cron, a job at a fixed hour runs once when clocks go back, not in
            # both copies of the repeated hour; hourly and finer jobs run in both.
            if not (fixed_hour and _second_of_repeated_hour(fire, zone)):
                return fire.astimezone(UTC).timestamp()
    return None


def _second_of_repeated_hour(moment: datetime, zone: ZoneInfo) -> bool:
    wall = moment.astimezone(zone).replace(tzinfo=None)
    first, second = wall.replace(tzinfo=zone, fold=0), wall.replace(tzinfo=zone, fold=1)
    ambiguous = first.utcoffset() != second.utcoffset()
    return ambiguous and moment.utcoffset() == second.utcoffset()


MAX_CATCH_UP = 100  # fires run after downtime with catchUp: all, at most
# A fire this late when its agent is activated is on time, not missed: a released agent
# is activated for its fire by whichever daemon has room, which takes a moment (seconds
# on a busy fleet). Older fires passed while no daemon could run the agent: catchUp.
ON_TIME_S = 2.0
DONE = -1.0  # stored "next fire" of a one-shot trigger that has fired


@dataclass(frozen=True, slots=True)
class Fire:
    """One firing of a time trigger: which trigger, of what kind, and when it was due."""

    index: int
    kind: str
    at: float


@dataclass(frozen=True, slots=True)
class Missed:
    """Fires that passed while no daemon ran the agent, and what catchUp made of them."""

    index: int
    kind: str
    count: int  # how many fire times passed (counted up to MAX_CATCH_UP + 1)
    policy: str
    run: int  # how many of them run now


class TriggerClock:
    """The next fire time of each time trigger of one agent.

    ``stored`` holds the next fire times a previous owner persisted (trigger index ->
    epoch seconds, :data:`DONE` for a one-shot that fired); a fire that passed less than
    :data:`ON_TIME_S` ago is simply due (an agent released until its next fire is being
    activated for it); older ones passed while nobody ran the agent and are handled by
    each trigger's ``catchUp`` policy, in :attr:`catch_up` (to run now) and
    :attr:`missed` (to report). A heartbeat only asks whether there is work: a stored
    one that passed is due once, never caught up.
    """

    def __init__(
        self, triggers: Iterable[Trigger], *, now: float, stored: Mapping[str, float] | None = None
    ) -> None:
        stored = stored or {}
        self.triggers = list(triggers)
        self._next: dict[int, float | None] = {}
        self.catch_up: list[Fire] = []
        self.missed: list[Missed] = []
        for i, trigger in enumerate(self.triggers):
            if trigger.kind == "inbox":
                continue
            saved = stored.get(str(i))
            if saved is None:
                self._next[i] = next_fire(trigger, now)
            elif saved == DONE:
                self._next[i] = None if trigger.kind != "heartbeat" else next_fire(trigger, now)
            elif saved > now or trigger.kind == "heartbeat":
                self._next[i] = saved
            else:
                self._catch_up(i, trigger, saved, now)

    def _catch_up(self, index: int, trigger: Trigger, first: float, now: float) -> None:
        passed: list[float] = []
        at: float | None = first
        while at is not None and at <= now and len(passed) <= MAX_CATCH_UP:
            passed.append(at)
            at = next_fire(trigger, at)
        if passed[0] >= now - ON_TIME_S:
            # On time (the activation for it took a moment): due now, once, like the fire
            # of an agent that was busy.
            self._next[index] = passed[-1]
            return
        policy = trigger.catch_up
        run = {"skip": [], "one": passed[-1:], "all": passed[:MAX_CATCH_UP]}[policy]
        self.catch_up += [Fire(index, trigger.kind, t) for t in run]
        self.missed.append(Missed(index, trigger.kind, len(passed), policy, len(run)))
        self._next[index] = next_fire(trigger, now)

    @property
    def next_at(self) -> float | None:
        """The earliest pending fire time, or None when nothing is scheduled."""
        times = [at for at in self._next.values() if at is not None]
        return min(times) if times else None

    def due_fires(self, now: float) -> list[Fire]:
        """The triggers due at ``now`` (each once), rescheduled after ``now``.

        A trigger that missed several fire times while the agent was busy fires once.
        """
        fired: list[Fire] = []
        for i, at in self._next.items():
            if at is not None and at <= now:
                trigger = self.triggers[i]
                fired.append(Fire(i, trigger.kind, at))
                self._next[i] = next_fire(trigger, now)
        return fired

    def due(self, now: float) -> list[str]:
        """Kinds of the triggers due at ``now``; see :meth:`due_fires`."""
        return [f.kind for f in self.due_fires(now)]

    def persisted(self, *, heartbeats: bool = False) -> dict[str, float]:
        """Next fire times to store, so another owner continues without duplicates
        (with ``heartbeats``, theirs too: a released agent is activated for them)."""
        return {
            str(i): DONE if at is None else at
            for i, at in self._next.items()
            if heartbeats or self.triggers[i].kind != "heartbeat"
        }
