"""``hpcserve chat``: talk to the running daemon's model, one-shot or as a REPL.

Interface: the click command ``chat`` (registered by ``hpcserve.cli``). It connects with
``hpcserve.api.client.Client`` and streams ``Chat`` RPCs, printing text deltas to stdout as
they arrive. One-shot (``--prompt``): one answer, a newline, exit 0; a broken stream or a
failed generation prints one ``hpcserve: error: ...`` line and exits 2. REPL: reads lines
("> " on stderr), keeps the conversation (``/reset`` clears it, ``/exit`` or EOF quits);
Ctrl-C during an answer aborts it (``Abort`` RPC, call cancelled) and keeps the REPL; an
error ends only that turn (it is dropped from the history, so it can be retried).

Retries: UNAVAILABLE (the daemon is relaunching its workers, draining at the end of its
allocation, or gone while the next allocation starts) is retried with exponential backoff
(1, 2, 4 … 30 s) for up to ``--retry-for`` seconds, reconnecting through the endpoint file each
time (a new allocation writes a new one); an answer cut mid-stream is asked again from the start.
A tenant limit (RESOURCE_EXHAUSTED with a ``retry-after``: requests or tokens per minute,
concurrent streams) is retried after the time the daemon names, within the same ``--retry-for``.
"""

from __future__ import annotations

import sys

import click

from hpcserve.commands._client_opts import connect, daemon_options

_HELP = """Chat with the model of the running daemon (`hpcserve serve`).

\b
One-shot:  hpcserve chat --prompt "What is the capital of France?"
           echo "Summarize: ..." | hpcserve chat --prompt -
REPL:      hpcserve chat [--system "You are terse."]
  /reset clears the conversation, /exit (or Ctrl-D) quits, Ctrl-C stops the
  current answer.

The answer streams to stdout as it is generated; prompts and notes go to stderr.
Unset sampling options take the daemon's defaults.
"""

_COMMANDS = "/reset clears the conversation, /exit or Ctrl-D quits, Ctrl-C stops an answer"


class _Stopped(Exception):
    """The answer was stopped with Ctrl-C."""


RETRY_FIRST_S, RETRY_MAX_S = 1.0, 30.0


def _retriable(exc) -> bool:
    import grpc

    from hpcserve.api.client import DaemonUnreachable

    if getattr(exc, "code", None) == grpc.StatusCode.RESOURCE_EXHAUSTED:  # a tenant limit that frees up
        return getattr(exc, "retry_after_s", None) is not None
    return isinstance(exc, DaemonUnreachable) or getattr(exc, "code", None) == grpc.StatusCode.UNAVAILABLE


