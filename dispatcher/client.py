"""The Python client, for scripts: submit runs and follow them with only the AMQP URL.

async with Client("amqp://user:pass@host/") as client:
    run_id = await client.submit("busybox", ["sh", "-c", "echo hi"])
    outcome = await client.submit_and_wait("busybox", ["true"], timeout=60)

A submission is checked against the wire contract before it is sent (``InvalidSubmission``
names the field and the rule). A waiter follows its own runs only (a private queue bound to
each run's routing keys), through retries, until the control plane's ``RunEnded``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import uuid
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from schemas import (
    CancelRun,
    Event,
    FailureReason,
    InvalidMessage,
    RunAccepted,
    RunEnded,
    RunLog,
    RunProgress,
    RunRejected,
    RunStateWanted,
    SchemaError,
    SubmitRun,
    encode,
    event_decoder,
    request_decoder,
)
from schemas.topology import (
    CONTROL_SOURCE,
    REQUESTS_EXCHANGE,
    REQUESTS_ROUTING_KEY,
    STATUS_EXCHANGE,
    follow_pattern,
)
from transport.connection import TRANSIENT, Connection, connect
from transport.dead_letters import DeadLetter, peek_dead_letters
from transport.errors import BrokerRefused, BrokerUnavailable
from transport.publisher import Publisher
from transport.subscription import Subscription

from . import provenance, submissions
from .errors import InvalidSubmission, SubmissionRejected, VerdictUnreadable

_requests = request_decoder()

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunOutcome:
    """How a run ended, as the control plane's verdict said."""

    run_id: uuid.UUID
    succeeded: bool
    exit_code: int | None
    reason: str | None
    output_tail: tuple[str, ...]
    message: str = ""
    #: The attempt that ended the run (1 unless it was retried).
    attempt: int = 1
    #: SUCCESS, FAILURE or CANCELED.
    state: str = "FAILURE"

    @property
    def canceled(self) -> bool:
        return self.state == "CANCELED"

    @property
    def process_exit_code(self) -> int:
        """What a command-line tool waiting for this run should exit with: 0, the run's exit
        code (1 when it has none), or CANCELED_EXIT_CODE for a canceled run."""
        if self.succeeded:
            return 0
        if self.canceled:
            return CANCELED_EXIT_CODE
        return self.exit_code if self.exit_code else 1


#: A follower's ask that could not be sent is tried again after this long, doubled each
#: time up to the most.
ASK_RETRY_S, ASK_RETRY_MAX_S = 1.0, 15.0

#: What a waiter exits with when the run was canceled (as a process stopped by Ctrl-C).
CANCELED_EXIT_CODE = 130


