"""A run's output never makes the agent publish what the contract refuses."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Iterator

import pytest

from hd_sdk.frames import encode_frame
from schemas import RunFailed, RunLog, RunProgress, RunSucceeded, encode, event_decoder
from worker_agent import limits
from worker_agent.logs import TRUNCATED_MARK, LineBatcher, LogForwarder
from worker_agent.progress import DROPPED, FRAME_PREFIX, parse_progress
from worker_agent.secrets import Redactor

pytestmark = pytest.mark.unit

RUN = uuid.uuid4()
decoder = event_decoder()


def travels(event: RunLog | RunProgress | RunSucceeded | RunFailed) -> None:
    """The event decodes on the other side as it was sent."""
    assert decoder.decode(encode(event)) == event


def frame(**fields: object) -> str:
    return FRAME_PREFIX + json.dumps(fields)


def drain(batcher: LineBatcher) -> list[tuple[int, tuple[str, ...]]]:
    batches = []
    while True:
        first, lines = batcher.take()
        if not lines:
            return batches
        batches.append((first, lines))


def test_nul_in_output_lines_becomes_the_replacement_character() -> None:
    batcher = LineBatcher()
    batcher.feed("a\x00b\nclean\n")
    first, lines = batcher.take()
    assert lines == ("a\ufffdb", "clean")
    travels(RunLog(run_id=RUN, attempt=1, agent_id="a1", first_line=first, lines=lines))


def test_a_line_of_wide_characters_is_cut_within_the_contract() -> None:
    batcher = LineBatcher(max_line_chars=100_000)
    batcher.feed("😀" * 20_000 + "\n")  # 80,000 UTF-8 bytes
    (first, (line,)), *_ = drain(batcher)
    assert line.endswith(limits.TRUNCATED_MARK)
    assert len(line.encode("utf-8")) <= 16 * 1024
    travels(RunLog(run_id=RUN, attempt=1, agent_id="a1", first_line=first, lines=(line,)))


def test_batches_hold_at_most_1000_lines_and_512_kib() -> None:
    batcher = LineBatcher(max_lines=100_000, max_line_chars=16 * 1024)
    batcher.feed("short\n" * 2500)
    batcher.feed(("x" * 16_000 + "\n") * 100)
    batcher.feed("\x01" * 2000 + "\n")  # control characters: 6 bytes each once encoded
    batches = drain(batcher)
    assert [len(lines) for _, lines in batches[:2]] == [1000, 1000]
    assert len(batches) > 4  # the long lines need batches of their own: 512 KiB each
    numbers = [first for first, _ in batches]
    sizes = [len(lines) for _, lines in batches]
    # Numbered without gap or overlap.
    assert numbers == [sum(sizes[:i]) for i in range(len(sizes))]
    assert sum(sizes) == 2601
    for first, lines in batches:
        assert len(lines) <= 1000
        assert sum(len(line.encode()) for line in lines) <= 512 * 1024
        event = RunLog(run_id=RUN, attempt=1, agent_id="a1", first_line=first, lines=lines)
        assert len(encode(event)) < 1024 * 1024
        travels(event)


def test_the_output_tail_keeps_the_last_lines_within_the_contract() -> None:
    lines = [f"line {i}\x00" for i in range(3000)]
    tail = limits.tail(lines, 5000)
    assert len(tail) == 1000
    assert tail[-1] == "line 2999\ufffd"
    wide = limits.tail(["\x01" * 16_000] * 200, 200)
    assert 0 < len(wide) < 200  # what fits in the budget, the last lines first
    for kept in (tail, wide):
        travels(RunSucceeded(run_id=RUN, attempt=1, agent_id="a1", output_tail=kept))


def test_the_batcher_keeps_the_last_output_lines_past_the_forwarding_limit() -> None:
    """The tail is the output's end even once lines are no longer forwarded; it is redacted,
    and frames are not output."""
    batcher = LineBatcher(max_lines=3, tail_lines=3, redact=lambda s: s.replace("pw", "***"))
    batcher.feed("".join(f"line {n}\n" for n in range(6)))
    batcher.feed(frame(event="step_started", step="s") + "\nthe pw\n")
    assert batcher.truncated
    assert batcher.take() == (0, ("line 0", "line 1", "line 2"))
    assert batcher.tail() == ("line 4", "line 5", "the ***")
    # A frame not understood is neither output nor tail; a carriage return ends a tail line
    # (the last state of a progress bar shows), and a tail line is cut as one.
    batcher.feed("\n".join([FRAME_PREFIX + "{not json", "10%\r50%\r100%", "x" * 100_000]) + "\n")
    tail = batcher.tail()
    assert tail[:2] == ("50%", "100%")
    assert tail[2].startswith("x") and tail[2].endswith(TRUNCATED_MARK)


def test_progress_strings_are_cleaned_and_cut() -> None:
    item = parse_progress(
        frame(event="log", message="m\u0000" * 5000, step="s\u0000", values={"k\u0000": "v\u0000"}),
        0,
    )
    assert item is not None and item is not DROPPED
    assert "\x00" not in (item.message or "") + (item.step or "")
    assert len((item.message or "").encode()) <= 4096
    assert item.values == {"k\ufffd": "v\ufffd"}
    travels(RunProgress(run_id=RUN, attempt=1, agent_id="a1", items=(item,)))


@pytest.mark.parametrize(
    "values",
    [
        {"big": "x" * (17 * 1024)},
        json.loads('{"a":' * 40 + "1" + "}" * 40),
        {"many": list(range(10_001))},
    ],
    ids=["too big", "too deep", "too many values"],
)
def test_progress_values_beyond_the_contract_drop_the_item(values: object) -> None:
    assert parse_progress(frame(event="metadata", values=values), 7) is DROPPED


def test_values_at_the_contract_s_depth_travel() -> None:
    values: dict[str, object] = {"leaf": 1}
    for _ in range(31):
        values = {"a": values}  # 32 objects deep
    item = parse_progress(frame(event="metadata", values=values, duration_s=1e12), 0)
    assert item is not None and item is not DROPPED
    assert item.duration_s is None  # beyond the contract's range
    travels(RunProgress(run_id=RUN, attempt=1, agent_id="a1", items=(item,)))


def test_a_dropped_frame_is_neither_output_nor_progress_and_keeps_the_numbering() -> None:
    batcher = LineBatcher()
    batcher.feed(frame(event="metadata", values={"big": "x" * 20_000}) + "\n")
    batcher.feed(frame(event="step_started", step="next") + "\nplain\n")
    items = batcher.take_progress()
    assert [(i.line_no, i.step) for i in items] == [(1, "next")]
    assert batcher.take() == (0, ("plain",))


def test_progress_batches_fit_in_a_message() -> None:
    batcher = LineBatcher()
    for _ in range(1200):
        batcher.feed(frame(event="metadata", values={"blob": "y" * 15_000}) + "\n")
    sent = 0
    while items := batcher.take_progress():
        event = RunProgress(run_id=RUN, attempt=1, agent_id="a1", items=items)
        assert len(items) <= 1000
        assert len(encode(event)) < 1024 * 1024
        sent += len(items)
    assert sent == 1200


#: A JSON integer no float can hold.
HUGE = "9" * 400


@pytest.mark.parametrize(
    "line",
    [
        FRAME_PREFIX + '{"event":"log","duration_s":' + HUGE + "}",
        FRAME_PREFIX + '{"event":"step_finished","duration_s":-' + HUGE + "}",
        FRAME_PREFIX + '{"event":"metadata","step":' + HUGE + ',"values":{"n":' + HUGE + "}}",
        FRAME_PREFIX + '{"event":"log","duration_s":1' + "0" * 5000 + "}",
    ],
    ids=["huge duration", "huge negative duration", "huge values", "too many digits"],
)
def test_a_frame_with_numbers_beyond_a_float_does_not_stop_the_output(line: str) -> None:
    batcher = LineBatcher()
    batcher.feed("before\n" + line + "\nafter\n")
    batcher.finish()
    lines = [text for _, batch in drain(batcher) for text in batch]
    assert lines[0] == "before" and lines[-1] == "after"
    items = batcher.take_progress()
    assert all(item.duration_s is None for item in items)
    if items:
        travels(RunProgress(run_id=RUN, attempt=1, agent_id="a1", items=items))


def test_a_frame_cut_short_never_travels_as_output_where_its_escapes_hide_a_secret() -> None:
    """A frame longer than a line may be is cut and no longer parses; as an output line, the
    JSON-escaped form of a secret (a quote, a backslash, non-ASCII) would pass the line's
    redaction. It is dropped instead."""
    secret = 'pa"ss\\wörd-42'
    batcher = LineBatcher(redact=Redactor([secret]))
    padding = {f"k{n}": "v" * 20 for n in range(30_000)}
    batcher.feed(encode_frame("metadata", values={"a": secret, **padding}) + "\nafter\n")
    batcher.finish()
    lines = [text for _, batch in drain(batcher) for text in batch]
    assert lines == ["after"]
    assert batcher.take_progress() == ()


def test_progress_frames_are_capped_per_run_as_lines_are() -> None:
    batcher = LineBatcher(max_items=5)
    batcher.feed("".join(encode_frame("log", message=f"m{n}") + "\n" for n in range(8)))
    assert [item.message for item in batcher.take_progress()] == [f"m{n}" for n in range(5)]
    assert batcher.progress_truncated
    assert not batcher.truncated  # no output line was left out


class Output:
    """A container's output stream: ``chunks``, then its end."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    def __iter__(self) -> Iterator[bytes]:
        yield from self.chunks

    def close(self) -> None:
        pass


