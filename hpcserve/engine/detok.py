"""Incremental detokenization with stop strings. No torch.

Interface::

    d = IncrementalDetokenizer(tokenizer, prompt_token_ids, stop=["\\n\\n"], skip_special_tokens=True)
    delta = d.add_tokens([tok])   # new text safe to show now ("" if held back)
    ...
    tail = d.finish()             # request ended (eos / length / abort): flush held text
    d.text                        # all text released so far
    d.stop_hit                    # the stop string that matched, or None

Lifecycle: one instance per request, created when the request is admitted. Call
``add_tokens`` with each step's new output tokens. When ``stop_hit`` becomes set the
request should be finished with that stop reason; ``text`` then ends right before the
stop string (which is not included) and later calls return "". Otherwise call
``finish()`` once at the end. Without a stop hit, the deltas plus ``finish()`` concatenate
to ``tokenizer.decode(output_ids, skip_special_tokens=...)``.

Technique: only a short window of recent tokens is decoded per call (no O(n^2)
re-decoding). ``_prefix_offset.._read_offset`` is the already-released window whose
text is the reference; the delta is ``decode(window + new)[len(decode(window)):]``.
Text ending in U+FFFD (an incomplete UTF-8 sequence across byte-level tokens) is held
until a later token completes it. The last few prompt tokens seed the window so the
first output token gets the right leading-space handling; prompt text is never emitted.

Stop strings: unreleased text is kept in ``_pending``; each call searches it for the
earliest stop string, and otherwise releases all but the longest suffix that is a proper
prefix of some stop string (at most ``max(len(stop)) - 1`` characters), so a stream
never shows a partial stop string that later turns out to be one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    PROMPT_CONTEXT = 5  # prompt tokens used as left context for the first output tokens

    def __init__(
        self,
        tokenizer,
        prompt_token_ids: Sequence[int],
        stop: Iterable[str] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop: list[str] = [s for s in stop if s]
        # every proper prefix of a stop string: the suffixes we may need to hold back
        self._stop_prefixes = {s[:i] for s in self.stop for i in range(1, len(s))}
        self._max_hold = max((len(s) for s in self.stop), default=1) - 1

        self.text = ""
        self.stop_hit: str | None = None
        self._pending = ""  # decoded, not yet released (could start a stop string)
        self._done = False

        ctx = list(prompt_token_ids[-self.PROMPT_CONTEXT :])
        prefix_text = self._decode(ctx)
        if prefix_text.endswith(_REPLACEMENT):
            # prompt ends mid-character (token-id prompt): its completion would be misattributed
            ctx, prefix_text = [], ""
        self._tokens: list[int] = ctx  # window source; trimmed as the window moves
        self._prefix_offset = 0
        self._read_offset = len(ctx)
        self._prefix_text: str | None = prefix_text

    # public --------------------------------------------------------------------
    def add_tokens(self, token_ids: Sequence[int]) -> str:
        """Append output tokens; return the text that is now safe to show."""
        if self._done or self.stop_hit is not None or not token_ids:
            return ""
        self._tokens.extend(token_ids)
        return self._release(self._decode_delta(final=False), final=False)

    def finish(self) -> str:
        """Flush text held back (incomplete UTF-8, possible stop-string start)."""
        if self._done or self.stop_hit is not None:
            self._done = True
            return ""
        out = self._release(self._decode_delta(final=True), final=True)
        self._done = True
        return out

    # decoding ------------------------------------------------------------------
    def _decode(self, ids: Sequence[int]) -> str:
        if not ids:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _decode_delta(self, final: bool) -> str:
        """Text of the tokens after ``_read_offset``; "" if it must still be held back."""
        toks = self._tokens
        if self._read_offset >= len(toks):
            return ""
        if self._prefix_text is None:
            self._prefix_text = self._decode(toks[self._prefix_offset : self._read_offset])
        prefix_text = self._prefix_text
        new_text = self._decode(toks[self._prefix_offset :])
        if not final and (len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT)):
            return ""  # nothing visible yet, or an incomplete character at the end
        delta = new_text[len(prefix_text) :]
        # Slide the window: the tokens just released become the new reference prefix.
        del toks[: self._read_offset]
        self._prefix_offset = 0
        self._read_offset = len(toks)
        self._prefix_text = None
        return delta

    # stop strings --------------------------------------------------------------
    def _release(self, delta: str, final: bool) -> str:
        if not self.stop:
            self.text += delta
            return delta
        buf = self._pending + delta
        hit_at, hit = -1, None
        for s in self.stop:
            i = buf.find(s)
            if i >= 0 and (hit is None or i < hit_at):
                hit_at, hit = i, s
        if hit is not None:
            out, self._pending = buf[:hit_at], ""
            self.stop_hit = hit
        elif final:
            out, self._pending = buf, ""
        else:
            hold = self._hold_len(buf)
            out, self._pending = buf[: len(buf) - hold], buf[len(buf) - hold :]
        self.text += out
        return out

    def _hold_len(self, buf: str) -> int:
        """Length of the longest suffix of ``buf`` that is a proper prefix of a stop string."""
        for n in range(min(self._max_hold, len(buf)), 0, -1):
            if buf[-n:] in self._stop_prefixes:
                return n
        return 0
