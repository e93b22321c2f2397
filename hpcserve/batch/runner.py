"""Stream an OpenAI Batch JSONL file through an ``LLMEngine``. No direct torch use.

Interface:

    run_batch(engine, in_path, out_path, errors_path=None, progress=None,
              max_in_flight=256) -> BatchSummary
    count_lines(path) -> int                    # fast newline count (progress-bar total)

The input is read lazily: at most ``max_in_flight`` requests sit in the engine, and more
lines are read as requests finish. Blank lines are skipped. Every non-blank line produces
exactly one line: a 200 output line, or an error line (bad JSON / field / parameter,
duplicate custom_id, or a ``RequestError`` from the engine such as
``context_length_exceeded``). Error lines go to ``errors_path`` when given, else into the
output file. Output order is completion order, not input order (match on ``custom_id``).

Results are written to ``<out>.partial`` (and ``<errors>.partial``) as requests finish,
flushed about once a second, and renamed into place only after the whole file is done, so
an interrupted run never leaves a file that looks complete; the ``.partial`` file keeps the
results finished so far.

When a line gives no ``max_tokens`` the default (256) is lowered to what fits in the
context after the prompt (prompts are tokenized before submission); a prompt that leaves
no room at all is ``context_length_exceeded``. An explicit ``max_tokens`` is never changed.

``progress``: True shows a tqdm bar on stderr (lines done / total, tokens/s); None shows it
only when stderr is a TTY.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm

from hpcserve.batch.openai_format import (
    BatchItem,
    BatchLineError,
    LineParser,
    build_error_line,
    build_output_line,
    error_from_request_error,
)
from hpcserve.engine.request import SamplingParams
from hpcserve.errors import HpcserveError, RequestError

DEFAULT_MAX_IN_FLIGHT = 256
_FLUSH_INTERVAL_S = 1.0


@dataclass
class BatchSummary:
    num_lines: int  # non-blank input lines (= num_ok + num_errors)
    num_ok: int
    num_errors: int
    prompt_tokens: int
    completion_tokens: int
    elapsed_s: float

    @property
    def tokens_per_s(self) -> float:
        """Generated (completion) tokens per second of wall time."""
        return self.completion_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def one_line(self) -> str:
        return (f"{self.num_lines} lines: {self.num_ok} ok, {self.num_errors} errors; "
                f"{self.prompt_tokens} prompt + {self.completion_tokens} completion tokens "
                f"in {self.elapsed_s:.1f}s ({self.tokens_per_s:.1f} tok/s)")


def count_lines(path: str | os.PathLike) -> int:
    """Number of lines (a final line without a newline counts), reading 1 MiB at a time."""
    n = 0
    last = b"\n"
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            n += chunk.count(b"\n")
            last = chunk[-1:]
    return n + (last != b"\n")


def _partial(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def _iter_lines(f: IO[bytes]) -> Iterator[tuple[int, str | None]]:
    """(line_no, text) per line; text is None when the line is not valid UTF-8."""
    for line_no, raw in enumerate(f, 1):
        if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        try:
            yield line_no, raw.decode("utf-8")
        except UnicodeDecodeError:
            yield line_no, None


class _Writer:
    """Output and (optional separate) error sinks, flushed at most once a second."""

    def __init__(self, out_path: Path, errors_path: Path | None):
        self.out_path, self.errors_path = out_path, errors_path
        self.out = open(_partial(out_path), "w", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.err = (open(_partial(errors_path), "w", encoding="utf-8")  # noqa: SIM115
                    if errors_path else self.out)
        self._last_flush = time.monotonic()

    def write(self, obj: dict, error: bool) -> None:
        (self.err if error else self.out).write(json.dumps(obj, ensure_ascii=False) + "\n")
        now = time.monotonic()
        if now - self._last_flush >= _FLUSH_INTERVAL_S:
            self.out.flush()
            self.err.flush()
            self._last_flush = now

    def close(self, commit: bool) -> None:
        for f in {id(self.out): self.out, id(self.err): self.err}.values():
            f.close()
        if commit:
            os.replace(_partial(self.out_path), self.out_path)
            if self.errors_path:
                os.replace(_partial(self.errors_path), self.errors_path)


def run_batch(
    engine: Any,
    in_path: str | os.PathLike,
    out_path: str | os.PathLike,
    errors_path: str | os.PathLike | None = None,
    progress: bool | None = None,
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
) -> BatchSummary:
    """Run every line of ``in_path`` through ``engine``; see the module docstring."""
    in_path, out_path = Path(in_path), Path(out_path)
    errors_path = Path(errors_path) if errors_path is not None else None
    if errors_path is not None and errors_path.resolve() == out_path.resolve():
        errors_path = None  # same file: errors go into the output anyway
    if not in_path.is_file():
        raise HpcserveError(f"input file not found: {in_path}")
    if max_in_flight < 1:
        raise HpcserveError(f"max_in_flight must be >= 1, got {max_in_flight}")
    for p in (out_path, errors_path):
        if p is not None and not p.parent.is_dir():
            raise HpcserveError(f"output directory does not exist: {p.parent}")
    if progress is None:
        progress = sys.stderr.isatty()

    t0 = time.monotonic()
    created = int(time.time())
    total = count_lines(in_path) if progress else None
    bar = tqdm(total=total, unit="line", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    stats = BatchSummary(0, 0, 0, 0, 0, 0.0)
    writer = _Writer(out_path, errors_path)
    decode = _Decoder(engine)
    parser = LineParser()
    in_flight: dict[str, BatchItem] = {}
    committed = False

    def error(exc: BatchLineError) -> None:
        writer.write(build_error_line(exc.custom_id, exc.line_no, exc.code, exc.message), error=True)
        stats.num_errors += 1
        bar.update(1)

    try:
        with open(in_path, "rb") as f:
            lines = _iter_lines(f)
            eof = False
            while True:
                while not eof and len(in_flight) < max_in_flight:
                    nxt = next(lines, None)
                    if nxt is None:
                        eof = True
                        break
                    line_no, text = nxt
                    if text is not None and not text.strip():
                        bar.update(1)  # blank line: skipped, but counted by the bar's total
                        continue
                    stats.num_lines += 1
                    try:
                        if text is None:
                            raise BatchLineError(line_no, None, "invalid_json", "line is not valid UTF-8")
                        item = parser.parse(text, line_no)
                        req_id = f"batch-{line_no}"
                        _submit(engine, req_id, item)
                        in_flight[req_id] = item
                    except BatchLineError as exc:
                        error(exc)
                if not in_flight:
                    if eof:
                        break
                    continue

                for out in engine.step():
                    if not out.finished or out.req_id not in in_flight:
                        continue
                    item = in_flight.pop(out.req_id)
                    writer.write(build_output_line(item, out, engine.model_name, created, decode),
                                 error=False)
                    stats.num_ok += 1
                    stats.prompt_tokens += len(out.prompt_token_ids)
                    stats.completion_tokens += len(out.token_ids)
                    bar.update(1)
                    elapsed = time.monotonic() - t0
                    bar.set_postfix_str(f"{stats.completion_tokens / max(elapsed, 1e-9):.1f} tok/s",
                                        refresh=False)
                if in_flight and not engine.has_unfinished_requests():
                    raise HpcserveError(f"engine dropped {len(in_flight)} request(s) without "
                                        f"finishing them (first: {next(iter(in_flight))})")
        committed = True
    finally:
        bar.close()
        writer.close(commit=committed)
        if not committed:
            for req_id in in_flight:
                with contextlib.suppress(Exception):  # best effort while unwinding
                    engine.abort_request(req_id)
    stats.elapsed_s = time.monotonic() - t0
    return stats


def prepare_item(frontend: Any, item: BatchItem) -> tuple[list[int], SamplingParams]:
    """Token ids and final sampling params of a validated line. ``frontend`` is an
    ``engine.frontend.Frontend`` (or anything with ``apply_chat_template``, ``tokenize`` and
    ``max_model_len``, e.g. an ``LLMEngine``). A defaulted ``max_tokens`` is lowered to what is
    left of the context. ``RequestError`` becomes ``BatchLineError``. The context-length check
    itself is the caller's (``Frontend.check_length``, or ``LLMEngine.add_request``)."""
    try:
        ids = frontend.apply_chat_template(item.messages) if item.is_chat else frontend.tokenize(item.prompt)
        params = item.params
        if item.max_tokens_defaulted:
            room = int(frontend.max_model_len) - len(ids)
            if 1 <= room < params.max_tokens:
                params = dataclasses.replace(params, max_tokens=room)
        return ids, params
    except RequestError as exc:
        raise error_from_request_error(item.line_no, item.custom_id, exc) from None


def _submit(engine: Any, req_id: str, item: BatchItem) -> None:
    """Tokenize and add one request; engine ``RequestError`` -> ``BatchLineError``."""
    ids, params = prepare_item(engine, item)
    try:
        engine.add_request(req_id, ids, params)
    except RequestError as exc:
        raise error_from_request_error(item.line_no, item.custom_id, exc) from None


class _Decoder:
    """token id -> text for logprobs, cached (a batch reuses a small set of tokens)."""

    def __init__(self, engine: Any):
        self._engine = engine
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        s = self._cache.get(token_id)
        if s is None:
            tok = getattr(self._engine, "tokenizer", None)
            s = tok.decode([token_id]) if tok is not None else f"token_id:{token_id}"
            if len(self._cache) < 65536:
                self._cache[token_id] = s
        return s