class Runtime:
    """The one call of the container runtime that a LogForwarder makes."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    async def open_log_stream(self, container_id: str) -> Output:
        return Output(self.chunks)


def forwarder(chunks: list[bytes], publish: object, forward_lines: bool = True) -> LogForwarder:
    runtime: object = Runtime(chunks)
    return LogForwarder(
        runtime,  # type: ignore[arg-type]
        publish,  # type: ignore[arg-type]
        RUN,
        1,
        "a1",
        "c" * 64,
        batch_interval_s=0.05,
        forward_lines=forward_lines,
    )


async def test_output_after_an_unreadable_frame_still_leaves_the_host() -> None:
    sent: list[RunLog | RunProgress] = []

    async def publish(event: RunLog | RunProgress) -> None:
        travels(event)
        sent.append(event)

    poison = FRAME_PREFIX + '{"event":"log","duration_s":' + HUGE + "}"
    chunks = [b"first\n", poison.encode() + b"\n", b"second\nthird\n"]
    await forwarder(chunks, publish).run()
    lines = [line for event in sent if isinstance(event, RunLog) for line in event.lines]
    assert lines == ["first", "second", "third"]
    [item] = [item for event in sent if isinstance(event, RunProgress) for item in event.items]
    assert (item.event, item.duration_s) == ("log", None)


async def test_a_forwarder_that_fails_logs_why_instead_of_dying_silently(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def publish(event: RunLog | RunProgress) -> None:
        raise RuntimeError("a defect in publishing")

    with caplog.at_level(logging.ERROR, logger="worker_agent.logs"):
        task = asyncio.create_task(forwarder([b"line\n"], publish).run())
        await asyncio.wait_for(task, 10)
    assert task.exception() is None  # nothing left unretrieved on the task
    [record] = [r for r in caplog.records if r.name == "worker_agent.logs"]
    assert record.levelno == logging.ERROR
    assert record.exc_info is not None and isinstance(record.exc_info[1], RuntimeError)


def test_line_and_item_numbers_stay_within_postgresql_integers() -> None:
    batcher = LineBatcher(
        max_lines=2**40, max_items=2**40, next_line=2**31 - 3, next_item=2**31 - 1
    )
    batcher.feed("a\nb\nc\nd\n" + frame(event="log") + "\n" + frame(event="log") + "\n")
    first, lines = batcher.take()
    assert (first, lines) == (2**31 - 3, ("a", "b"))
    assert batcher.truncated
    travels(RunLog(run_id=RUN, attempt=1, agent_id="a1", first_line=first, lines=lines))
    [item] = batcher.take_progress()
    assert item.line_no == 2**31 - 1
    travels(RunProgress(run_id=RUN, attempt=1, agent_id="a1", items=(item,)))


def test_a_frame_after_output_with_no_line_break_is_read_as_a_frame() -> None:
    """A job that printed without a newline (a progress bar, print(..., end="")) left its
    next frame mid-line: forwarded as output, with a secret in its JSON escapes."""
    secret = 'p\u00e4ssword"x'
    batcher = LineBatcher(redact=Redactor([secret]))
    batcher.feed("connecting... " + encode_frame("metadata", values={"api": secret}) + "\n")
    batcher.finish()
    lines = [text for _, batch in drain(batcher) for text in batch]
    assert lines == ["connecting... "]
    [item] = batcher.take_progress()
    assert item.values == {"api": "***"}