class Follower:
    """Status events of chosen runs, from a private queue bound to each run's keys.

    One consumer reads the queue for as long as the follower lives and hands every event to
    every wait on it: two waits at once (a script waiting on two runs with ``gather``) each
    see all the events, and a wait that starts later sees what came before it too: the
    latest ``BACKLOG`` events but output and progress, and each run's last word (its
    acceptance, refusal or end) whatever came after. A broker's queue deals its messages out
    to its consumers in turn, so a consumer per wait lost each run's end to the other's.
    ``close`` it when done (``async with``): its channel is otherwise held for as long as
    the client's connection.

    The private queue goes with a lost connection, and what was sent to it meanwhile with
    it: once it is back, the follower asks the control plane (``RunStateWanted``) to say
    again where each run it follows is whose end it has not heard, and so hears the end of a
    run that ended in between.
    """

    #: Events kept for a wait that starts after they came.
    BACKLOG = 10_000

    def __init__(
        self,
        subscription: Subscription,
        run_ids: set[uuid.UUID],
        ask: Callable[[uuid.UUID], Awaitable[None]] | None = None,
    ) -> None:
        self._subscription = subscription
        self.run_ids = run_ids
        #: Sends a RunStateWanted for a run; None: nobody to ask.
        self._ask = ask
        self._asking: set[asyncio.Task[None]] = set()
        self._decoder = event_decoder()
        self._received: deque[Event | Unreadable] = deque(maxlen=self.BACKLOG)
        #: Each run's last word (RunAccepted, RunRejected, RunEnded), kept past the backlog.
        self._last_words: dict[uuid.UUID, Event | Unreadable] = {}
        #: Each wait's own queue of events; None marks the end of the stream.
        self._waits: set[asyncio.Queue[Event | Unreadable | None]] = set()
        self._reading: asyncio.Task[None] | None = None
        self._closed = False
        #: What a wait that outlived the stream says.
        self.why_ended = "the status stream ended"

    async def __aenter__(self) -> Follower:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def add(self, run_id: uuid.UUID) -> None:
        """Follow one more run (bind before submitting it, so that no event is missed)."""
        await self._subscription.bind(STATUS_EXCHANGE, follow_pattern(run_id))
        self.run_ids.add(run_id)

    def missed(self) -> None:
        """Events may have been lost (the private queue was restored after a loss): ask
        again about each run followed whose end (or refusal) has not come. A round still
        asking is replaced by this one."""
        if self._ask is None or self._closed:
            return
        for earlier in list(self._asking):
            earlier.cancel()
        open_runs = [
            run_id
            for run_id in sorted(self.run_ids)
            if not isinstance(self._last_words.get(run_id), RunEnded | RunRejected)
        ]
        if open_runs:
            task = asyncio.create_task(self._ask_about(open_runs))
            self._asking.add(task)
            task.add_done_callback(self._asking.discard)

    async def _ask_about(self, run_ids: list[uuid.UUID]) -> None:
        assert self._ask is not None
        log.info("the status stream was restored; asking how %d run(s) stand", len(run_ids))
        for run_id in run_ids:
            pause = ASK_RETRY_S
            while True:
                try:
                    await self._ask(run_id)
                    break
                except BrokerRefused as exc:
                    # Asking again changes nothing (no permission, no such exchange).
                    log.warning("could not ask how run %s stands: %s", run_id, exc)
                    break
                except BrokerUnavailable as exc:
                    # Asked again until it is sent: a run that ended meanwhile says nothing
                    # more of itself.
                    log.warning(
                        "could not ask how run %s stands (%s); again in %g s", run_id, exc, pause
                    )
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, ASK_RETRY_MAX_S)

    async def _read(self) -> None:
        try:
            async with contextlib.aclosing(self._subscription.messages()) as messages:
                async for raw in messages:
                    event: Event | Unreadable
                    try:
                        decoded: Event = self._decoder.decode(raw.body)
                        # Only what came from its own source: no agent forges a verdict.
                        provenance.check(raw.routing_key, decoded)
                        event = decoded
                    except SchemaError as exc:
                        # The control plane's verdict, unreadable to this client (a newer
                        # release's reason): said, rather than skipped and waited on for ever.
                        run_id = _ended_by_control(raw.routing_key)
                        if run_id is None:
                            continue
                        event = Unreadable(run_id, str(exc)[:300])
                    except provenance.Misrouted:
                        continue
                    if isinstance(
                        event, RunAccepted | RunRejected | RunEnded | Unreadable
                    ) and not (
                        # An acceptance said again may come after the end it preceded.
                        isinstance(event, RunAccepted)
                        and isinstance(
                            self._last_words.get(event.run_id), RunEnded | RunRejected | Unreadable
                        )
                    ):
                        self._last_words[event.run_id] = event
                    if not isinstance(event, RunLog | RunProgress):  # large, and not kept
                        self._received.append(event)
                    for wait in self._waits:
                        wait.put_nowait(event)
        except TRANSIENT as exc:
            # The connection went for good: every wait ends (``the status stream ended``).
            log.debug("a follower's stream ended: %r", exc)
        except BrokerUnavailable as exc:
            log.warning("a follower's stream ended: %s", exc)
            self.why_ended = f"the status stream ended: {exc}"
        except Exception:
            log.exception("a follower's stream failed")  # every wait ends all the same
        finally:
            for wait in self._waits:
                wait.put_nowait(None)

    async def events(self, answers: bool = False) -> AsyncGenerator[Any, None]:
        """Run events of the followed runs (and RunAccepted / RunRejected with ``answers``),
        those that came before this call first; ends with the stream."""
        mine: asyncio.Queue[Event | Unreadable | None] = asyncio.Queue()
        for event in self._received:
            mine.put_nowait(event)
        kept = {id(event) for event in self._received}
        for event in self._last_words.values():
            if id(event) not in kept:  # dropped from the backlog since: still told
                mine.put_nowait(event)
        ended = self._closed or (self._reading is not None and self._reading.done())
        if ended:
            mine.put_nowait(None)
        self._waits.add(mine)
        if self._reading is None and not self._closed:
            self._reading = asyncio.create_task(self._read())
        try:
            while (came := await mine.get()) is not None:
                if getattr(came, "run_id", None) not in self.run_ids:
                    continue
                if isinstance(came, RunAccepted | RunRejected) and not answers:
                    continue
                yield came
        finally:
            self._waits.discard(mine)

    async def close(self) -> None:
        """Stop reading and close the private queue's channel. Idempotent."""
        self._closed = True
        asking = list(self._asking)
        for task in asking:
            task.cancel()
        try:
            if asking:
                await asyncio.wait(asking)
            if self._reading is not None and not self._reading.done():
                self._reading.cancel()
                # Waited for, not awaited: a cancel of the caller itself is not swallowed.
                await asyncio.wait({self._reading})
        finally:
            # Every wait ends, also when the reader was cancelled before it ran at all.
            for wait in self._waits:
                wait.put_nowait(None)
            await self._subscription.close()