class _Session:
    def __init__(self, client, system: str | None, max_tokens: int | None, temperature: float | None,
                 reconnect=None, retry_for_s: float = 0.0):
        from hpcserve.api.v1 import serving_pb2

        self.pb = serving_pb2
        self.client = client
        self.reconnect = reconnect  # () -> Client, or None: no retries
        self.retry_for_s = retry_for_s
        self.system = [{"role": "system", "content": system}] if system else []
        self.history: list[dict] = list(self.system)
        self.sampling = {"max_tokens": max_tokens, "temperature": temperature}

    def answer(self, messages: list[dict]) -> tuple[str, int]:
        """``_answer_once`` with retries of UNAVAILABLE (see the module docstring)."""
        import time

        from hpcserve.api.client import ClientError

        deadline = time.monotonic() + self.retry_for_s
        delay = RETRY_FIRST_S
        while True:
            try:
                return self._answer_once(messages)
            except ClientError as exc:
                wait = exc.retry_after_s if exc.retry_after_s is not None else delay
                if self.reconnect is None or not _retriable(exc) or time.monotonic() + wait > deadline:
                    raise
                click.echo(f"[{exc}; retrying in {wait:.0f} s]", err=True)
                if exc.retry_after_s is not None:  # the daemon said when: no reconnect needed
                    time.sleep(wait)
                    continue
            time.sleep(delay)
            delay = min(RETRY_MAX_S, delay * 2)
            try:
                new = self.reconnect()
            except ClientError:
                continue  # still unreachable: the next round tries again
            self.client.close()
            self.client = new

    def _answer_once(self, messages: list[dict]) -> tuple[str, int]:
        """Stream one answer to stdout; returns (text, finish_reason). Raises ``_Stopped`` (with
        the partial text as its argument) on Ctrl-C, ``ClientError`` if the stream breaks."""
        from hpcserve.api.client import ClientError, new_request_id

        request_id = new_request_id("chat")
        stream = self.client.chat_stream(messages, request_id=request_id, **self.sampling)
        parts: list[str] = []
        finish = self.pb.FINISH_REASON_UNSPECIFIED
        try:
            for chunk in stream:
                if chunk.text:
                    parts.append(chunk.text)  # before printing: Ctrl-C may land right after the print
                    click.echo(chunk.text, nl=False)
                if chunk.finish_reason:
                    finish = chunk.finish_reason
        except KeyboardInterrupt:
            try:
                self.client.abort(request_id)
            except ClientError:
                pass  # the daemon also stops it when the call is cancelled
            raise _Stopped("".join(parts)) from None
        except ClientError:
            if parts:
                click.echo("")
            raise
        finally:
            stream.close()
        return "".join(parts), finish

    def finish_note(self, finish: int) -> str | None:
        """An error for a failed generation (None otherwise); a note for max_tokens."""
        if finish == self.pb.FINISH_REASON_LENGTH:
            click.echo("[stopped: max_tokens or the context length reached]", err=True)
        elif finish == self.pb.FINISH_REASON_ERROR:
            return "the generation failed inside the engine (see the daemon's log)"
        elif finish == self.pb.FINISH_REASON_ABORT:
            return "the daemon aborted the request (it may be draining or restarting its workers)"
        return None

    def one_shot(self, prompt: str) -> None:
        from hpcserve.errors import HpcserveError

        try:
            _, finish = self.answer(self.history + [{"role": "user", "content": prompt}])
        except _Stopped:
            click.echo("")
            click.echo("hpcserve: interrupted", err=True)
            sys.exit(130)
        click.echo("")
        error = self.finish_note(finish)
        if error:
            raise HpcserveError(error)

    def repl(self) -> None:
        from hpcserve.api.client import ClientError

        try:
            model = self.client.server_info().model
        except ClientError:
            model = "?"
        click.echo(f"hpcserve chat with {model} at {self.client.address} ({_COMMANDS})", err=True)
        while True:
            try:
                line = _read_line()
            except EOFError:
                click.echo("", err=True)
                return
            except KeyboardInterrupt:
                click.echo("\n(use /exit or Ctrl-D to quit)", err=True)
                continue
            text = line.strip()
            if not text:
                continue
            if text in ("/exit", "/quit"):
                return
            if text == "/reset":
                self.history = list(self.system)
                click.echo("(conversation cleared)", err=True)
                continue
            if text == "/help":
                click.echo(_COMMANDS, err=True)
                continue
            self.turn(line.rstrip("\r\n"))

    def turn(self, text: str) -> None:
        from hpcserve.api.client import ClientError

        self.history.append({"role": "user", "content": text})
        try:
            answer, finish = self.answer(self.history)
        except _Stopped as stopped:
            answer, finish = stopped.args[0], None
            click.echo("")
            click.echo("[stopped]", err=True)
        except ClientError as exc:
            click.echo(f"hpcserve: error: {exc}", err=True)
            self.history.pop()
            return
        else:
            click.echo("")
            error = self.finish_note(finish)
            if error:
                click.echo(f"hpcserve: error: {error}", err=True)
        if answer:
            self.history.append({"role": "assistant", "content": answer})
        else:
            self.history.pop()


def _read_line() -> str:
    if sys.stdin.isatty() and sys.stdout.isatty():
        try:
            import readline
        except ImportError:
            pass
        return input("> ")
    click.echo("> ", nl=False, err=True)
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line


@click.command("chat", help=_HELP, short_help="Chat with the daemon's model (one-shot or REPL).")
@click.option("-p", "--prompt", metavar="TEXT", default=None,
              help="Ask this one question, print the answer and exit ('-' reads it from stdin).")
@click.option("--system", metavar="TEXT", default=None, help="System message that starts the conversation.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=None, metavar="N",
              help="Most tokens per answer (>= 1); default: the daemon's.")
@click.option("--temperature", type=click.FloatRange(0, 100), default=None, metavar="T",
              help="Sampling temperature in [0, 100]; 0 is greedy. Default: the daemon's.")
@click.option("--retry-for", type=click.FloatRange(0), default=120.0, show_default=True, metavar="SECONDS",
              help="Keep retrying an answer the daemon cannot give now (UNAVAILABLE: workers relaunching, "
                   "allocation ending or starting; with backoff) or not yet (a tenant limit: after its "
                   "retry-after) for this long; 0 disables retries.")
@daemon_options
def chat(prompt: str | None, system: str | None, max_tokens: int | None, temperature: float | None,
         retry_for: float, endpoint: str | None, state_dir: str | None) -> None:
    if prompt == "-":
        prompt = sys.stdin.read().rstrip()
    if prompt is not None and not prompt.strip():
        raise click.BadParameter("the prompt is empty", param_hint="--prompt")
    session = _Session(connect(endpoint, state_dir), system, max_tokens, temperature,
                       reconnect=lambda: connect(endpoint, state_dir), retry_for_s=retry_for)
    try:
        if prompt is not None:
            session.one_shot(prompt)
        else:
            session.repl()
    finally:
        session.client.close()
