"""Output lines: split from chunks, numbered, capped."""

from __future__ import annotations

from worker_agent.logs import TRUNCATED_MARK, LineBatcher


def test_chunks_become_numbered_lines_whatever_their_boundaries() -> None:
    batcher = LineBatcher()
    for chunk in ["hel", "lo\nwor", "ld\n", "\nlast without newline"]:
        batcher.feed(chunk)
    assert batcher.take() == (0, ("hello", "world", ""))
    batcher.finish()
    assert batcher.take() == (3, ("last without newline",))
    assert batcher.take() == (4, ())  # nothing waiting: the next line's number


def test_carriage_returns_are_dropped() -> None:
    batcher = LineBatcher()
    batcher.feed("windows line\r\n")
    assert batcher.take() == (0, ("windows line",))


def test_a_long_line_is_cut_and_marked() -> None:
    batcher = LineBatcher(max_line_chars=10)
    batcher.feed("x" * 25 + "\nshort\n")
    _, lines = batcher.take()
    assert lines == ("x" * 10 + TRUNCATED_MARK, "short")


def test_past_the_per_run_cap_nothing_more_is_kept() -> None:
    batcher = LineBatcher(max_lines=3)
    batcher.feed("".join(f"line {i}\n" for i in range(10)))
    assert batcher.take() == (0, ("line 0", "line 1", "line 2"))
    assert batcher.truncated
    batcher.feed("more\n")
    assert batcher.take() == (3, ())
    assert batcher.next_line == 3


def test_progress_frames_are_taken_apart_from_output_lines() -> None:
    batcher = LineBatcher()
    batcher.feed('before\n\x02hd1 {"event": "step_started", "step": "load"}\nduring\n')
    batcher.feed('\x02hd1 {"event": "metadata", "values": {"rows": 3}}\n')
    batcher.feed("\x02hd1 {not json}\n")  # a broken frame is dropped, not output
    assert batcher.take() == (0, ("before", "during"))
    items = batcher.take_progress()
    assert [(i.line_no, i.event, i.step) for i in items] == [
        (0, "step_started", "load"),
        (1, "metadata", None),
    ]
    assert items[1].values == {"rows": 3}