class Client:
    """Submits runs and follows their events; needs only the broker."""

    def __init__(self, amqp_url: str) -> None:
        self._url = amqp_url
        self._connection: Connection | None = None
        self._publisher: Publisher | None = None

    async def __aenter__(self) -> Client:
        # A client declares nothing: the control plane owns the topology.
        self._connection = await connect(self._url, "dispatcher-client")
        self._publisher = Publisher(self._connection)
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Idempotent; safe before ``__aenter__``."""
        if self._publisher is not None:
            await self._publisher.close()
            self._publisher = None
        if self._connection is not None:
            await self._connection.close()
            self._connection = None

    async def submit(
        self,
        image: str = "",
        command: Sequence[str] = (),
        *,
        location: str | None = None,
        job: str | None = None,
        config: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        queue: str = "default",
        idempotency_key: str | None = None,
        tags: Mapping[str, str] | None = None,
        run_id: uuid.UUID | None = None,
        max_runtime_s: float | None = None,
        start_timeout_s: float | None = None,
        queue_timeout_s: float | None = None,
        max_retries: int | None = None,
        retry_on: Sequence[FailureReason] | None = None,
        memory_limit_mb: int | None = None,
        cpus: float | None = None,
        gpus: int = 0,
        ready_check: Sequence[str] = (),
        priority: int = 0,
        check_only: bool = False,
    ) -> uuid.UUID:
        """Submit a run; returns its id once the broker has confirmed the request
        (``check_only``: only check it, as it would be before sending; no connection needed).

        ``max_runtime_s``, ``start_timeout_s``: the failure monitor fails (and stops) the run
        past them; ``queue_timeout_s``: it fails the run (QUEUE_TIMEOUT) still QUEUED after
        it; ``max_retries`` and ``retry_on`` override the retry policy (AGENT_LOST and
        UNEXPECTED_TERMINATION, twice); ``ready_check`` is a command run in the container,
        and the run counts as STARTED once it succeeds; ``priority`` orders the runs a
        concurrency limit holds back (higher first). ``memory_limit_mb``, ``cpus`` (fractions
        count) and ``gpus`` limit the container and are what an agent must have free to take
        the run; a run that no live agent of its queue could hold is refused (RunRejected:
        ``wait_for_outcome`` raises SubmissionRejected).
        """
        for name, value in (("command", command), ("ready_check", ready_check)):
            if isinstance(value, str | bytes):
                raise InvalidSubmission(
                    f"invalid submission: {name}: a list of arguments, not a string (split "
                    f"it: ['sh', '-c', {str(value)[:40]!r}])",
                    name,
                )
        with _as_invalid("submission"):
            message = SubmitRun(
                run_id=run_id or uuid.uuid4(),
                image=image,
                location=location,
                job=job,
                config=dict(config or {}),
                command=tuple(command),
                env=dict(env or {}),
                queue=queue,
                idempotency_key=idempotency_key,
                tags=dict(tags or {}),
                max_runtime_s=max_runtime_s,
                queue_timeout_s=queue_timeout_s,
                start_timeout_s=start_timeout_s,
                max_retries=max_retries,
                retry_on=tuple(retry_on) if retry_on is not None else None,
                memory_limit_mb=memory_limit_mb,
                cpus=cpus,
                gpus=gpus,
                ready_check=tuple(ready_check),
                priority=priority,
            )
        if check_only:
            check_submission(message)
            return message.run_id
        return await self.send(message)

    async def send(self, message: SubmitRun) -> uuid.UUID:
        """Submit a SubmitRun as it is (checked first, as ``submit`` does); returns its run id."""
        check_submission(message)  # a mistake is said as such, connected or not
        await self._request(message)
        return message.run_id

    async def cancel(self, run_id: uuid.UUID, grace_s: float = 30.0, reason: str = "") -> None:
        """Ask the control plane to cancel a run; returns once the broker has the request.

        A queued run never starts; a running one gets SIGTERM, then SIGKILL after ``grace_s``.
        Its end comes as any run's (``wait_for_outcome``: ``canceled``). Canceling a run that
        has ended, or is being canceled, changes nothing."""
        message = CancelRun(run_id=run_id, grace_s=grace_s, reason=reason)
        check_cancel(message)
        await self._request(message)

    async def _ask_state(self, run_id: uuid.UUID) -> None:
        """Ask the control plane to say again where ``run_id`` is (``RunStateWanted``)."""
        # A refusal stays one: asking again would change nothing (``Follower._ask_about``).
        await self._request(RunStateWanted(run_id=run_id), refused=BrokerRefused)

    async def _request(
        self,
        message: SubmitRun | CancelRun | RunStateWanted,
        refused: type[BrokerRefused | BrokerUnavailable] = BrokerUnavailable,
    ) -> None:
        """Publish a request to the control plane; a refusal of the broker's is raised as
        ``refused``, with the likely cause."""
        if self._publisher is None:
            raise BrokerUnavailable("the client is not connected; use `async with Client(...)`")
        try:
            await self._publisher.publish(REQUESTS_EXCHANGE, REQUESTS_ROUTING_KEY, message)
        except BrokerRefused as exc:
            raise refused(
                f"{exc} (is the control plane running? it declares {REQUESTS_EXCHANGE})"
            ) from exc

    async def dead_letters(self, limit: int = 20) -> list[DeadLetter]:
        """Up to ``limit`` dead letters, oldest first, with the queue each came from and why;
        they stay in the dead-letter queue."""
        if self._connection is None:
            raise BrokerUnavailable("the client is not connected; use `async with Client(...)`")
        return await peek_dead_letters(self._connection, limit)

    async def submit_job(
        self,
        location: str,
        job: str,
        config: Mapping[str, Any] | None = None,
        timeout: float = 30.0,
        **kwargs: Any,
    ) -> uuid.UUID:
        """Submit a job of a code location; returns the run id once the control plane accepted
        it, or raises SubmissionRejected naming the problem (no run exists then).

        ``kwargs`` are ``submit``'s limits and policy. A job run takes its image, command and
        environment from its location: ``env``, ``command`` or ``ready_check`` here raise
        InvalidSubmission before anything is sent.
        """
        run_id = kwargs.pop("run_id", None) or uuid.uuid4()
        async with await self.follow({run_id}) as follower:
            await self.submit(location=location, job=job, config=config, run_id=run_id, **kwargs)

            async def answer() -> uuid.UUID:
                async with contextlib.aclosing(follower.events(answers=True)) as events:
                    async for event in events:
                        if isinstance(event, RunRejected):
                            raise SubmissionRejected(event.reason)
                        if isinstance(event, RunAccepted | Unreadable):  # ended: accepted
                            return run_id
                raise BrokerUnavailable(follower.why_ended)

            return await asyncio.wait_for(answer(), timeout)

    async def follow(self, run_ids: set[uuid.UUID] | None = None) -> Follower:
        """Start receiving the events of ``run_ids`` (bind before submitting; ``add`` more)."""
        if self._connection is None:
            raise BrokerUnavailable("the client is not connected; use `async with Client(...)`")
        subscription = await Subscription.open(self._connection)
        follower = Follower(subscription, set(), ask=self._ask_state)
        await subscription.when_restored(follower.missed)
        for run_id in run_ids or ():
            await follower.add(run_id)
        return follower

    async def wait(
        self,
        run_id: uuid.UUID,
        timeout: float | None = None,
        on_event: Callable[[Any], None] | None = None,
    ) -> RunOutcome:
        """Wait for the end of a run submitted before, here or elsewhere: the control plane is
        asked where it stands (``RunStateWanted``), so a run that has ended already is told
        at once. A run id that names no run is waited for until ``timeout`` (TimeoutError).
        ``on_event`` as ``wait_for_outcome``'s."""
        async with await self.follow({run_id}) as follower:
            await self._ask_state(run_id)
            return await wait_for_outcome(follower, run_id, timeout, on_event)

    async def submit_and_wait(
        self,
        image: str,
        command: Sequence[str] = (),
        timeout: float | None = None,
        **kwargs: object,
    ) -> RunOutcome:
        """Submit a run and wait for its final event."""
        run_id = uuid.uuid4()
        async with await self.follow({run_id}) as follower:
            await self.submit(image, command, run_id=run_id, **kwargs)  # type: ignore[arg-type]
            return await wait_for_outcome(follower, run_id, timeout)


