"""Incremental detokenization and stop strings, run by the engine thread for every generated token.

:class:`IncrementalDetokenizer` turns tokens into text deltas without ever emitting broken UTF-8: byte-level BPE
tokenizers split multi-byte characters across tokens, and decoding such a token alone gives U+FFFD. Following
the prefix/read-offset scheme of TGI and vLLM, a delta is released only once the decoded text of a short window
grows and does not end in U+FFFD; :meth:`IncrementalDetokenizer.flush` releases whatever is held at the end.

:class:`StopMatcher` cuts the text before the first occurrence of any stop string, matched across token
boundaries, and holds back text that could still be the start of a stop string, so a stream never emits any part
of one (cases C12, C13).
"""

from __future__ import annotations

from collections.abc import Iterable

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Token ids in, text deltas out.

    Args:
        tokenizer: a Hugging Face tokenizer.
        skip_ids: ids never rendered (EOS and other end tokens).
    """

    def __init__(self, tokenizer, skip_ids: Iterable[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.skip_ids = frozenset(skip_ids)
        self.ids: list[int] = []
        self._prefix = 0  # start of the decode window
        self._read = 0  # tokens before this index are already released

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Add one token; return the newly complete text (possibly empty)."""
        if token_id in self.skip_ids:
            return ""
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        new_text = self._decode(self.ids[self._prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT):
            delta = new_text[len(prefix_text) :]
            self._prefix, self._read = self._read, len(self.ids)
            return delta
        return ""

    def flush(self) -> str:
        """Release what is still held (an incomplete character decodes to U+FFFD here, as in a full decode)."""
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        new_text = self._decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return new_text[len(prefix_text) :]


class StopMatcher:
    """Cuts text at the first stop string and holds back possible stop-string prefixes.

    Args:
        stops: stop strings (empty strings are ignored).
    """

    def __init__(self, stops: Iterable[str] = ()) -> None:
        self.stops = tuple(s for s in stops if s)
        self.text = ""  # all text seen
        self.released = 0  # chars of ``text`` already emitted
        self.stopped = False

    def feed(self, delta: str) -> str:
        """Add text; return what can be emitted now. After a stop string is found, :attr:`stopped` is True and
        the returned text ends just before it."""
        if self.stopped:
            return ""
        self.text += delta
        if not self.stops:
            out, self.released = self.text[self.released :], len(self.text)
            return out
        cut = self._first_stop()
        if cut is not None:
            self.stopped = True
            out = self.text[self.released : cut]
            self.text, self.released = self.text[:cut], cut
            return out
        safe = len(self.text) - self._held_suffix()
        out = self.text[self.released : max(safe, self.released)]
        self.released = max(safe, self.released)
        return out

    def finish(self) -> str:
        """The generation ended without a stop string: release everything held."""
        if self.stopped:
            return ""
        out, self.released = self.text[self.released :], len(self.text)
        return out

    def _first_stop(self) -> int | None:
        best = None
        for s in self.stops:
            i = self.text.find(s, max(self.released - len(s) + 1, 0))
            if i != -1 and (best is None or i < best):
                best = i
        return best

    def _held_suffix(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of some stop string."""
        longest = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text)), longest, -1):
                if self.text.endswith(s[:k]):
                    longest = k
                    break
        return longest


class TextPipeline:
    """Per-request text pipeline: detokenizer, then stop strings.

    :meth:`add` returns ``(text_delta, hit_stop)``; :meth:`finish` releases the held tail when the request ends
    for another reason (EOS, length, abort).
    """

    def __init__(self, tokenizer, skip_ids: Iterable[int], stops: Iterable[str] = ()) -> None:
        self.detok = IncrementalDetokenizer(tokenizer, skip_ids)
        self.matcher = StopMatcher(stops)
        self.text = ""

    def add(self, token_id: int) -> tuple[str, bool]:
        out = self.matcher.feed(self.detok.add(token_id))
        self.text += out
        return out, self.matcher.stopped

    def finish(self) -> str:
        if self.matcher.stopped:
            return ""
        out = self.matcher.feed(self.detok.flush())
        if not self.matcher.stopped:
            out += self.matcher.finish()
        self.text += out
        return out
