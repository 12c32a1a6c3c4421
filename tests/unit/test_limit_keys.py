"""Concurrency limit keys: what each covers, and the words for a bad one."""

from __future__ import annotations

import uuid

import pytest

from dispatcher.errors import BadLimit
from dispatcher.limits import holds, parse
from schemas import SubmitRun

RUN = SubmitRun(
    run_id=uuid.uuid4(),
    image="busybox",
    queue="gpu",
    location=None,
    tags={"team": "ml", "tier": "a=b"},
)


@pytest.mark.parametrize(
    ("key", "covers"),
    [
        ("global", True),
        ("queue:gpu", True),
        ("queue:default", False),
        ("location:etl", False),
        ("tag:team=ml", True),
        ("tag:team=web", False),
        ("tag:tier=a=b", True),  # the value is everything after the first '='
        ("tag:team=", False),
    ],
)
def test_a_limit_covers_the_runs_its_key_names(key: str, covers: bool) -> None:
    assert parse(key, 1).covers(RUN) is covers


def test_a_job_run_falls_under_its_locations_limit() -> None:
    job = SubmitRun(run_id=uuid.uuid4(), location="etl", job="load")
    assert parse("location:etl").covers(job)
    assert not parse("location:other").covers(job)


def test_a_run_is_held_when_any_limit_covers_it() -> None:
    assert holds([parse("queue:default"), parse("tag:team=ml")], RUN)
    assert not holds([parse("queue:default")], RUN)
    assert not holds([], RUN)


@pytest.mark.parametrize(
    ("key", "words"),
    [
        ("bogus", "use global, queue:NAME, location:NAME or tag:KEY=VALUE"),
        ("host:x", "unknown limit 'host:x'"),
        ("queue:", "a queue limit names the queue"),
        ("location:", "a location limit names the location"),
        ("tag:team", "a tag limit is tag:KEY=VALUE"),
        ("tag:=ml", "a tag limit is tag:KEY=VALUE"),
        ("queue:" + "q" * 400, "at most 400 characters"),
        ("location:a b", "'a b' is no location's name"),
        ("queue:q/x", "'q/x' is no queue's name"),
    ],
)
def test_a_bad_key_is_refused_with_how_to_write_it(key: str, words: str) -> None:
    with pytest.raises(BadLimit, match=words.replace("(", r"\(")):
        parse(key, 1)


def test_a_limit_is_not_negative_nor_past_what_a_column_holds() -> None:
    for bad in (-1, 1_000_001, 99_999_999_999_999):
        with pytest.raises(BadLimit, match="a limit is 0 to 1,000,000 runs"):
            parse("global", bad)
