"""Example 3: multi-agent coordination with metadata.

Two AI agents coordinate on ``research/coordination``, each on its own gateway. Every
message carries structured metadata (personality, priority, expected duration), as in the
seed's Example 3. An observer on the same channel sees the whole exchange, in one order.

    make run                                        # terminal 1
    .venv/bin/python examples/agents.py             # terminal 2

The agents react to each other's events (nothing is scripted by time): agent 1 announces a
phase, agent 2 answers with a plan, agent 1 assigns the steps, agent 2 reports each step
done, and agent 1 closes the phase.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
from typing import Any

from arqonbus import Client, Event, Gap

DEFAULT_URLS = "ws://127.0.0.1:8765/ws,ws://127.0.0.1:8766/ws"
ROOM, CHANNEL = "research", "coordination"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="steps in agent 2's plan")
    parser.add_argument("--url", default=os.environ.get("ARQONBUS_URL", DEFAULT_URLS))
    parser.add_argument("--tenant", default=os.environ.get("ARQONBUS_TENANT", "demo"))
    parser.add_argument("--timeout", type=float, default=30.0, help="give up after this long")
    return parser.parse_args()


def message(text: str, personality: str, priority: str, **extra: Any) -> dict[str, Any]:
    return {
        "message": text,
        "metadata": {"personality": personality, "priority": priority, **extra},
    }


class Agent:
    """One agent: a connection, a subscription, and how it reacts to the other agent."""

    def __init__(self, name: str, personality: str, client: Client) -> None:
        self.name = name
        self.personality = personality
        self.client = client

    async def say(self, text: str, priority: str = "normal", **extra: Any) -> None:
        await self.client.publish(ROOM, CHANNEL, message(text, self.personality, priority, **extra))


async def lead(agent: Agent, steps: int) -> None:
    """Agent 1: announce, assign the plan's steps, close the phase once all are done."""
    async with agent.client.subscribe(ROOM, CHANNEL) as inbox:
        await agent.say("Starting analysis phase", "high", expected_duration="5_minutes")
        done: set[int] = set()
        async for item in inbox:
            if isinstance(item, Gap) or item.from_ == agent.name:
                continue
            kind = item.payload["metadata"].get("kind")
            if kind == "plan":
                for step, title in enumerate(item.payload["metadata"]["steps"], 1):
                    await agent.say(
                        f"Assigning step {step}: {title}", "high", kind="assign", step=step
                    )
            elif kind == "step_done":
                done.add(item.payload["metadata"]["step"])
                if len(done) == steps:
                    await agent.say("Analysis phase complete", "normal", kind="phase_done")
                    return


async def follow(agent: Agent, steps: int, ready: asyncio.Event) -> None:
    """Agent 2: answer an announcement with a plan, report every assigned step done."""
    async with agent.client.subscribe(ROOM, CHANNEL) as inbox:
        ready.set()
        async for item in inbox:
            if isinstance(item, Gap) or item.from_ == agent.name:
                continue
            kind = item.payload["metadata"].get("kind")
            if item.payload["message"] == "Starting analysis phase":
                plan = [f"survey sources part {n}" for n in range(1, steps + 1)]
                await agent.say("Acknowledged; here is my plan", "high", kind="plan", steps=plan)
            elif kind == "assign":
                step = item.payload["metadata"]["step"]
                await agent.say(f"Step {step} done", "normal", kind="step_done", step=step)
            elif kind == "phase_done":
                return


async def observe(client: Client, ready: asyncio.Event) -> list[Event]:
    """Print every message with its metadata until the phase is done."""
    seen: list[Event] = []
    async with client.subscribe(ROOM, CHANNEL) as feed:
        ready.set()
        async for item in feed:
            if isinstance(item, Gap):
                continue
            seen.append(item)
            meta = item.payload.get("metadata", {})
            print(
                f"#{item.seq} {item.from_:<17} [{meta.get('personality')}/{meta.get('priority')}] {item.payload['message']}",
                flush=True,
            )
            if meta.get("kind") == "phase_done":
                return seen
    return seen


async def main() -> None:
    args = parse_args()
    urls = args.url.split(",")
    second = urls[1:] + urls[:1]  # agent 2 and the observer prefer the other gateway
    async with (
        Client(urls, token=f"dev:{args.tenant}:research_agent_1") as c1,
        Client(second, token=f"dev:{args.tenant}:research_agent_2") as c2,
        Client(second, token=f"dev:{args.tenant}:observer") as c3,
    ):
        follower_ready, observer_ready = asyncio.Event(), asyncio.Event()
        observer = asyncio.create_task(observe(c3, observer_ready))
        follower = asyncio.create_task(
            follow(Agent("research_agent_2", "creative", c2), args.steps, follower_ready)
        )
        await asyncio.wait_for(
            asyncio.gather(follower_ready.wait(), observer_ready.wait()), args.timeout
        )
        async with asyncio.timeout(args.timeout):
            await lead(Agent("research_agent_1", "analytical", c1), args.steps)
            await follower
            seen = await observer
        print(
            f"coordination done: {len(seen)} messages, seqs in order: {[e.seq for e in seen] == sorted(e.seq for e in seen)}",
            flush=True,
        )


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
