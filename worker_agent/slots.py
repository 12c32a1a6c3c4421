"""The agent's slots: attempts that hold one, deliveries waiting for one, attempts just reported.

An attempt holds a slot and the resources its run asks for (``schemas.resources``); a
delivery is taken only while a slot is free and the declared capacity has room for its run
on top of what the attempts hold. One that does not fit yet waits, unacked, in line: the
deliveries waiting are served first come, first served, so that a big run is not starved by
small ones that keep fitting. While one waits, prefetch is 0: a delivery taken now would
only wait behind it, where another agent may have room. Otherwise prefetch is the number of
free slots, so that the broker never hands out more launches than can start.

An attempt's slot, and its resources, are free again the moment its container's exit is
known (``exited``): the next launch does not wait for the exit's report or the container's
removal. The attempt is still listed, as "exited", until its final event was confirmed
(``release``); it is then listed as "reported" in heartbeats for a while, so that a monitor
reading a store that lags behind the broker sees "reported", not "missing".

An attempt terminated before its container existed here is fenced: remembered, never listed,
so that its LaunchRun, still queued or held for a slot, is dropped instead of launched.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from schemas import ContainerState, FailureReason
from schemas.bounds import MAX_IN_FLIGHT
from schemas.resources import Capacity, Resources, Shortfall
from transport.ports import Clock

from .secrets import Redactor

AttemptKey = tuple[uuid.UUID, int]

#: Finished (and fenced) attempts remembered, so that a LaunchRun of one is acked, not run.
REMEMBERED = 10_000
#: Reported attempts listed in a heartbeat at most (the most recent ones).
MAX_LISTED_REPORTED = 1000
#: Slots an agent may have: with every one held and the reported attempts listed, a heartbeat
#: lists no more attempts than the contract takes.
MAX_SLOTS = MAX_IN_FLIGHT - MAX_LISTED_REPORTED


@dataclass
class Attempt:
    """One attempt this agent holds a slot for."""

    run_id: uuid.UUID
    attempt: int
    container_id: str | None = None
    state: str = "launching"
    launched: asyncio.Event = field(default_factory=asyncio.Event)
    #: Set when its container's exit is known.
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    #: RunStarted was reported (at once, or when the ready check passed).
    started: bool = False
    #: Set by a TerminateRun: what the attempt's end is reported as.
    terminated: FailureReason | None = None
    terminate_note: str = ""
    #: The grace of the stop under way, if one is: a TerminateRun that would give no less
    #: adds no second stop (each holds one of the engine's threads for its whole grace).
    stopping_grace_s: float | None = None
    #: Follows the container's output while it runs (lines are forwarded when log forwarding
    #: is on); its result is the output's tail when it was read whole after the exit.
    forwarding: asyncio.Task[tuple[str, ...] | None] | None = None
    #: Its secret values, redacted from every output line that leaves the host.
    redact: Redactor = field(default_factory=Redactor)
    #: What its run asks for, held while it holds its slot.
    resources: Resources = field(default_factory=Resources)

    @property
    def finishing(self) -> bool:
        """Its container exited: it holds no slot, and waits for its report."""
        return self.exited.is_set()

    @property
    def key(self) -> AttemptKey:
        return (self.run_id, self.attempt)


@dataclass(frozen=True)
class Fence:
    """A TerminateRun for an attempt that had no container here: what it said."""

    reason: FailureReason
    note: str
    grace_s: float


@dataclass(frozen=True)
class Reported:
    """A finished attempt whose final event the broker confirmed."""

    container_id: str | None
    exit_code: int | None
    at: float


class Slots:
    """Who holds the agent's ``max_concurrent`` slots and its ``capacity``; ``on_change``
    when prefetch may change."""

    def __init__(
        self,
        max_concurrent: int,
        reported_for_s: float = 60.0,
        on_change: Callable[[], None] = lambda: None,
        clock: Clock = time.monotonic,
        capacity: Capacity | None = None,
    ) -> None:
        self.max_concurrent = max_concurrent
        self.capacity = capacity or Capacity()
        self.reported_for_s = reported_for_s
        self.attempts: dict[AttemptKey, Attempt] = {}
        #: Deliveries held, in the order they came, until there is room for them (a slot, and
        #: capacity).
        self._line: deque[object] = deque()
        self._on_change = on_change
        self._clock = clock
        self._by_container: dict[str, AttemptKey] = {}
        self._finished: OrderedDict[AttemptKey, Reported] = OrderedDict()
        self._fenced: OrderedDict[AttemptKey, Fence] = OrderedDict()
        #: Set when a slot frees or an attempt is fenced: waiting deliveries look again.
        self._freed = asyncio.Event()

    # ------------------------------------------------------------------ counting

    def free(self) -> int:
        """Slots no running attempt holds. Exited attempts being reported hold none, but all
        the attempts listed stay within what a heartbeat may list."""
        running = sum(1 for attempt in self.attempts.values() if not attempt.finishing)
        return max(0, min(self.max_concurrent - running, MAX_SLOTS - len(self.attempts)))

    @property
    def waiting(self) -> int:
        """Deliveries held until there is room for them."""
        return len(self._line)

    def prefetch(self) -> int:
        """Deliveries the broker may still hand out: the free slots, none while one waits."""
        return 0 if self._line else self.free()

    def held(self) -> Resources:
        """What the running attempts hold together."""
        total = Resources()
        for attempt in self.attempts.values():
            if not attempt.finishing:
                total += attempt.resources
        return total

    def lacks(self, need: Resources) -> Shortfall | None:
        """What a run asking ``need`` lacks now, on top of what the attempts hold."""
        return self.capacity.lacks(need, self.held())

    def never_fits(self, need: Resources) -> Shortfall | None:
        """What a run asking ``need`` lacks even with nothing else running here."""
        return self.capacity.lacks(need)

    def finished(self, key: AttemptKey) -> bool:
        return key in self._finished

    def fenced(self, key: AttemptKey) -> Fence | None:
        """The TerminateRun that came for ``key`` before its container existed here."""
        return self._fenced.get(key)

    # ------------------------------------------------------------------ holding

    def take(self, key: AttemptKey, need: Resources | None = None) -> Attempt | None:
        """Hold a slot, and ``need``, for ``key``; None when there is no room for it now, or
        deliveries that came before it wait for room."""
        need = need or Resources()
        if self._line or not self._room_for(need):
            return None
        return self._hold(key, need)

    def _room_for(self, need: Resources) -> bool:
        return self.free() > 0 and self.lacks(need) is None

    def _hold(self, key: AttemptKey, need: Resources) -> Attempt:
        attempt = self.attempts[key] = Attempt(*key, resources=need)
        self._on_change()
        return attempt

    async def wait_in_line(
        self, stopping: asyncio.Event, key: AttemptKey, need: Resources | None = None
    ) -> Attempt | None:
        """Wait in line until every delivery that came before has gone and there is room for
        ``need`` (a slot and capacity), then hold them for ``key``. None when, first, ``key``
        is fenced or held (by another delivery of it: the caller looks again), or
        ``stopping`` is set.

        Meanwhile prefetch is 0: the broker hands out no delivery that would wait behind it.
        """
        need = need or Resources()
        ticket = object()  # this delivery's place: another delivery of ``key`` has its own
        self._line.append(ticket)
        self._on_change()
        try:
            while True:
                if key in self._fenced or key in self.attempts or stopping.is_set():
                    return None
                if self._line[0] is ticket and self._room_for(need):
                    break
                self._freed.clear()
                freed = asyncio.ensure_future(self._freed.wait())
                stopped = asyncio.ensure_future(stopping.wait())
                try:
                    await asyncio.wait([freed, stopped], return_when=asyncio.FIRST_COMPLETED)
                finally:
                    freed.cancel()
                    stopped.cancel()
            return self._hold(key, need)
        finally:
            self._line.remove(ticket)
            # The next in line looks again: it may be first now, and there may be room left.
            self._freed.set()
            self._on_change()

    def fence(self, key: AttemptKey, fence: Fence) -> None:
        """Remember that ``key`` was terminated before its container existed here, so that
        the launcher drops its launch; a delivery held for a slot for it stops waiting."""
        self._fenced[key] = fence
        self._fenced.move_to_end(key)
        while len(self._fenced) > REMEMBERED:
            self._fenced.popitem(last=False)
        self._freed.set()

    def adopt(self, attempt: Attempt) -> None:
        """Count an attempt found running (adoption): it holds a slot and its resources, even
        past the limit or the capacity."""
        self.attempts[attempt.key] = attempt
        if attempt.container_id is not None:
            self._by_container[attempt.container_id] = attempt.key
        self._on_change()

    def bind(self, attempt: Attempt, container_id: str) -> None:
        """The attempt's container is known: events about it find the attempt."""
        attempt.container_id = container_id
        self._by_container[container_id] = attempt.key

    def of_container(self, container_id: str) -> Attempt | None:
        key = self._by_container.get(container_id)
        return self.attempts.get(key) if key is not None else None

    def exited(self, attempt: Attempt) -> None:
        """The attempt's container exited: its slot and resources are free from now on; it
        stays listed until ``release``."""
        attempt.exited.set()
        attempt.state = "exited"
        self._freed.set()
        self._on_change()

    def release(
        self, key: AttemptKey, reported: bool = False, exit_code: int | None = None
    ) -> None:
        """Free the attempt's slot and resources; ``reported``: its final event was
        confirmed."""
        attempt = self.attempts.pop(key, None)
        container_id = attempt.container_id if attempt is not None else None
        if container_id is not None:
            self._by_container.pop(container_id, None)
        if reported:
            self._finished[key] = Reported(container_id, exit_code, self._clock())
            self._finished.move_to_end(key)
            while len(self._finished) > REMEMBERED:
                self._finished.popitem(last=False)
        self._freed.set()
        self._on_change()

    # ------------------------------------------------------------------ reporting

    def in_flight(self, limit: int = MAX_IN_FLIGHT) -> tuple[ContainerState, ...]:
        """Attempts holding a slot, then those reported within ``reported_for_s``, newest
        first. Reported ones are left out past ``limit``; those holding a slot never are (more
        than ``limit`` of them is for the heartbeat to deal with)."""
        holding = [
            ContainerState(
                run_id=a.run_id, attempt=a.attempt, container_id=a.container_id, state=a.state
            )
            for a in self.attempts.values()
        ]
        room = min(MAX_LISTED_REPORTED, limit - len(holding))
        since = self._clock() - self.reported_for_s
        reported: list[ContainerState] = []
        for (run_id, attempt), done in reversed(self._finished.items()):
            if done.at < since or len(reported) >= room:
                break
            reported.append(
                ContainerState(
                    run_id=run_id,
                    attempt=attempt,
                    container_id=done.container_id,
                    state="reported",
                    exit_code=_exit_code(done.exit_code),
                )
            )
        return (*holding, *reported)


def _exit_code(code: int | None) -> int | None:
    """An exit code the contract accepts (-1 to 255), or None."""
    return code if code is not None and -1 <= code <= 255 else None
