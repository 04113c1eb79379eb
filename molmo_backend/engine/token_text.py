"""Split a decoded answer into the text each generated token contributed.

Per-point confidence (:mod:`molmo_backend.pointing.confidence`) has to know which tokens spell which
characters of the answer. Decoding each token on its own is fast (a cached dict lookup) and exact
for byte-level BPE tokenizers (Qwen, OLMo: the Molmo2 family) as long as no character is split
across tokens. When the pieces do not add up to the decoded answer:

- a multi-byte character split over two or more tokens decodes, token by token, to replacement
  characters: those few tokens are decoded together, and the token that completes the character
  gets it (the others get "");
- anything else (a SentencePiece tokenizer drops a leading space when a token is decoded alone):
  the exact, slower way, for that answer only: decode every prefix of the ids and give each token
  the characters its prefix adds to the common prefix with the whole answer (about 10 ms for 256
  tokens on the demo tokenizer).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

#: most tokens one character may be split over (UTF-8: 4 bytes), with room to spare
MAX_GROUP = 8
REPLACEMENT = "\ufffd"


class TokenTexts:
    """``split(ids, text)``: one string per id, whose concatenation is ``text``."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._piece: dict[int, str] = {}

    def piece(self, token_id: int) -> str:
        """One token's text, decoded alone (cached)."""
        if token_id not in self._piece:
            self._piece[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=True)
        return self._piece[token_id]

    def split(self, ids: Sequence[int], text: str) -> tuple[str, ...]:
        """``text`` must be ``tokenizer.decode(ids, skip_special_tokens=True)``."""
        missing = [i for i in dict.fromkeys(ids) if i not in self._piece]
        if missing:
            decoded = self.tokenizer.batch_decode([[i] for i in missing], skip_special_tokens=True)
            self._piece.update(zip(missing, decoded))
        pieces = [self._piece[i] for i in ids]
        if "".join(pieces) == text:
            return tuple(pieces)
        return self._split_grouped(list(ids), pieces, text) or self._split_exact(list(ids), text)

    def _split_grouped(self, ids: list[int], pieces: list[str], text: str) -> tuple[str, ...] | None:
        """Single-token pieces where they match; the few tokens of a split character decoded
        together. None when that does not rebuild ``text``."""
        out: list[str] = []
        pos = k = 0
        while k < len(ids):
            if REPLACEMENT not in pieces[k] and text.startswith(pieces[k], pos):
                out.append(pieces[k])
                pos += len(pieces[k])
                k += 1
                continue
            for j in range(k + 1, min(len(ids), k + MAX_GROUP)):
                group = self.tokenizer.decode(ids[k : j + 1], skip_special_tokens=True)
                if REPLACEMENT not in group and text.startswith(group, pos):
                    out.extend([""] * (j - k))
                    out.append(group)
                    pos += len(group)
                    k = j + 1
                    break
            else:
                return None
        return tuple(out) if pos == len(text) else None

    def _split_exact(self, ids: list[int], text: str) -> tuple[str, ...]:
        prefixes = self.tokenizer.batch_decode(
            [ids[: k + 1] for k in range(len(ids))], skip_special_tokens=True
        )
        pieces, done = [], 0
        for k, prefix in enumerate(prefixes):
            end = len(text) if k == len(ids) - 1 else max(done, len(os.path.commonprefix([prefix, text])))
            pieces.append(text[done:end])
            done = end
        return tuple(pieces)
