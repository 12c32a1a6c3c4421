"""Simulated agents' heartbeats, published as agents publish them: confirmed and persistent.

python bench/_heartbeats.py AMQP_URL FIRST COUNT START_AT END_AT [INTERVAL]

Agents ``sim-FIRST`` ... ``sim-(FIRST+COUNT-1)`` each beat every INTERVAL seconds (default 2),
spread evenly over the interval, from START_AT to END_AT (seconds since the epoch). A
publisher behind its schedule publishes as fast as it can and skips no beat, so its rate is
what this machine allows. Prints one JSON object: how far behind its schedule it fell, how
many beats the broker confirmed (and refused), the confirmed rate, its own CPU time, and the
agents that went silent for longer than the monitor's loss threshold (three intervals between
two confirmed beats), each with the time its first such silence began: from then on a
monitor is right to declare it lost.

Each heartbeat is an ``AgentHeartbeat`` encoded by the contract, with the properties an
agent's publisher sets (persistent, JSON, its message id and kind, and the connection's user
as ``user_id``, which the broker checks), published to the status exchange under the agent's
routing key on a channel in confirm mode. What makes it cheap is how it is sent: the AMQP
frames are written with pamqp straight to the socket (the publish frame of each agent is
encoded once), the beats due at each wake-up go out in one write, and the broker's confirms
(which acknowledge many publishes at once) are counted as they come instead of being
awaited one by one; at most FLIGHT publishes wait for theirs.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import sys
import time
import urllib.parse

from _harness import ROOT  # noqa: F401 - puts the project on the path
from pamqp import body, commands, frame, header, heartbeat

from schemas import AgentHeartbeat, encode
from schemas.topology import STATUS_EXCHANGE, heartbeat_routing_key

#: Publishes awaiting their confirm at once: enough to hide the broker's round trip (a quorum
#: queue confirms once its log is on disk), bounded so that a slow broker slows the publisher.
FLIGHT = 2000
#: The monitor's default loss threshold, in heartbeat intervals.
LOST_AFTER_BEATS = 3
#: The longest the publisher sleeps between two writes: beats due meanwhile go out together.
TICK_S = 0.01
CHANNEL = 1


class Refused(Exception):
    """The broker closed the channel or the connection (a refused user_id, a permission)."""


class Connection:
    """One AMQP 0-9-1 connection with one channel in confirm mode, publishing only."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, url: str) -> Connection:
        parts = urllib.parse.urlsplit(url)
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port or 5672)
        connection = cls(reader, writer)
        writer.write(frame.marshal(header.ProtocolHeader(), 0))
        await connection.expect(commands.Connection.Start)
        user = urllib.parse.unquote(parts.username or "guest")
        password = urllib.parse.unquote(parts.password or "guest")
        connection.send(
            0,
            commands.Connection.StartOk(
                client_properties={"product": "hd-bench-heartbeats"},
                response=f"\0{user}\0{password}",
            ),
        )
        tune = await connection.expect(commands.Connection.Tune)
        # No AMQP heartbeats: the publisher writes far more often than any timeout.
        connection.send(
            0, commands.Connection.TuneOk(channel_max=tune.channel_max, frame_max=tune.frame_max)
        )
        vhost = urllib.parse.unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
        connection.send(0, commands.Connection.Open(virtual_host=vhost))
        await connection.expect(commands.Connection.OpenOk)
        connection.send(CHANNEL, commands.Channel.Open())
        await connection.expect(commands.Channel.OpenOk)
        connection.send(CHANNEL, commands.Confirm.Select())
        await connection.expect(commands.Confirm.SelectOk)
        return connection

    def send(self, channel: int, value: commands.Frame) -> None:
        self.writer.write(frame.marshal(value, channel))

    async def read(self) -> object:
        """The next frame other than the broker's heartbeats."""
        while True:
            head = await self.reader.readexactly(7)
            size = int.from_bytes(head[3:7], "big")
            _, _, value = frame.unmarshal(head + await self.reader.readexactly(size + 1))
            if isinstance(value, commands.Connection.Close | commands.Channel.Close):
                raise Refused(f"{value.reply_code} {value.reply_text}")
            if not isinstance(value, heartbeat.Heartbeat):
                return value

    async def expect(self, kind: type[commands.Frame]) -> commands.Frame:
        value = await self.read()
        if not isinstance(value, kind):
            raise Refused(f"expected {kind.__name__}, got {value!r}")
        return value

    def close(self) -> None:
        self.writer.close()


