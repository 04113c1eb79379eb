"""Cache memory for rows as they grow: room for each row's next token, and what happens without it.

A bulk row's run of blocks (:class:`.slots.RowSpace`) holds its prompt and a little answer room.
Before each step every stepping row needs room for the token it writes: its run grows in place
if the blocks after it are free, else the row moves to a longer free run (one copy of its keys
and values in every layer; it asks for as much again as its answer so far, so a long answer
moves a few times, not at every block). A row that finds no room waits for a step while other
rows end, and the bulk region admits nothing meanwhile. If no row of a step has room, the
youngest rows are handed back (``Row.requeue``): their memory is freed and they start again from
their prompt later, which only costs time. Admission keeps a block of growth per running row, so
both are rare; a test forces them and checks that no answer changes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from molmo_backend.engine.base import Row
from molmo_backend.engine.slots import ANSWER_ROOM, BLOCK_TOKENS

log = logging.getLogger(__name__)


def make_room(decoder, rows: Sequence) -> list[bool]:
    """Room in each of ``rows`` (the decoder's :class:`.decoding.SlotRow` states) for the token it
    writes now; a row's slot changes if it moves. Returns which rows have room."""
    ready = []
    for row in rows:
        if row.length < decoder.space.capacity(row.slot):
            ready.append(True)
            continue
        need = row.length + 1
        answer = row.length - len(row.prompt_ids)
        slot = decoder.space.grow(row.slot, need, need + max(ANSWER_ROOM, answer))
        if slot is not None and slot != row.slot:
            _move(decoder, row, slot)
        decoder.waits += slot is None
        ready.append(slot is not None)
    decoder.short_of_memory = not all(ready)
    return ready


def _move(decoder, row, slot: int) -> None:
    """Move ``row`` to the run at ``slot``: its keys and values, then its device state."""
    with decoder.on_device():
        decoder.cache.move(row.slot * BLOCK_TOKENS, slot * BLOCK_TOKENS, row.length)
        old = torch.tensor([row.slot], device=decoder.device)
        new = torch.tensor([slot], device=decoder.device)
        for state in (decoder.last_token, decoder.lengths, decoder.live):
            state.index_copy_(0, new, state.index_select(0, old))
    decoder.release([row.slot])
    row.slot = slot
    decoder.moves += 1


def take_runs(decoder, rows: Sequence[Row], prompt_tokens: Sequence[int]) -> tuple[list[Row], list[int]]:
    """A run for each new row's prompt; a row that gets none is handed back (``requeue``).
    Returns the rows kept and their slots."""
    kept, slots = [], []
    for row, tokens in zip(rows, prompt_tokens):
        slot = decoder.take_slot(row.interactive, tokens)
        row.requeue = slot is None
        if slot is not None:
            kept.append(row)
            slots.append(slot)
    return kept, slots


def with_room(decoder, rows: Sequence[Row]) -> list[Row]:
    """The running rows whose runs hold their next token now (runs grown or moved as needed)."""
    ready = make_room(decoder, [row.state for row in rows])
    for row in rows:
        row.slot = row.state.slot
    return [row for row, ok in zip(rows, ready) if ok]


def evict_for_room(decoder, rows: Sequence[Row]) -> list[Row]:
    """No row of a step has room: hand the youngest back until one has; returns those that do."""
    left = sorted(rows, key=lambda row: row.state.group)
    while left:
        youngest = left.pop()
        decoder.release([youngest.slot])
        youngest.slot, youngest.requeue = -1, True
        log.info("row handed back for lack of cache memory", extra={"rows_left": len(left)})
        stepping = with_room(decoder, left)
        if stepping:
            return stepping
    return []
