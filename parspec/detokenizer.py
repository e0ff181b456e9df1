"""A completion's text as its tokens arrive: incremental detokenization, stop strings and
the hold-back that keeps streamed text final.

Three facts shape it:

- A token may end in the middle of a UTF-8 character (byte-fallback / byte-level tokens);
  decoding it alone gives U+FFFD. Nothing is emitted until the character is complete.
- Some decoders treat the first token of a decode specially (SentencePiece's Metaspace drops
  its leading space), so decode(suffix) is not the suffix of decode(all). Each step decodes a
  short window that starts at tokens already emitted (the prefix) and emits only what the new
  tokens add past the prefix's text: the prefix-offset / read-offset technique.
- A stop string can only end in text that has just arrived, so the search covers the new text
  plus the (longest stop - 1) characters before it, and those trailing characters are held
  back from the stream until no stop string can still start in them.

Per token the work is bounded by the window and the longest stop string, never by the length
of the text so far."""

from __future__ import annotations

import logging

log = logging.getLogger("parspec")

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Token ids in, newly completed text out. Concatenating everything ``push`` returns gives
    ``tokenizer.decode(ids)`` for prefix-stable decoders (byte-level BPE, Metaspace, byte
    fallback), except a character still incomplete at the end, which ``push`` keeps back."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self._decode = lambda ids: tokenizer.decode(ids, skip_special_tokens)
        self._window: list[int] = []  # the prefix tokens (already emitted) + the unread ones
        self._read = 0  # window[:_read] is the prefix
        self._prefix_text = ""  # decode(window[:_read])

    def push(self, token_id: int) -> str:
        self._window.append(token_id)
        text = self._decode(self._window)
        if text == self._prefix_text:  # the new tokens add nothing (a skipped special token): absorb them
            self._read = len(self._window)
            return ""
        if len(text) <= len(self._prefix_text) or text.endswith(REPLACEMENT_CHAR):
            return ""  # a character is still incomplete: wait for its next bytes
        new = text[len(self._prefix_text):]
        self._window = self._window[self._read:]  # the tokens just emitted become the next prefix
        self._read = len(self._window)
        self._prefix_text = self._decode(self._window)
        return new


class StopStrings:
    """Finds the first stop string completed by newly arrived text."""

    def __init__(self, stops: list[str], include_in_output: bool):
        self.stops = list(stops)
        self.include = include_in_output
        self.longest = max((len(s) for s in self.stops), default=0)
        # Streamed text cannot be retracted: keep back what a later match could still cut.
        self.holdback = self.longest - 1 if self.stops and not include_in_output else 0

    def find(self, tail: str, new: str) -> tuple[int, str] | None:
        """``tail``: the last (longest - 1) characters before ``new``. Returns (where the text
        ends, as an offset into tail + new, the stop string) for the match that ends first
        (ties: the longer one), or None. Every match counted ends inside ``new``."""
        region = tail + new
        best = None
        for s in self.stops:
            at = region.find(s, max(0, len(tail) - len(s) + 1))
            if at < 0:
                continue
            key = (at + len(s), at)
            if best is None or key < best[0]:
                best = (key, s)
        if best is None:
            return None
        (end, start), s = best
        return (end if self.include else start), s


class CompletionText:
    """One completion's text: detokenized token by token, cut at a stop string, and handed
    out in pieces (``take``) that are never retracted."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True, stops: list[str] | None = None,
                 include_stop_str_in_output: bool = False):
        self.detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens)
        self.stops = StopStrings(stops or [], include_stop_str_in_output)
        self._chunks: list[str] = []  # the text so far, in pieces (joined once, at the end)
        self._length = 0
        self._unsent: list[str] = []  # the text not yet handed out by take()
        self._final: str | None = None

    def __len__(self) -> int:
        return self._length

    @property
    def text(self) -> str:
        if self._final is not None:
            return self._final
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    def push(self, token_id: int, check_stops: bool = True) -> str | None:
        """Adds one token's text; returns the stop string it completed (the text is then cut
        there), or None. ``check_stops`` False: the text counts but cannot complete a stop."""
        new = self.detokenizer.push(token_id)
        if not new:
            return None
        tail = self._tail(self.stops.longest - 1) if check_stops and self.stops.stops else ""
        self._append(new)
        if not check_stops or not self.stops.stops:
            return None
        hit = self.stops.find(tail, new)
        if hit is None:
            return None
        cut, stop = hit
        self._truncate(self._length - len(new) - len(tail) + cut)
        return stop

    def take(self, finished: bool) -> str:
        """The text since the last take(), less what a stop string could still remove."""
        pending = "".join(self._unsent)
        keep = 0 if finished else min(self.stops.holdback, len(pending))
        self._unsent = [pending[len(pending) - keep:]] if keep else []
        return pending[:len(pending) - keep]

    def settle(self, final: str) -> None:
        """The finished completion's text is ``final`` (the full decode); what take() has not
        handed out yet becomes the rest of it."""
        sent = self._length - sum(len(c) for c in self._unsent)
        streamed = self.text[:sent]
        if final.startswith(streamed):
            self._unsent = [final[sent:]]
        else:  # a decoder whose output is not prefix-stable; the stream cannot take text back
            log.warning("streamed text %r is not a prefix of the final text %r", streamed[-40:], final[-40:])
            self._unsent = []
        self._final, self._length = final, len(final)

    # --- the text buffer ----------------------------------------------------------------
    def _append(self, new: str) -> None:
        self._chunks.append(new)
        self._unsent.append(new)
        self._length += len(new)

    def _tail(self, n: int) -> str:
        out, have = [], 0
        for chunk in reversed(self._chunks):
            if have >= n:
                break
            out.append(chunk)
            have += len(chunk)
        tail = "".join(reversed(out))
        return tail[len(tail) - n:] if n > 0 else ""

    def _truncate(self, length: int) -> None:
        """Drop the text past ``length``; it was never handed out (see StopStrings.holdback)."""
        self._chunks, self._unsent = self._cut(self._chunks, self._length - length), \
            self._cut(self._unsent, self._length - length)
        self._length = length

    @staticmethod
    def _cut(chunks: list[str], drop: int) -> list[str]:
        chunks = list(chunks)
        while drop > 0 and chunks:
            last = chunks.pop()
            if len(last) > drop:
                chunks.append(last[:len(last) - drop])
            drop -= len(last)
        return chunks
