"""``common.background.LoopLocal``: one value per event loop, whichever loop asked
last (a node asks on every publish)."""

from __future__ import annotations

import asyncio
import threading

from common.background import LoopLocal, Wakeup


def test_each_loop_gets_its_own_value_and_keeps_it() -> None:
    made: list[object] = []

    def make() -> object:
        made.append(object())
        return made[-1]

    local = LoopLocal(make)

    async def twice() -> tuple[object, object]:
        return local.get(), local.get()

    first = asyncio.run(twice())
    second = asyncio.run(twice())
    assert first[0] is first[1] and second[0] is second[1]
    assert first[0] is not second[0] and len(made) == 2


def test_loops_taking_turns_each_see_their_own() -> None:
    local = LoopLocal(object)
    one, other = asyncio.new_event_loop(), asyncio.new_event_loop()

    async def value() -> object:
        return local.get()

    try:
        seen = [loop.run_until_complete(value()) for loop in (one, other, one, other)]
    finally:
        one.close()
        other.close()
    assert seen[0] is seen[2] and seen[1] is seen[3] and seen[0] is not seen[1]


def test_a_popped_value_is_made_again() -> None:
    local = LoopLocal(object)

    async def popped_then_got() -> tuple[object, object | None, object]:
        first = local.get()
        return first, local.pop(), local.get()

    first, popped, again = asyncio.run(popped_then_got())
    assert popped is first and again is not first


def test_loops_running_at_once_in_two_threads_each_see_their_own() -> None:
    """The look-up skips asking asyncio for the running loop when the loop asked for
    last runs in the caller's thread: a loop running in another thread at the same
    time is not taken for the caller's."""

    local = LoopLocal(object)
    other_started, this_asked = threading.Event(), threading.Event()
    seen: dict[str, object] = {}

    async def other_loop() -> None:
        seen["other"] = local.get()
        other_started.set()
        while not this_asked.is_set():  # keep it running while this thread asks
            await asyncio.sleep(0.001)
        seen["other again"] = local.get()

    thread = threading.Thread(target=asyncio.run, args=(other_loop(),))
    thread.start()
    try:
        assert other_started.wait(10)

        async def this_loop() -> object:
            return local.get()

        seen["this"] = asyncio.run(this_loop())
    finally:
        this_asked.set()
        thread.join(10)
    assert seen["this"] is not seen["other"]
    assert seen["other again"] is seen["other"]


async def test_a_wakeup_wakes_its_waiter_and_stays_set_until_cleared() -> None:
    wakeup = Wakeup()
    waiter = asyncio.ensure_future(wakeup.wait())
    await asyncio.sleep(0)
    assert not waiter.done()
    wakeup.set()
    await asyncio.wait_for(waiter, 1)
    await asyncio.wait_for(wakeup.wait(), 1)  # still set: returns at once
    wakeup.clear()
    again = asyncio.ensure_future(wakeup.wait())
    await asyncio.sleep(0.01)
    assert not again.done()
    again.cancel()  # a cancelled waiter leaves it usable
    await asyncio.gather(again, return_exceptions=True)
    wakeup.set()
    await asyncio.wait_for(wakeup.wait(), 1)
