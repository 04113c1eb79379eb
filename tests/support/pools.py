"""A step engine over a small cache pool, so that rows outgrow their runs, move, wait for memory
and are handed back (engine/row_memory.py): shared by the tests that check none of it changes
an answer."""

from __future__ import annotations

from molmo_backend.engine.decoding import SlotDecoder


def tight_pool(engine, bulk_tokens: int, bulk_slots: int = 4):
    """``engine`` with a fresh decoder of ``bulk_slots`` bulk rows in a pool of ``bulk_tokens``
    tokens, admitting as many rows as that allows at once (this model's rows take a block each)."""
    engine.decoder = SlotDecoder(
        engine.model,
        sorted(engine._eos_ids),
        engine._pad_id,
        bulk_slots=bulk_slots,
        max_length=engine.decoder.max_length,
        bulk_tokens=bulk_tokens,
        use_cuda_graph=False,
    )
    engine.decoder.space.typical = 1.0
    engine.max_batch = bulk_slots
    return engine
