"""The log view against the real broker: a catch-up reads every partition of every topic to
its end with each event's position, a later catch-up reads only what came since, a started
view follows, a lookup view that starts following keeps its positions, a quiet view stops
fetching until the journal has a record for it, a record that does not decode is skipped
(not fatal, not dead-lettered), and stop joins the thread."""

from __future__ import annotations

import threading

import pytest

from mlbus.errors import TransientError
from mlbus.kafka.logview import LogView, Positioned
from tests.mlbus.kafka.support import (
    dataset,
    dead_letters,
    produce_raw,
    progress,
    publish,
    read_raw,
    wait_until,
)

TYPES = ["training.progress", "dataset.created"]


def _progress(n: int, start: int = 0) -> list:
    return [progress(run_id=f"r{i}", model=f"m{i}", epoch=i) for i in range(start, start + n)]


def _where(kafka, event_type: str) -> dict[str, tuple[int, int]]:
    """Event id → (partition, offset), read with a plain client."""
    from mlbus.schemas.codec import decode

    return {
        decode(m.value(), m.headers()).id: (m.partition(), m.offset())
        for m in read_raw(kafka, kafka.topic(event_type))
    }


def test_a_catch_up_reads_every_partition_of_every_topic_with_positions(kafka):
    refs = publish(kafka, _progress(24)) + publish(kafka, [dataset(name=f"d{i}") for i in range(9)])
    folded: list[Positioned] = []
    with LogView(kafka, TYPES, on_event=folded.append) as view:
        assert not view.caught_up
        items = view.catch_up()
        assert view.caught_up
    assert items == folded
    assert sorted(i.event.id for i in items) == sorted(r.id for r in refs)
    where = _where(kafka, "training.progress") | _where(kafka, "dataset.created")
    assert {i.event.id: (i.partition, i.offset) for i in items} == where
    assert {i.topic for i in items} == set(TYPES)  # contract names, without the prefix
    assert len({i.partition for i in items if i.topic == "training.progress"}) > 1
    for item in items:
        assert item.event.type == item.topic and item.position == (item.partition, item.offset)
    # In log order within each partition.
    for topic in TYPES:
        for p in {i.partition for i in items}:
            offsets = [i.offset for i in items if i.topic == topic and i.partition == p]
            assert offsets == sorted(offsets)


def test_a_later_catch_up_reads_only_what_came_since_and_empty_topics_end_at_once(kafka):
    with LogView(kafka, ["serving.alert"]) as empty:
        assert empty.catch_up() == [] and empty.caught_up
    first = publish(kafka, _progress(5))
    with LogView(kafka, ["training.progress"]) as view:
        assert [i.event.id for i in view.catch_up()] != []
        assert view.catch_up() == []  # nothing new: the ends are found again at once
        new = publish(kafka, _progress(7, start=100))
        again = view.catch_up()  # announced a moment ago: a lookup sees it
        assert sorted(i.event.id for i in again) == sorted(r.id for r in new)
        assert sum(view.positions.values()) == len(first) + len(new)


def test_a_started_view_catches_up_then_follows(kafka):
    before = publish(kafka, _progress(6))
    seen: list[str] = []
    view = LogView(kafka, ["training.progress"], on_event=lambda i: seen.append(i.event.id))
    view.start()
    try:
        assert view.wait(30), "the view never caught up"
        assert sorted(seen) == sorted(r.id for r in before)
        after = publish(kafka, _progress(4, start=50))
        wait_until(lambda: len(seen) == 10, lambda: f"followed events ({len(seen)} of 10)")
        assert sorted(seen[6:]) == sorted(r.id for r in after)
        # A lookup from another thread while the view follows: serialised with the thread,
        # and every record still folded exactly once.
        last = publish(kafka, _progress(1, start=99))
        view.catch_up()
        assert seen[-1] == last[0].id
    finally:
        view.stop()
    assert len(seen) == len(set(seen)) == 11


def test_a_lookup_view_that_starts_following_keeps_its_positions(kafka):
    # Catch-ups alone use a client that waits briefly per fetch; following needs another
    # (the process's fetch wait): the switch loses and repeats nothing.
    before = publish(kafka, _progress(5))
    seen: list[str] = []
    with LogView(kafka, ["training.progress"], on_event=lambda i: seen.append(i.event.id)) as view:
        assert sorted(i.event.id for i in view.catch_up()) == sorted(r.id for r in before)
        between = publish(kafka, _progress(3, start=20))
        items: list[Positioned] = []

        def polled(n: int) -> bool:
            items.extend(view.poll(0.2))
            return len(items) >= n

        wait_until(lambda: polled(3), lambda: f"polled events ({len(items)} of 3)")
        assert sorted(i.event.id for i in items) == sorted(r.id for r in between)
        after = publish(kafka, _progress(2, start=40))
        wait_until(lambda: polled(5), lambda: f"followed events ({len(items)} of 5)")
        assert view.catch_up() == []
    assert sorted(seen) == sorted(r.id for r in before + between + after)
    assert len(seen) == len(set(seen))


def test_a_quiet_view_stops_fetching_and_the_journal_wakes_it(journaled):
    # Where `mlbus up` keeps a journal, a followed view that has read nothing for a while
    # pauses its partitions (an idle fetch costs the broker) and resumes when the journal
    # has a record past its positions (only then, here: no wake-up by time).
    seen: list[str] = []
    view = LogView(journaled, ["training.progress"], on_event=lambda i: seen.append(i.event.id))
    view.start()
    try:
        assert view.wait(30), "the view never caught up"
        for expected in (3, 6):
            wait_until(lambda: view.quiet, "the view to go quiet")
            sent = publish(journaled, _progress(3, start=expected))
            wait_until(lambda n=expected: len(seen) == n, lambda: f"events seen: {seen}")
            assert sorted(seen[-3:]) == sorted(r.id for r in sent)
    finally:
        view.stop()
    assert len(seen) == len(set(seen)) == 6


def test_a_record_that_does_not_decode_is_skipped_not_fatal_and_not_dead_lettered(kafka):
    topic = kafka.topic("training.progress")
    good = publish(kafka, _progress(1), key=b"k")
    poison = produce_raw(kafka, topic, b"{not json", key=b"k")
    wrong = produce_raw(kafka, topic, b'{"specversion": "1.0"}', key=b"k")
    after = publish(kafka, _progress(1, start=1), key=b"k")
    with LogView(kafka, ["training.progress"]) as view:
        items = view.catch_up()
        assert [i.event.id for i in items] == [good[0].id, after[0].id]
        assert [i.offset for i in items] == [poison.offset - 1, wrong.offset + 1]
        assert view.skipped == 2
        assert view.positions[("training.progress", poison.partition)] == wrong.offset + 2
    assert dead_letters(kafka) == []


def test_stop_joins_the_thread_and_ends_the_view(kafka):
    publish(kafka, _progress(3))
    view = LogView(kafka, ["training.progress"]).start()
    assert view.wait(30)
    threads = [t for t in threading.enumerate() if t.name == view.name]
    assert threads
    view.stop()
    assert not any(t.is_alive() for t in threads)
    with pytest.raises(TransientError):
        view.catch_up()


def test_a_fold_that_fails_stops_the_thread_and_wait_says_so(kafka):
    publish(kafka, _progress(1))

    def broken(item: Positioned) -> None:
        raise ValueError("a bug in the fold")

    view = LogView(kafka, ["training.progress"], on_event=broken).start()
    try:
        with pytest.raises(TransientError, match="a bug in the fold"):
            view.wait(30)
    finally:
        view.stop()
