"""Incremental detokenizer with stop strings.

Invariant (tests/test_detokenizer.py checks it on random token sequences): the concatenation of
every text ``add`` returns for a request equals ``tokenizer.decode(ids, skip_special_tokens=...)``
of all its ids, cut at the first match of a stop string (the stop string kept only with
``include_stop_str``).

How: each call decodes a window of the last tokens (``prefix_offset`` onwards, which holds the
previously emitted tokens as context) and emits what it adds beyond the previous window's text.
While the window's text ends in U+FFFD (a multi-byte character whose bytes have not all arrived)
nothing is emitted, so a character is never cut in half; at the finish the tail is emitted as it
decodes (U+FFFD included, as ``decode`` gives it). While stop strings are set, the last
``len(longest stop) - 1`` characters are held back so a stop string is never streamed in part.
"""

from __future__ import annotations


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer,
        stop: list[str],
        skip_special_tokens: bool = True,
        include_stop_str: bool = False,
    ) -> None:
        self.tok = tokenizer
        self.stop = stop
        self.skip = skip_special_tokens
        self.include_stop = include_stop_str
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""  # all decoded text so far
        self.emitted = 0  # chars of self.text already returned
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip)

    def add(self, new_ids: list[int], finished: bool) -> tuple[str, bool]:
        """Feed sampled tokens; returns (new text to emit, hit_stop_string). ``finished``: no
        token follows, so an unfinished character's bytes are emitted as they decode."""
        if self.stopped:
            return "", True
        self.ids.extend(new_ids)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and (finished or not full.endswith("\ufffd")):
            self.text += full[len(prefix) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        hit = False
        if self.stop:
            lo = max(0, self.emitted - self.hold)
            best, hit_s = -1, ""
            for s in self.stop:
                j = self.text.find(s, lo)
                if j != -1 and (best == -1 or j < best):
                    best, hit_s = j, s
            if best != -1:
                hit = self.stopped = True
                self.text = self.text[: best + (len(hit_s) if self.include_stop else 0)]
        end = len(self.text) if (finished or hit or not self.stop) else len(self.text) - self.hold
        end = max(end, self.emitted)
        delta = self.text[self.emitted : end]
        self.emitted = end
        return delta, hit

    def flush(self) -> str:
        """Everything not yet emitted: the request finished (a stop token, max_tokens, an
        abort) after the last ``add`` that was not told so."""
        return self.add([], finished=True)[0]
