"""The plain side of bench/tool_loop.py: the same tool loops through the ``openai`` client,
straight to llama.cpp's server (run with .venv-bench-peers' Python, which has ``openai``).

Usage: python _openai_peer.py SERVER_URL WORKLOAD_JSON_FILE. Prints one JSON line.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

from _workload import page_text  # bench/ is this script's folder
from openai import AsyncOpenAI


async def loop(client: AsyncOpenAI, w: dict[str, Any], i: int) -> bool:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": w["lowered_system"]},
        {"role": "user", "content": f"Summarise the pages of report loop-{i}."},
    ]
    for step in range(w["steps"]):
        last = step == w["steps"] - 1
        extra: dict[str, Any] = {}
        if not last:
            extra["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "call", "schema": w["schema"]},
            }
        response = await client.chat.completions.create(
            model="gemma",
            messages=messages,  # type: ignore[arg-type]
            max_tokens=32 if last else 64,
            temperature=0.0,
            **extra,
        )
        content = response.choices[0].message.content or ""
        messages.append({"role": "assistant", "content": content})
        if last:
            return True
        try:
            number = int(json.loads(content)["arguments"]["number"])
        except (ValueError, KeyError, TypeError):
            return False
        await asyncio.sleep(w["tool_s"])
        result = page_text(f"loop-{i}", number)
        messages.append(
            {
                "role": "user",
                "content": f"Result of tool call {w['tool']} call_{step}:\n{result}",
            }
        )
    return True


async def main(url: str, w: dict[str, Any]) -> None:
    if w.get("compact"):  # what agentos's llamaserver engine sends: compact JSON calls
        w["schema"] = {**w["schema_required"], "x-guidance": w["compact"]}
    else:
        w["schema"] = w["schema_required"]
    client = AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=1200)
    started = time.perf_counter()
    ok = await asyncio.gather(*(loop(client, w, i) for i in range(w["agents"])))
    print(
        json.dumps({"seconds": round(time.perf_counter() - started, 2), "failed": ok.count(False)})
    )


if __name__ == "__main__":
    with open(sys.argv[2]) as f:
        workload = json.load(f)
    asyncio.run(main(sys.argv[1], workload))
