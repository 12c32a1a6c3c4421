"""The launcher: carries out instructions, starting an attempt's container or stopping one.

Promises kept here:
- a LaunchRun is acked only after its container started and RunLaunched was confirmed;
- an attempt's container is started only once the control plane granted this agent's claim
  of the attempt (``claims``); refused, it is removed unstarted;
- a redelivered LaunchRun adopts the container of the same name instead of starting another;
- an instruction that waits on purpose (no free slot or no room in the agent's capacity yet,
  Docker unreachable, its location still loading) is held unacked and retried here, never
  nacked back: the queues count every redelivery against a delivery limit. At shutdown or at
  the start of a drain it goes back to its queue (nacked), for another agent;
- a run that asks for more than the agent's whole capacity fails at once (LAUNCH_ERROR, with
  what it asks and what the agent offers): it could only wait forever here;
- on start, containers this agent labelled before are adopted and their state reported;
- a TerminateRun for an attempt with no container here (its LaunchRun still queued, held for
  a slot, or being launched) fences it: its LaunchRun is acked and never launched, and
  nothing is reported for it (the run is final on the control plane already).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import msgspec

from schemas import (
    FailureReason,
    Instruction,
    LaunchGranted,
    LaunchRun,
    RunClaimed,
    RunFailed,
    TerminateRun,
)
from schemas.resources import Resources, Shortfall
from transport.delivery import Delivery, settle
from transport.errors import BrokerRefused, BrokerUnavailable
from transport.ports import InboundDelivery

from . import limits, metrics
from .claims import Claims
from .containers import ContainerInfo
from .errors import DockerUnavailable, ImageMissing, LaunchFailed, LocationUnavailable
from .locations import LocationKeeper
from .ports import ContainerRuntime
from .reporter import Reporter
from .secrets import Redactor, Secrets
from .settings import AgentSettings
from .slots import Attempt, AttemptKey, Fence, Slots

log = logging.getLogger(__name__)

#: The agent's option that declares each dimension of its capacity.
FLAGS = {"cpus": "--cpus", "memory_limit_mb": "--memory-mb", "gpus": "--gpus"}

#: Pauses between tries of an instruction that waits for Docker or for its location.
FIRST_RETRY_S = 0.5
MAX_RETRY_S = 30.0
#: A claim with no answer for this long is sent again (the control plane may be away).
CLAIM_RESEND_S = 2.0


class Launcher:
    """Handles LaunchRun and TerminateRun; ``stopping`` ends every wait (shutdown)."""

    def __init__(
        self,
        settings: AgentSettings,
        runtime: ContainerRuntime,
        slots: Slots,
        reporter: Reporter,
        stopping: asyncio.Event,
        shutting_down: asyncio.Event | None = None,
    ) -> None:
        self.settings = settings
        self.runtime = runtime
        self.slots = slots
        self.reporter = reporter
        self.policy = settings.policy
        self.secrets = Secrets(directory=settings.secrets_dir, allowed=settings.allowed_secrets)
        #: Set by a drain or a shutdown: no new launch waits for anything.
        self._stopping = stopping
        #: Set by the shutdown only: a stop asked for is retried through a drain, not past it.
        self._shutting_down = shutting_down or stopping
        #: Set at start-up, before any instruction is consumed.
        self.keeper: LocationKeeper | None = None
        #: Claims waiting for the control plane's answer.
        self.claims = Claims()

    async def handle(self, delivery: Delivery[Instruction]) -> None:
        """Carry out one instruction. A defect is raised to the consumer (which dead-letters
        the instruction), after a LaunchRun's attempt was reported failed."""
        message = delivery.message
        try:
            if isinstance(message, LaunchRun):
                await self._launch(message, delivery.raw)
            elif isinstance(message, TerminateRun):
                await self._terminate(message, delivery.raw)
            elif isinstance(message, LaunchGranted):
                if message.agent_id == self.settings.agent_id:
                    self.claims.answer((message.run_id, message.attempt), True)
                await settle(delivery.raw.ack())
        except Exception as exc:
            if isinstance(message, LaunchRun):
                await self._report_defect(message, exc)
            raise

    # ------------------------------------------------------------------ launches

    async def _launch(self, launch: LaunchRun, raw: InboundDelivery) -> None:
        key = (launch.run_id, launch.attempt)
        attempt = await self._hold_slot(launch, raw)
        if attempt is None:
            return
        started = await self._start(launch, attempt, raw)
        if started is None:
            # Failed, refused, fenced or handed back: a second delivery of the attempt,
            # waiting on this one, is settled too (never left holding a prefetch slot).
            attempt.launched.set()
            return
        info, adopted = started
        container_id = info.id
        attempt.redact = Redactor(info.secrets)
        self.slots.bind(attempt, container_id)
        attempt.state = info.status
        attempt.started = info.ready
        self.reporter.forward_output(attempt, container_id)
        try:
            fence = self.slots.fenced(key)
            if fence is not None and not info.finished:
                # Terminated while its container was being created: stopped now, its end
                # reported as any terminated attempt's.
                self._terminating(attempt, fence)
                await self._stop(attempt, fence.grace_s)
            try:
                try:
                    await self.reporter.launched(*key, container_id, attempt.started)
                except BrokerRefused as exc:
                    # The broker is there but takes it not (a full queue, a permission): the
                    # container runs, so its launch is told until it is taken, then acked.
                    log.error("the broker refused the launch of run %s: %s", launch.run_id, exc)
                    await self.reporter.launched(
                        *key, container_id, attempt.started, until_sent=True
                    )
            except BrokerUnavailable as exc:
                # Not acked: the broker redelivers, and the redelivery adopts this container.
                log.error("could not report the launch of run %s: %s", launch.run_id, exc)
            else:
                await settle(raw.ack())
                if not adopted:
                    metrics.LAUNCHES.inc()
        finally:
            # Bound to its container whatever happened here: its end is reported when it
            # comes (the report waits for this), and a second delivery is not left waiting.
            attempt.launched.set()
        what = "adopted" if adopted else "started"
        log.info("run %s attempt %d %s container %s", *key, what, container_id[:12])
        if info.finished or self.reporter.exited_unbound(container_id):
            self.reporter.on_exit(container_id)

    async def _hold_slot(self, launch: LaunchRun, raw: InboundDelivery) -> Attempt | None:
        """A slot for the launch, and room for what its run asks, waiting in line for them if
        need be; None when there is nothing to launch (done before, fenced, or asking more
        than this agent offers in all: settled here) or the agent stops or drains (sent back to
        its queue)."""
        key = (launch.run_id, launch.attempt)
        need = Resources.asked(launch.cpus, launch.memory_limit_mb, launch.gpus)
        held = False
        while True:
            if self.slots.finished(key):
                log.info("run %s attempt %d already finished here; instruction acked", *key)
                await settle(raw.ack())
                return None
            existing = self.slots.attempts.get(key)
            if existing is not None:
                # A second delivery of an attempt this agent holds: report it again, then ack.
                await existing.launched.wait()
                if existing.container_id is not None:
                    await self.reporter.launched(*key, existing.container_id, existing.started)
                await settle(raw.ack())
                return None
            if self.slots.fenced(key) is not None:
                await self._drop_fenced(key, raw)
                return None
            if (never := self.slots.never_fits(need)) is not None:
                await self._refuse(launch, raw, never)
                return None
            attempt = self.slots.take(key, need)
            if attempt is not None:
                return attempt
            if not held:
                self._log_held(key, need)
                held = True
            attempt = await self.slots.wait_in_line(self._stopping, key, need)
            if attempt is not None:
                return attempt
            if self._stopping.is_set() and self.slots.fenced(key) is None:
                # Back to its queue now, for another agent: a drain keeps this channel open
                # for as long as its running containers take.
                await settle(raw.nack(requeue=True))
                return None

    def _log_held(self, key: AttemptKey, need: Resources) -> None:
        short = self.slots.lacks(need)
        if short is not None:
            log.info(
                "run %s attempt %d waits for room: it asks for %s, %s of %s are free",
                *key,
                short.asked_words,
                short.free_words,
                short.offered_words,
            )
        elif self.slots.free() == 0:
            # More deliveries than slots (prefetch changed while they were on their way).
            log.info("run %s attempt %d held until a slot frees", *key)
        else:
            log.info("run %s attempt %d waits behind runs that came before it", *key)

    async def _refuse(self, launch: LaunchRun, raw: InboundDelivery, short: Shortfall) -> None:
        """A run asking for more than this agent offers in all fails here at once: waiting
        would hold it forever, and handing it back would count against the queue's delivery
        limit at every turn (see docs/architecture.md, "Resources")."""
        why = (
            f"the run asks for {short.asked_words}; agent {self.settings.agent_id} offers "
            f"{short.offered_words} in all ({FLAGS[short.field]}), so it can never run there"
        )
        log.warning("run %s attempt %d refused: %s", launch.run_id, launch.attempt, why)
        await self._report_failed(launch, FailureReason.LAUNCH_ERROR, why)
        await settle(raw.ack())
        self.slots.release((launch.run_id, launch.attempt), reported=True)

    async def _drop_fenced(self, key: AttemptKey, raw: InboundDelivery) -> None:
        log.info("run %s attempt %d was terminated before it started; instruction acked", *key)
        await settle(raw.ack())

    async def _start(
        self, launch: LaunchRun, attempt: Attempt, raw: InboundDelivery
    ) -> tuple[ContainerInfo, bool] | None:
        """Start (or adopt) the container, retrying while Docker or the location is not there.

        The attempt is claimed while its container is being created, and the container is
        started only once the claim is granted (``claims``). None when the launch failed for
        good (reported and acked), was fenced or refused (acked), or the agent stops."""
        key = attempt.key
        delay = FIRST_RETRY_S
        #: A create was sent: once it may have landed, a fenced attempt is no longer dropped
        #: here (that could leave its container behind) but stopped once created, by _launch.
        create_sent = False
        claiming: asyncio.Task[None] | None = None
        #: When the attempt first found its location without a server that answers.
        location_since: float | None = None
        try:
            while True:
                try:
                    if not create_sent and await self._dropped(attempt, raw):
                        return None
                    if claiming is None:
                        # Sent now, answered while the container is being made.
                        self.claims.open(key)
                        claiming = asyncio.create_task(self._claim(launch, until_sent=True))
                    spec = launch
                    if launch.job is not None and launch.location is None:
                        raise LaunchFailed(f"job {launch.job!r} names no code location")
                    if launch.job is not None and self.keeper is not None:
                        spec = await self.keeper.launch_spec(launch)
                    self.policy.check_image(spec.image)
                    env, secret_keys = self.secrets.resolve(spec.env)
                    spec = msgspec.structs.replace(spec, env=env)
                    # Checked again: a code server may have taken its time. A TerminateRun
                    # that comes while the create is on its way is the one _launch catches.
                    if not create_sent and await self._dropped(attempt, raw):
                        return None
                    create_sent = True
                    info, adopted = await self.runtime.create(spec, secret_keys)
                    if info.agent_id != self.settings.agent_id:
                        # Another agent on this engine made the attempt's container: that
                        # agent holds the attempt (a LaunchRun that reached both), and what
                        # happens to the container is its business alone.
                        log.info(
                            "run %s attempt %d: its container %s is agent %s's; instruction acked",
                            *key,
                            info.id[:12],
                            info.agent_id or "(unknown)",
                        )
                        self.slots.release(key)
                        attempt.launched.set()
                        await settle(raw.ack())
                        return None
                    if info.status == "created":
                        if not await self._granted(launch, attempt, raw, info):
                            return None
                        info = await self.runtime.start(info)
                except (DockerUnavailable, LocationUnavailable) as exc:
                    what = (
                        "Docker engine unreachable"
                        if isinstance(exc, DockerUnavailable)
                        else "location not ready"
                    )
                    if isinstance(exc, LocationUnavailable):
                        # Waited for as long as a code server has to start, at most: the
                        # attempt holds a slot and its run meanwhile.
                        now = asyncio.get_running_loop().time()
                        location_since = location_since or now
                        if now - location_since > self.settings.location_startup_timeout_s:
                            waited = now - location_since
                            failed = LaunchFailed(f"{exc} (waited {waited:.0f} s)")
                            await self._failed(launch, attempt, raw, failed, create_sent)
                            return None
                    log.error("%s; run %s attempt %d retried in %.1f s: %s", what, *key, delay, exc)
                    if not await self._pause(delay):
                        self.slots.release(key)
                        return None
                    delay = min(delay * 2, MAX_RETRY_S)
                    continue
                except (ImageMissing, LaunchFailed) as exc:
                    await self._failed(launch, attempt, raw, exc, create_sent)
                    return None
                return info, adopted
        finally:
            if claiming is not None and not claiming.done():
                claiming.cancel()
            self.claims.close(key)

    async def _failed(
        self,
        launch: LaunchRun,
        attempt: Attempt,
        raw: InboundDelivery,
        exc: ImageMissing | LaunchFailed,
        create_sent: bool,
    ) -> None:
        """A launch that failed for good: reported, acked, its slot released."""
        key = attempt.key
        if not create_sent and await self._dropped(attempt, raw):
            return  # failed, but terminated meanwhile: nothing to report
        reason = (
            FailureReason.IMAGE_NOT_FOUND
            if isinstance(exc, ImageMissing)
            else FailureReason.LAUNCH_ERROR
        )
        log.warning("run %s attempt %d failed to launch: %s", *key, exc)
        await self._report_failed(launch, reason, str(exc))
        await settle(raw.ack())
        self.slots.release(key, reported=True)

    async def _claim(self, launch: LaunchRun, until_sent: bool = False) -> None:
        claim = RunClaimed(
            run_id=launch.run_id, attempt=launch.attempt, agent_id=self.settings.agent_id
        )
        if until_sent:
            await self.reporter.publish_until_sent(claim)
        else:
            await self.reporter.publish(claim)

    async def _granted(
        self, launch: LaunchRun, attempt: Attempt, raw: InboundDelivery, info: ContainerInfo
    ) -> bool:
        """Wait for the answer to the attempt's claim; True when granted. Refused (or
        terminated meanwhile), the container is removed unstarted and the instruction acked;
        when the agent stops first, the instruction goes back to its queue."""
        key = attempt.key
        while True:
            answer = await self.claims.wait(key, CLAIM_RESEND_S, self._stopping)
            # Granted, then terminated while the container was created (a cancel, a queue
            # timeout): the stop, which came last, wins; the container never starts.
            fenced = self.slots.fenced(key) is not None
            if answer is True and not fenced:
                return True
            refused = answer is False or fenced
            if refused or self._stopping.is_set():
                with contextlib.suppress(DockerUnavailable):
                    await self.runtime.remove(info.id)
                self.slots.release(key)
                attempt.launched.set()  # a second delivery of it, waiting on this one
                if refused:
                    why = "terminated" if fenced else "claim refused"
                    log.info("run %s attempt %d: %s; never started here", *key, why)
                    await settle(raw.ack())
                else:
                    await settle(raw.nack(requeue=True))
                return False
            log.warning(
                "run %s attempt %d: no answer to its claim in %.0f s; claiming again",
                *key,
                CLAIM_RESEND_S,
            )
            with contextlib.suppress(BrokerUnavailable):
                await self._claim(launch)

    async def _dropped(self, attempt: Attempt, raw: InboundDelivery) -> bool:
        """Whether the attempt, holding a slot but no container yet, was fenced; if so its
        slot is freed and its instruction acked."""
        if self.slots.fenced(attempt.key) is None:
            return False
        self.slots.release(attempt.key)
        attempt.launched.set()  # a second delivery of it, waiting on this one, is acked
        await self._drop_fenced(attempt.key, raw)
        return True

    async def _pause(self, seconds: float, until: asyncio.Event | None = None) -> bool:
        """Sleep ``seconds``; False if the agent began to stop (``until``: to shut down)
        meanwhile."""
        until = until or self._stopping
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(until.wait(), seconds)
        return not until.is_set()

    async def _report_failed(self, launch: LaunchRun, reason: FailureReason, why: str) -> None:
        await self.reporter.publish_until_sent(
            RunFailed(
                run_id=launch.run_id,
                attempt=launch.attempt,
                agent_id=self.settings.agent_id,
                reason=reason,
                message=limits.clip(limits.clean(why), limits.MAX_PROGRESS_TEXT_BYTES),
            )
        )

    async def _report_defect(self, launch: LaunchRun, exc: Exception) -> None:
        """A defect must not hold a slot forever: the attempt, if no container runs for it,
        is reported failed and its slot freed."""
        log.exception("LaunchRun for run %s attempt %d failed", launch.run_id, launch.attempt)
        key: AttemptKey = (launch.run_id, launch.attempt)
        attempt = self.slots.attempts.get(key)
        if self.slots.finished(key):
            return  # its end was reported: a failure now would contradict it
        if attempt is None or attempt.container_id is None:
            await self._report_failed(launch, FailureReason.LAUNCH_ERROR, f"agent error: {exc!r}")
            self.slots.release(key, reported=True)
            if attempt is not None:
                attempt.launched.set()

    # ---------------------------------------------------------------- terminations

    async def _terminate(self, terminate: TerminateRun, raw: InboundDelivery) -> None:
        """Stop an attempt's container; its end is reported with the reason given. An attempt
        with no container here yet is fenced: it never starts."""
        key = (terminate.run_id, terminate.attempt)
        # A claim waiting for its answer has it: the attempt does not start here.
        self.claims.answer(key, False)
        fence = Fence(
            reason=terminate.failure_reason or FailureReason.UNEXPECTED_TERMINATION,
            note=terminate.reason,
            grace_s=terminate.grace_s,
        )
        attempt = self.slots.attempts.get(key)
        if attempt is None or attempt.container_id is None:
            if not self.slots.finished(key):
                # Its LaunchRun may be on its way, held for a slot, or being launched.
                log.debug("run %s attempt %d fenced: terminated before it started", *key)
                self.slots.fence(key, fence)
        elif attempt.stopping_grace_s is not None and fence.grace_s >= attempt.stopping_grace_s:
            log.debug("run %s attempt %d: being stopped already", *key)
        elif not attempt.finishing:
            self._terminating(attempt, fence)
            if not await self._stop(attempt, fence.grace_s):
                return  # left unacked: back to its queue when the channel closes
        await settle(raw.ack())

    @staticmethod
    def _terminating(attempt: Attempt, fence: Fence) -> None:
        attempt.terminated = fence.reason
        attempt.terminate_note = fence.note
        log.info(
            "terminating run %s attempt %d: %s",
            attempt.run_id,
            attempt.attempt,
            fence.note or "asked to",
        )

    async def _stop(self, attempt: Attempt, grace_s: float) -> bool:
        """SIGTERM, then SIGKILL after ``grace_s``, retried while Docker is unreachable (a
        drain too); False when the agent began to shut down first."""
        assert attempt.container_id is not None
        delay = FIRST_RETRY_S
        attempt.stopping_grace_s = grace_s
        try:
            while True:
                try:
                    await self.runtime.stop(attempt.container_id, grace_s)
                    return True
                except DockerUnavailable as exc:
                    run_id = attempt.run_id
                    log.error("cannot terminate run %s (%s); retried in %.1f s", run_id, exc, delay)
                    if not await self._pause(delay, self._shutting_down):
                        return False
                    delay = min(delay * 2, MAX_RETRY_S)
        finally:
            attempt.stopping_grace_s = None

    # ------------------------------------------------------------------ adoption

    async def adopt(self) -> None:
        """Adopt this agent's containers and report their state (start, or Docker came back)."""
        for info in await self.runtime.list_managed():
            key = (info.run_id, info.attempt)
            if self.slots.finished(key):
                continue
            attempt = self.slots.attempts.get(key)
            if attempt is None and info.status == "created":
                # Created, never started: its claim was not granted before this agent
                # stopped, so its LaunchRun was not acked and comes back (here or elsewhere).
                log.info("removing container %s, created and never started", info.id[:12])
                await self.runtime.remove(info.id)
                continue
            if attempt is None:
                # What it holds is what its container was created with (HostConfig).
                attempt = Attempt(
                    *key, container_id=info.id, state=info.status, resources=info.resources
                )
                attempt.started = info.ready
                attempt.redact = Redactor(info.secrets)
                self.slots.adopt(attempt)
                log.info(
                    "adopted container %s of run %s attempt %d (%s)",
                    info.id[:12],
                    *key,
                    info.status,
                )
                await self.reporter.launched(*key, info.id, attempt.started, until_sent=True)
                attempt.launched.set()
            if info.finished or self.reporter.exited_unbound(info.id):
                self.reporter.on_exit(info.id)
