"""The outbox relay: publishes what the store committed, woken by LISTEN/NOTIFY."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Sequence

from schemas import encode, kind_of
from schemas.topology import CONTROL_EXCHANGE, INSTRUCTIONS_EXCHANGE
from transport.errors import BrokerRefused, BrokerUnavailable
from transport.publisher import Publisher
from transport.topology import declare_target

from . import metrics
from .errors import StoreUnavailable
from .store import Database, OutboxItem, OutboxRow, outbox

log = logging.getLogger(__name__)


#: Hand-offs in flight at most: past them, a writer writes its rows due, for the relay's
#: round, rather than leasing rows that would wait behind a backlog past their lease.
MAX_HANDING = 4


#: The exchanges whose queues are declared before their first message (``declare_target``);
#: what goes elsewhere (run events, answers keyed by run id) needs none, and is not
#: remembered: one entry a run, for as long as the process lives, was memory without end.
DECLARED_FOR = frozenset({INSTRUCTIONS_EXCHANGE, CONTROL_EXCHANGE})
#: A declaration is made again after this long: a control queue unused for a week expires,
#: and a TerminateRun must not be published to a queue that is no more.
REDECLARE_S = 3600.0
#: At most this many declarations remembered (agents and queues); past it, all are forgotten.
MAX_DECLARED = 10_000


class OutboxRelay:
    """Publishes unsent outbox rows with confirms, then marks them sent.

    It starts with whatever was left unsent and due (a crash loses nothing), then sleeps until
    a NOTIFY from a committing transaction wakes it; ``idle_poll_s`` is a safety net and the
    pace at which delayed rows (retry backoff) and rows whose lease ran out become due.
    Rows a writer of its own process just committed are handed to it (``hand_off``).
    """

    def __init__(
        self,
        store: Database,
        publisher: Publisher,
        batch: int = 500,
        idle_poll_s: float = 0.5,
    ) -> None:
        self._store = store
        self._publisher = publisher
        self._batch = batch
        self._idle_poll_s = idle_poll_s
        #: Queues declared for instructions and control messages (exchange, key), and when.
        self._declared: dict[tuple[str, str], float] = {}
        self._handing: set[asyncio.Task[None]] = set()
        # One publish of a batch at a time: a refusal closes the channel under every publish
        # in flight on it, and only a row refused again on its own is set aside.
        self._publishing = asyncio.Lock()

    async def run(self) -> None:
        """Relay until cancelled."""
        while True:
            try:
                async with self._store.listen_outbox() as wait_for_notify:
                    while True:
                        sent = await self._store.publish_outbox(self._publish, self._batch)
                        if sent < self._batch:
                            await wait_for_notify(self._idle_poll_s)
            except (StoreUnavailable, BrokerUnavailable) as exc:
                log.error("outbox relay: %s; retrying in 1 s", exc)
                await asyncio.sleep(1.0)

    def takes_hand_offs(self) -> bool:
        """Whether a writer may lease its rows to this relay now (few hand-offs in flight)."""
        return len(self._handing) < MAX_HANDING

    def hand_off(self, items: Sequence[OutboxItem]) -> None:
        """Publish outbox rows that a writer of this process just committed, leased to it
        (``outbox.LEASE_S``), with no NOTIFY to wait for and no claim of the rows first.

        Published rows are marked sent. Rows the broker refuses, or every row when the broker
        fails or has not confirmed them within half the lease, are handed back: due at once,
        the relay's round takes them (and sets aside those refused again). Should this
        process die, or the store fail, before they are settled, any relay takes them once
        the lease is over: published twice at worst, which agents absorb.
        """
        if items:
            task = asyncio.create_task(self._hand_off(items), name="hand-off")
            self._handing.add(task)
            task.add_done_callback(self._handing.discard)

    async def drain(self, timeout: float) -> None:
        """Wait (up to ``timeout``) for the hand-offs in flight: at shutdown, before the
        publisher and the store close under them."""
        if self._handing:
            await asyncio.wait(set(self._handing), timeout=timeout)

    async def _hand_off(self, items: Sequence[OutboxItem]) -> None:
        refused: dict[int, str]
        try:
            rows = [
                OutboxRow(
                    index,
                    item.exchange,
                    item.routing_key,
                    kind_of(item.message),
                    item.message.message_id,
                    encode(item.message),
                    getattr(item.message, "run_id", None),
                    getattr(item.message, "attempt", 0),
                )
                for index, item in enumerate(items)
            ]
            # In this task (``wait_for`` would make one more): the publish's frames are
            # queued the first time this task runs.
            async with asyncio.timeout(outbox.LEASE_S / 2):
                refused = await self._publish(rows)
        except Exception as exc:  # the relay's own round takes them then
            log.warning("outbox relay: %d handed row(s) handed back: %r", len(items), exc)
            rows, refused = [], {}
            back = [item.message.message_id for item in items]
        else:
            back = [row.message_id for row in rows if row.id in refused]
        try:
            await self._store.settle_handed(
                [row.message_id for row in rows if row.id not in refused], back
            )
        except Exception as exc:  # the lease runs out: any relay takes them
            log.warning(
                "outbox relay: %d handed row(s) not settled (sent again after %.0f s): %r",
                len(items),
                outbox.LEASE_S,
                exc,
            )

    async def _publish(self, rows: Sequence[OutboxRow]) -> dict[int, str]:
        """Publish rows with confirms; return those the broker refused (id → why).

        A refusal concerns one row (a queue name the broker rejects, say): it is set aside
        with its reason and never blocks the rows behind it. A lost broker raises instead,
        and the whole batch is tried again.
        """
        async with self._publishing:
            return await self._publish_alone(rows)

    async def _publish_alone(self, rows: Sequence[OutboxRow]) -> dict[int, str]:
        refused: dict[int, str] = {}
        now = asyncio.get_running_loop().time()
        for target in {(row.exchange, row.routing_key) for row in rows}:
            if (
                target[0] not in DECLARED_FOR
                or now - self._declared.get(target, -1e18) < REDECLARE_S
            ):
                continue
            try:
                await declare_target(await self._publisher.channel(), *target)
                if len(self._declared) >= MAX_DECLARED:
                    self._declared.clear()
                self._declared[target] = now
            except BrokerRefused as exc:
                refused.update(
                    {row.id: str(exc) for row in rows if (row.exchange, row.routing_key) == target}
                )
        pending = [row for row in rows if row.id not in refused]
        results: list[BaseException | None]
        if len(pending) == 1:
            # A lone row (a lone submission's) is published in this task: its frames are
            # queued before whatever its writer does next (a hand-off's log line and ack).
            results = [await _outcome(self._publish_one(pending[0]))]
        else:
            results = await asyncio.gather(
                *(self._publish_one(row) for row in pending), return_exceptions=True
            )
        doubtful = []
        for row, result in zip(pending, results, strict=True):
            if isinstance(result, BrokerRefused):
                doubtful.append(row)
            elif isinstance(result, BaseException):
                raise result
        # A refusal closes the channel under every publish in flight on it: only a row
        # refused again on its own is set aside.
        for row in doubtful:
            try:
                await self._publish_one(row)
            except BrokerRefused as exc:
                refused[row.id] = str(exc)
        metrics.LAUNCHES.inc(
            sum(1 for row in rows if row.kind == "LaunchRun" and row.id not in refused)
        )
        log.debug("outbox relay: published %d, refused %d", len(rows) - len(refused), len(refused))
        return refused

    async def _publish_one(self, row: OutboxRow) -> None:
        await self._publisher.publish_raw(
            row.exchange,
            row.routing_key,
            row.payload,
            message_id=str(row.message_id),
            kind=row.kind,
        )


async def _outcome(publishing: Awaitable[None]) -> BaseException | None:
    """What ``gather(..., return_exceptions=True)`` makes of one awaitable."""
    try:
        await publishing
    except Exception as exc:
        return exc
    return None
