"""What bench/tool_loop.py's agents read, shared by both sides (no imports: the plain side
runs in the peers' venv). Each agent reads its own report, so no two conversations share
more than the system prompt, as with real agents."""

from __future__ import annotations

import zlib

SEASONS = ("spring", "summer", "autumn", "winter")
PARTS = ("upper gate hinges", "mitre seal", "south pump bearing", "intake screen", "walkway")


def page_text(agent: str, number: int) -> str:
    """Page ``number`` of ``agent``'s report: the same text on both sides, different for
    every agent and page."""
    seed = zlib.crc32(f"{agent}/{number}".encode())
    season = SEASONS[seed % 4]
    part = PARTS[(seed >> 3) % len(PARTS)]
    hours = 200 + seed % 500
    minutes = 8 + (seed >> 5) % 9
    return (
        f"Report of {agent}, page {number}. In the {season} inspection the crew found wear on "
        f"the {part} and logged it for repair; two seal strips were replaced and the hinge "
        f"pins greased. The north pump ran for {hours} hours over the season and its bearing "
        "temperature stayed within limits, but the south pump tripped twice on high current "
        "during the flood, when debris reached the intake screen. After the flood the screen "
        "was cleared, a bent bar was straightened, and the motor was tested at full load for "
        "an hour without a fault. The downstream gates were painted; the paint crew noted rust "
        "on the walkway brackets, to be replaced next year. Water levels were logged every hour "
        f"and the chamber filled in {minutes} minutes on average."
    )
