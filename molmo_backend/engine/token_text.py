"""Split a decoded answer into the text each generated token contributed.

Per-point confidence (:mod:`molmo_backend.confidence`) has to know which tokens spell which
characters of the answer. Decoding each token on its own is fast (a cached dict lookup) and exact
for byte-level BPE tokenizers (Qwen, OLMo: the Molmo2 family) as long as no character is split
across tokens. When the pieces do not add up to the decoded answer (a multi-byte character split
over two tokens decodes to two replacement characters; a SentencePiece tokenizer drops a leading
space when a token is decoded alone), the exact, slower way is used for that answer: decode every
prefix of the ids and give each token the characters its prefix adds to the common prefix with
the whole answer.
"""

from __future__ import annotations

import os
from typing import Sequence


class TokenTexts:
    """``split(ids, text)``: one string per id, whose concatenation is ``text``."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._piece: dict[int, str] = {}

    def split(self, ids: Sequence[int], text: str) -> tuple[str, ...]:
        """``text`` must be ``tokenizer.decode(ids, skip_special_tokens=True)``."""
        missing = [i for i in dict.fromkeys(ids) if i not in self._piece]
        if missing:
            decoded = self.tokenizer.batch_decode([[i] for i in missing], skip_special_tokens=True)
            self._piece.update(zip(missing, decoded))
        pieces = [self._piece[i] for i in ids]
        if "".join(pieces) == text:
            return tuple(pieces)
        return self._split_exact(list(ids), text)

    def _split_exact(self, ids: list[int], text: str) -> tuple[str, ...]:
        prefixes = self.tokenizer.batch_decode([ids[: k + 1] for k in range(len(ids))],
                                               skip_special_tokens=True)
        pieces, done = [], 0
        for k, prefix in enumerate(prefixes):
            end = len(text) if k == len(ids) - 1 else max(done, len(os.path.commonprefix([prefix, text])))
            pieces.append(text[done:end])
            done = end
        return tuple(pieces)
