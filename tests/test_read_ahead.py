"""`runtime.read_ahead`: the next items are worked on while the caller uses the current one, in order,
with failures reported at their own item, a bounded number in flight, and nothing new after an early stop."""

from __future__ import annotations

import threading
import time

import pytest

from m2dx_clinic.runtime import read_ahead


class Recorder:
    """Work that sleeps a little, remembers which items started and in which thread, and fails on 3."""

    def __init__(self) -> None:
        self.started: list[int] = []
        self.threads: set[str] = set()
        self.lock = threading.Lock()

    def __call__(self, item: int) -> int:
        with self.lock:
            self.started.append(item)
            self.threads.add(threading.current_thread().name)
        time.sleep(0.02)
        if item == 3:
            raise ValueError(f"item {item} is unreadable")
        return item * 10


@pytest.mark.parametrize("workers", [0, 1, 2, 4])
def test_results_come_in_order_and_a_failure_stays_with_its_item(workers):
    work = Recorder()
    seen = []
    for item, future in read_ahead(work, range(9), workers=workers):
        try:
            seen.append((item, future.result()))
        except ValueError as exc:
            seen.append((item, str(exc)))
    assert seen == [(k, "item 3 is unreadable" if k == 3 else 10 * k) for k in range(9)]
    if workers == 0:
        assert work.threads == {threading.current_thread().name}  # no thread at all
    else:
        assert work.threads and threading.current_thread().name not in work.threads


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_at_most_ahead_items_are_started_before_they_are_used(workers):
    work = Recorder()
    used = 0
    for item, future in read_ahead(work, range(20), workers=workers, ahead=3):
        future.exception()  # waits for it; item 3's failure is the caller's to report
        used += 1
        time.sleep(0.05)  # the caller is slow: the threads would run far ahead if nothing bounded them
        with work.lock:
            assert len(work.started) <= used + 3, (used, work.started)


def test_stopping_early_starts_nothing_more():
    work = Recorder()
    for item, future in read_ahead(work, range(100), workers=2, ahead=4):
        if item == 1:
            break
    time.sleep(0.1)
    assert len(work.started) <= 2 + 4  # the two used and what was already in flight, never the other 94


def test_the_next_item_is_read_while_the_caller_holds_the_current_one():
    """Overlap, without timing: the caller waits, holding item k, until item k + 1's work has started."""
    started = {k: threading.Event() for k in range(6)}

    def work(item: int) -> int:
        started[item].set()
        return item

    for item, future in read_ahead(work, range(6), workers=1):
        future.result()
        if item + 1 in started:
            assert started[item + 1].wait(timeout=30), f"item {item + 1} was not read during item {item}"
