"""The minimal future under races: a completion that finishes while a waiter is registering is not lost."""

from __future__ import annotations

import threading

from actorlib.completion import Completion, wait_for


class FinishesWhileRegistering(list):
    """Completions that all finish between wait_for's first look at them and its registering callbacks."""

    def __init__(self, items):
        super().__init__(items)
        self.passes = 0

    def __iter__(self):
        self.passes += 1
        if self.passes == 2:
            for c in list.__iter__(self):
                c.set_result(None)
        return list.__iter__(self)


def test_a_completion_finishing_during_registration_wakes_the_waiter():
    completions = FinishesWhileRegistering([Completion(), Completion()])
    waiter = threading.Thread(target=wait_for, args=(completions, 2, None), daemon=True)
    waiter.start()
    waiter.join(10)
    assert not waiter.is_alive(), "wait_for missed completions that finished while it registered its callbacks"


def test_wait_for_counts_and_stops_where_told():
    a, b, c = Completion(), Completion(), Completion()
    a.set_result(1)
    threading.Timer(0.01, b.set_exception, (ValueError("x"),)).start()
    wait_for([a, b, c], 3, 10, stop=lambda done: done._exception is not None)  # returns at b's failure
    assert b.done() and not c.done()  # (c never finishes)
