"""The gateway freezes its long-lived heap, and never keeps a replaced table frozen."""

from __future__ import annotations

import asyncio
import gc
import weakref

from gateway.heap import FrozenHeap


class _Cycle:
    """Stands for a compiled table: reference cycles only the cyclic collector can free."""

    def __init__(self) -> None:
        self.me = self


async def test_objects_alive_at_start_are_frozen_and_unfrozen_when_the_gateway_stops() -> None:
    heap = FrozenHeap(settle=0.05)
    table = _Cycle()
    heap.freeze()
    assert gc.get_freeze_count() > 0
    await heap.close()
    assert gc.get_freeze_count() == 0
    gone = weakref.ref(table)
    del table
    gc.collect()
    assert gone() is None


async def test_a_table_replaced_by_a_reload_is_collected_not_kept_frozen() -> None:
    heap = FrozenHeap(settle=0.05)
    old_table = _Cycle()
    heap.freeze()
    try:
        gone = weakref.ref(old_table)
        del old_table  # the reload swaps it out; in-flight requests finish meanwhile
        heap.reloaded()
        assert gc.get_freeze_count() == 0
        await asyncio.sleep(0.2)
        assert gone() is None  # collected by the refreeze, not frozen with the rest
        assert gc.get_freeze_count() > 0
    finally:
        await heap.close()


async def test_reloads_in_quick_succession_refreeze_once_after_the_last() -> None:
    heap = FrozenHeap(settle=0.1)
    heap.freeze()
    try:
        heap.reloaded()
        await asyncio.sleep(0.06)
        heap.reloaded()
        await asyncio.sleep(0.06)
        assert gc.get_freeze_count() == 0  # the first reload's refreeze was pushed back
        await asyncio.sleep(0.1)
        assert gc.get_freeze_count() > 0
    finally:
        await heap.close()