#: What a field whose pattern a value does not match must look like, in words.
_FORMS = {
    "image": "not an image reference (NAME, NAME:TAG or NAME@sha256:DIGEST, lowercase)",
    "queue": "a queue name is 1 to 64 letters, digits, '_' and '-', from a letter or digit",
}


def _non_finite(value: object) -> str | None:
    """Where in ``value`` (nested dicts and lists) a NaN or an infinity is, or None."""
    stack: list[tuple[str, object]] = [("", value)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return where
        if isinstance(item, Mapping):
            stack += [(f"{where}.{k}", v) for k, v in item.items()]
        elif isinstance(item, list | tuple):
            stack += [(f"{where}[{i}]", v) for i, v in enumerate(item)]
    return None


def check_submission(message: SubmitRun) -> None:
    """Refuse, before sending, what the control plane would refuse: raises InvalidSubmission.

    The submission goes through the very decoder the control plane uses, with its size
    limit, then the control plane's own rules (``dispatcher.submissions``: a job run sets no
    image, command, env or ready check; a ``secret:NAME`` reference has a safe NAME), so the
    two can never disagree.
    """
    # JSON has no NaN or infinity: encoded, they would arrive as null (no limit at all).
    for name in message.__struct_fields__:
        value = getattr(message, name)
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidSubmission(
                f"invalid submission: {name}: {value} is not a finite number", name
            )
    if (where := _non_finite(message.config)) is not None:
        raise InvalidSubmission(
            f"invalid submission: config{where}: not a finite number (JSON has no NaN or infinity)",
            "config",
        )
    try:
        _requests.decode(encode(message))
    except UnicodeError:
        raise InvalidSubmission(
            "invalid submission: text that is not UTF-8 (a byte the terminal's encoding "
            "could not decode?)"
        ) from None
    except InvalidMessage as exc:
        where = f"{exc.field}: " if exc.field else ""
        detail = exc.detail
        if "matching regex" in detail:  # the pattern itself tells a person nothing
            detail = _FORMS.get(exc.field or "", "not of the form it needs")
        raise InvalidSubmission(f"invalid submission: {where}{detail}", exc.field) from None
    except SchemaError as exc:
        raise InvalidSubmission(f"invalid submission: {exc}") from None
    if found := submissions.problem(message):
        raise InvalidSubmission(f"invalid submission: {found.field}: {found.reason}", found.field)


def check_cancel(message: CancelRun) -> None:
    """Refuse, before sending, a cancel the control plane could not read (a reason past the
    contract's bound, a grace out of range): raises InvalidSubmission. Sent, it would be
    dead-lettered unanswered while the command said "cancel requested"."""
    if not math.isfinite(message.grace_s):
        raise InvalidSubmission(f"invalid cancel: grace_s: {message.grace_s} is no finite number")
    try:
        _requests.decode(encode(message))
    except UnicodeError:
        raise InvalidSubmission("invalid cancel: a reason that is not UTF-8") from None
    except InvalidMessage as exc:
        where = f"{exc.field}: " if exc.field else ""
        raise InvalidSubmission(f"invalid cancel: {where}{exc.detail}", exc.field) from None
    except SchemaError as exc:
        raise InvalidSubmission(f"invalid cancel: {exc}") from None


@contextlib.contextmanager
def _as_invalid(what: str) -> Iterator[None]:
    """A message the contract refuses as it is built (``OutOfBounds``: a config nested too
    deep, a key too long in bytes) is an ``InvalidSubmission``, as ``check_submission``'s are."""
    try:
        yield
    except InvalidMessage as exc:
        where = f"{exc.field}: " if exc.field else ""
        raise InvalidSubmission(f"invalid {what}: {where}{exc.detail}", exc.field) from None


@dataclass(frozen=True)
class Unreadable:
    """A verdict of the control plane (``run.ended._control.<run_id>``) this client could
    not decode."""

    run_id: uuid.UUID
    why: str


def _ended_by_control(routing_key: str) -> uuid.UUID | None:
    """The run a ``RunEnded`` routing key of the control plane's names, else None."""
    kind, _, rest = routing_key.partition(f".{CONTROL_SOURCE}.")
    if kind != "run.ended":
        return None
    try:
        return uuid.UUID(rest)
    except ValueError:
        return None


async def wait_for_outcome(
    follower: Follower,
    run_id: uuid.UUID,
    timeout: float | None,
    on_event: Callable[[Any], None] | None = None,
) -> RunOutcome:
    """Wait for the run's end (``RunEnded``), through its retries; ``on_event`` sees every
    event of the run on the way (launched, started, each attempt's outcome, retries).

    Raises SubmissionRejected when the control plane refused the submission.
    """

    async def until_final() -> RunOutcome:
        under_way = False  # a refusal after the run was seen under way is not this run's
        async with contextlib.aclosing(follower.events(answers=True)) as events:
            async for event in events:
                if event.run_id != run_id:
                    continue
                if isinstance(event, RunRejected) and not under_way:
                    raise SubmissionRejected(event.reason)
                under_way = True
                if isinstance(event, RunAccepted | RunRejected):
                    continue
                if isinstance(event, Unreadable):
                    raise VerdictUnreadable(
                        f"run {run_id} ended, but this client cannot read how "
                        f"({event.why}): it came from a newer control plane; upgrade the "
                        "client, or see `dispatcher runs show` there"
                    )
                if on_event is not None:
                    on_event(event)
                if isinstance(event, RunEnded):
                    return outcome_of(event)
        raise BrokerUnavailable(follower.why_ended)

    return await asyncio.wait_for(until_final(), timeout)


def outcome_of(event: RunEnded) -> RunOutcome:
    """The outcome the control plane's verdict states."""
    return RunOutcome(
        event.run_id,
        event.state == "SUCCESS",
        event.exit_code,
        event.reason.value if event.reason is not None else None,
        event.output_tail,
        event.message,
        event.attempt,
        event.state,
    )
