"""When an agent's time triggers fire next, computed purely from the triggers and ``now``.

Heartbeats and fixed intervals fire every so many seconds, cron schedules at the next
matching minute in their time zone, one-shot ``at`` triggers once. The supervisor asks
:class:`TriggerClock` for the next deadline and for the triggers that are due; the
arithmetic is here so that it can be tested as a table without sleeping.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from croniter import croniter

from agentos.spec import Trigger

__all__ = ["TriggerClock", "next_fire"]


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


class TriggerClock:
    """The next fire time of each time trigger of one agent."""

    def __init__(self, triggers: Iterable[Trigger], *, now: float) -> None:
        self._next: list[tuple[Trigger, float | None]] = [
            (t, next_fire(t, now)) for t in triggers if t.kind != "inbox"
        ]

    @property
    def next_at(self) -> float | None:
        """The earliest pending fire time, or None when nothing is scheduled."""
        times = [at for _, at in self._next if at is not None]
        return min(times) if times else None

    def due(self, now: float) -> list[str]:
        """Kinds of the triggers due at ``now`` (each once), rescheduling them after ``now``.

        A trigger that missed several fire times while the agent was busy fires once.
        """
        fired: list[str] = []
        for i, (trigger, at) in enumerate(self._next):
            if at is not None and at <= now:
                fired.append(trigger.kind)
                self._next[i] = (trigger, next_fire(trigger, now))
        return fired
