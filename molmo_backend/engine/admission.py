"""Which waiting rows join a step engine's running set at the next step (the scheduler's policy).

Opened tasks join at once, into slots of their own. Bulk rows join by the chunk: when enough bulk
slots are free, or nothing bulk is running, or all that waits fits, and never in the step where
an opened task joins or while one is decoding (its steps stay small). A step's prefill is bounded
by a token budget, and a distinct image joins with all the labels queued behind it (one prefill
serves them all), unless they are more than the region's free rows while none of its rows runs
(a pose project's 17 labels, 16 rows for opened tasks): they then join in parts, each prefilling
the image again, rather than never.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from molmo_backend.engine.base import Row, StepEngine
from molmo_backend.engine.queue import Item, Priority, RequestQueue

log = logging.getLogger(__name__)

#: tokens of image + prompt prefilled in one step at most (about 8 images of 1000 tokens): a packed
#: forward is bound by kernel launches below about 4 images (H100, Molmo2-8B: one 1280x960 image
#: 62 ms, four 189 ms, eight 364 ms), and an opened task arriving waits for the step in flight
PREFILL_TOKENS_PER_STEP = 8192
#: bulk rows are admitted when at least this share of the bulk slots is free (or nothing is
#: decoding, or all that waits fits), so that a prefill runs with several images, not one
ADMIT_FREE_FRACTION = 0.2


def ask(method, *args):
    """An engine's budget or cost; None if it raises (the worker thread must never die here:
    every waiting request would hang), so the batch is formed by count alone."""
    try:
        return method(*args)
    except Exception as exc:  # noqa: BLE001
        log.warning("token budget unavailable, batching by count", extra={"error": repr(exc)[:300]})
        return None


def admit(
    queue: RequestQueue, engine: StepEngine, running: Sequence[Row], prefill_tokens: int
) -> tuple[list[list[Row]], list[Item]]:
    """Image groups of rows to prefill now, taken from ``queue``, and cancelled items met on the
    way (the caller holds the scheduler's lock and answers those)."""
    groups: list[list[Row]] = []
    dropped: list[Item] = []
    budget = prefill_tokens
    for priority in Priority:
        interactive = priority == Priority.INTERACTIVE
        if not interactive and (groups or any(row.interactive for row in running)):
            break  # bulk waits while an opened task joins or decodes: its steps stay small
        free = ask(engine.free_slots, interactive) or 0
        if not interactive and not bulk_should_join(queue, running, free):
            continue
        while queue.waiting(priority):
            size = queue.head_group_size(priority)
            head = next(queue.peek(priority, 1))
            if head.job.cancelled:
                dropped.extend(queue.pop_image_group(priority))
                continue
            cost = ask(engine.prefill_cost, head.query) or 0
            if size > free > 0 and not groups and not any(r.interactive == interactive for r in running):
                size = free  # more labels than the region's free rows with none of its rows to end: in parts
            if size > free or (groups and cost > budget):
                break
            items = queue.pop_image_group(priority, size)
            groups.append(
                [Row(item.query, interactive, ticket=item, prepared=item.prepared) for item in items]
            )
            free -= size
            budget -= cost
    return groups, dropped


def bulk_should_join(queue: RequestQueue, running: Sequence[Row], free: int) -> bool:
    """Whether waiting bulk rows join now, given ``free`` bulk slots."""
    waiting = queue.waiting(Priority.BULK)
    if not waiting or free <= 0:
        return False
    bulk_rows = sum(not row.interactive for row in running)
    capacity = bulk_rows + free
    return bulk_rows == 0 or free >= max(1, int(capacity * ADMIT_FREE_FRACTION)) or waiting <= free
