"""``common.background.LoopLocal``: one value per event loop, whichever loop asked
last (a node asks on every publish)."""

from __future__ import annotations

import asyncio

from common.background import LoopLocal


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