async def main(
    url: str, first: int, count: int, start_at: float, end_at: float, interval: float
) -> dict[str, object]:
    # Readers refuse a status event without its publisher's (broker-checked) user_id.
    user = urllib.parse.unquote(urllib.parse.urlsplit(url).username or "") or None
    ids = [f"sim-{n:05d}" for n in range(first, first + count)]
    # Encoded once: the publish frame of each agent (exchange and routing key).
    publish = [
        frame.marshal(
            commands.Basic.Publish(exchange=STATUS_EXCHANGE, routing_key=heartbeat_routing_key(a)),
            CHANNEL,
        )
        for a in ids
    ]
    gap = interval / count
    silent = LOST_AFTER_BEATS * interval
    #: When each agent's last beat was confirmed (None: not yet, and unknown to a monitor).
    confirmed: list[float | None] = [None] * count
    silent_since: dict[str, float] = {}
    #: (delivery tag, agent) of each publish awaiting its confirm, oldest first.
    waiting: collections.deque[tuple[int, int]] = collections.deque()
    #: Tags settled one by one (``multiple`` unset) ahead of older ones: confirmed or not.
    early: dict[int, bool] = {}
    totals = {"published": 0, "confirmed": 0, "refused": 0}
    room = asyncio.Event()
    #: Set when no publish awaits its confirm.
    settled = asyncio.Event()

    def settle(tag: int, multiple: bool, ok: bool) -> None:
        """An ack (``ok``) or a nack of ``tag``, or of every tag up to it (``multiple``)."""
        if not multiple:
            early[tag] = ok
        now = time.time()
        while waiting:
            first, n = waiting[0]
            if first in early:
                confirmed_now = early.pop(first)
            elif multiple and first <= tag:
                confirmed_now = ok
            else:
                break
            waiting.popleft()
            if not confirmed_now:
                totals["refused"] += 1
                continue
            totals["confirmed"] += 1
            last = confirmed[n]
            if last is not None and now - last > silent:
                silent_since.setdefault(ids[n], last)
            confirmed[n] = now
        if len(waiting) < FLIGHT:
            room.set()
        if not waiting:
            settled.set()

    async def confirms(connection: Connection) -> None:
        while True:
            value = await connection.read()
            if isinstance(value, commands.Basic.Ack | commands.Basic.Nack):
                settle(value.delivery_tag, value.multiple, isinstance(value, commands.Basic.Ack))

    connection = await Connection.open(url)
    reader = asyncio.create_task(confirms(connection))
    behind = 0.0
    tag = 0
    try:
        await asyncio.sleep(max(0.0, start_at - time.time()))
        beat = 0  # beats scheduled so far, all agents together
        while (now := time.time()) < end_at:
            due = min(int((now - start_at) / gap) + 1, beat + FLIGHT - len(waiting))
            if due > beat:
                behind = max(behind, now - (start_at + beat * gap))
            frames = []
            for k in range(beat, due):
                n = k % count
                message = AgentHeartbeat(agent_id=ids[n], sequence=k // count, interval_s=interval)
                payload = encode(message)
                properties = commands.Basic.Properties(
                    content_type="application/json",
                    delivery_mode=2,
                    message_id=str(message.message_id),
                    message_type="AgentHeartbeat",
                    user_id=user,
                )
                frames += (
                    publish[n],
                    frame.marshal(header.ContentHeader(0, len(payload), properties), CHANNEL),
                    frame.marshal(body.ContentBody(payload), CHANNEL),
                )
                tag += 1
                waiting.append((tag, n))
            if frames:
                connection.writer.write(b"".join(frames))
                totals["published"] += due - beat
                beat = due
                await connection.writer.drain()
            if reader.done():
                reader.result()  # the broker closed the channel: say why
            if len(waiting) >= FLIGHT:
                room.clear()
                await asyncio.wait_for(room.wait(), 30)
            else:
                next_due = start_at + beat * gap
                await asyncio.sleep(min(TICK_S, max(0.0, next_due - time.time())))
        # The last confirms, for the silences they end.
        if waiting:
            settled.clear()
            await asyncio.wait([reader, asyncio.create_task(settled.wait())], timeout=30)
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Refused, asyncio.IncompleteReadError):
            await reader
        connection.close()
    for n, last in enumerate(confirmed):
        if last is not None and end_at - last > silent:
            silent_since.setdefault(ids[n], last)
    seconds = end_at - start_at
    return {
        "behind_s": round(behind, 3),
        **totals,
        "unconfirmed": len(waiting),
        "confirmed_per_s": round(totals["confirmed"] / seconds, 1),
        # This process's own CPU: what simulating the agents costs, apart from the broker.
        "cpu_s": round(time.process_time(), 2),
        "silent_since": silent_since,
    }


if __name__ == "__main__":
    url, first, count, start_at, end_at, *rest = sys.argv[1:]
    result = asyncio.run(
        main(
            url,
            int(first),
            int(count),
            float(start_at),
            float(end_at),
            float(rest[0]) if rest else 2.0,
        )
    )
    print(json.dumps(result), flush=True)
