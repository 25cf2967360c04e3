"""Incremental detokenization for streamed generation: text deltas that never split a character and
never show a partial stop string.

- ``IncrementalDecoder`` turns token ids into text deltas. A character whose UTF-8 bytes span several
  tokens (byte-level BPE) decodes as "\\ufffd" until its last byte arrives; the decoder holds such a tail
  back instead of sending the replacement character. It decodes a short window (the ids since the last
  emitted boundary, with the preceding ids as context, as vLLM does), so a long generation costs
  O(tokens) decodes of a few ids each, and the concatenated deltas equal ``decode(all ids)`` for
  tokenizers whose decoding is a concatenation (byte-level BPE, sentencepiece byte fallback); when the
  window's text is not a prefix-extension (a tokenizer that rewrites earlier text), it falls back to
  decoding every id.
- ``StopMatcher`` cuts the text at the first occurrence of any stop string and holds back a tail that
  could still become a stop string, so a client never sees a stop string's first half.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

REPLACEMENT = "\ufffd"


class IncrementalDecoder:
    """``push(token) -> new text`` (possibly ""), ``flush() -> the rest``; ``text`` is what was emitted."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""  # emitted so far
        self._prefix = 0  # ids[_prefix:_read] decode to the context of the next delta
        self._read = 0  # ids before _read are emitted

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        return self._advance(final=False)

    def flush(self) -> str:
        """Everything not emitted yet (an incomplete character as the tokenizer decodes it: "\\ufffd")."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._read >= len(self.ids):
            return ""
        context = self._decode(self.ids[self._prefix:self._read])
        window = self._decode(self.ids[self._prefix:])
        if window.startswith(context):
            delta = window[len(context):]
        else:  # the tokenizer rewrote earlier text: compare with the full decode instead
            full = self._decode(self.ids)
            if full.startswith(self.text):
                delta = full[len(self.text):]
            elif not final:
                return ""  # cannot retract what was sent; wait for text that extends it
            else:  # the end: send what follows the common part rather than lose it
                k = next((i for i, (a, b) in enumerate(zip(full, self.text, strict=False)) if a != b),
                         min(len(full), len(self.text)))
                delta = full[k:]
        if not final and (not delta or delta.endswith(REPLACEMENT)):
            return ""  # an incomplete character (or nothing yet): hold the ids back
        self.text += delta
        self._prefix, self._read = self._read, len(self.ids)
        return delta


class StopMatcher:
    """Cuts generated text at the first stop string; ``feed(text) -> (safe text, stopped)``."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.longest = max((len(s) for s in self.stops), default=0)
        self.emitted = ""
        self.pending = ""
        self.stopped = False

    def feed(self, text: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            self.emitted += out
            return out, False
        # a stop string may begin in the last longest-1 characters already emitted
        keep = self.emitted[len(self.emitted) - self.longest + 1:] if self.longest > 1 else ""
        window = keep + self.pending
        hit = min((i for i in (window.find(s) for s in self.stops) if i >= 0), default=-1)
        if hit >= 0:
            cut = max(hit - len(keep), 0)
            out = self.pending[:cut]
            self.emitted += out
            self.pending, self.stopped = "", True
            return out, True
        hold = self._partial(window)
        n = max(len(self.pending) - hold, 0)
        out, self.pending = self.pending[:n], self.pending[n:]
        self.emitted += out
        return out, False

    def _partial(self, window: str) -> int:
        """Length of the longest suffix of ``window`` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(window)), best, -1):
                if window.endswith(s[:k]):
                    best = k
                    break
        return best

    def flush(self) -> str:
        """At the end of generation: the held-back tail (it never became a stop string)."""
        if self.stopped:
            return ""
        out, self.pending = self.pending, ""
        self.emitted += out
        return out
