"""The client library and the CLI commands submit/status/results/cancel/chat against a real
grpc.aio server (background thread) whose batch RPCs run BatchApi over a real BatchStore;
the state dir's endpoint.json is written with write_endpoint. No torch, no model: threads
play the daemon's scheduler, and Chat is scripted (see batch_server_harness)."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from batch_server_harness import FakeServing, ServerThread, answer_lines
from click.testing import CliRunner

from hpcserve.api.batch_api import BatchApi
from hpcserve.api.client import Client, DaemonUnreachable, Unauthenticated, resolve_token
from hpcserve.cli import main
from hpcserve.daemon.batch_policy import BatchPolicy
from hpcserve.daemon.batches import BatchStore
from hpcserve.daemon.endpoint import Endpoint, write_endpoint

TOKEN = "tok-123"
REPO = Path(__file__).resolve().parent.parent
CHAT = "/v1/chat/completions"


def req(cid: str) -> str:
    return json.dumps({"custom_id": cid, "method": "POST", "url": CHAT,
                       "body": {"messages": [{"role": "user", "content": f"hi {cid}"}]}})


class Daemon:
    def __init__(self, tmp_path: Path):
        self.state = tmp_path / "state"
        self.store = BatchStore(self.state)
        self.api = BatchApi(self.store, BatchPolicy(("1h", "2h", "24h")))
        self.api.poll_interval_s = 0.05
        self.servicer = FakeServing(self.api)
        self.server = ServerThread(self.servicer, token=TOKEN)
        write_endpoint(self.state, self.server.address, token=TOKEN)
        self.tmp = tmp_path

    def run(self, *args: str, input: str | None = None, env: dict | None = None):
        runner = CliRunner()
        return runner.invoke(main, [*args, "--state-dir", str(self.state)], input=input, env=env,
                             catch_exceptions=False)

    def write(self, name: str, *lines: str) -> Path:
        p = self.tmp / name
        p.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return p


@pytest.fixture
def daemon(tmp_path, monkeypatch):
    for var in ("HPCSERVE_ENDPOINT", "HPCSERVE_TOKEN", "HPCSERVE_STATE_DIR"):
        monkeypatch.delenv(var, raising=False)
    d = Daemon(tmp_path)
    yield d
    d.server.stop()
    d.store.close()


def one_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.stderr
    assert lines[0].startswith("hpcserve: error: "), lines
    return lines[0]


def test_submit_status_results_cancel(daemon):
    inp = daemon.write("in.jsonl", req("a"), "{bad", req("b"), req("c"))
    r = daemon.run("submit", str(inp), "--metadata", "project=x", "--completion-window", "2h")
    assert r.exit_code == 0, r.output
    bid = r.stdout.strip()
    assert r.stdout == bid + "\n" and bid.startswith("batch_")

    r = daemon.run("status", bid, "--json")
    b = json.loads(r.stdout)
    assert set(b) >= {"id", "object", "status", "request_counts", "usage", "metadata", "created_at", "errors"}
    assert (b["id"], b["status"], b["metadata"], b["completion_window"]) == (bid, "in_progress", {"project": "x"}, "2h")
    assert b["request_counts"] == {"total": 4, "completed": 0, "failed": 1} and b["completed_at"] is None
    r = daemon.run("status", bid)
    assert f"{bid}: in_progress" in r.stdout and "1/4 done" in r.stdout and "project=x" in r.stdout

    out, err = daemon.tmp / "out.jsonl", daemon.tmp / "err.jsonl"
    (c,) = daemon.store.claim_lines(1, batch_id=bid)
    from batch_server_harness import fake_output

    daemon.store.record_result(bid, c.line_no, fake_output(c), False)
    r = daemon.run("results", bid, "-o", str(out), "--errors", str(err))
    assert r.exit_code == 0
    assert "2 of 4 lines still pending" in r.stderr
    assert [json.loads(x)["custom_id"] for x in out.read_text().splitlines()] == ["a"]
    assert json.loads(err.read_text())["error"]["code"] == "invalid_json"
    assert not list(daemon.tmp.glob("*.partial"))

    r = daemon.run("status")
    assert r.exit_code == 0
    assert "tiny-model" in r.stdout and "replica 0 (mixed, ranks 0,1)" in r.stdout and bid in r.stdout
    assert "Slurm job 4242" in r.stdout
    r = daemon.run("status", "--json")
    both = json.loads(r.stdout)
    assert both["server"]["model"] == "tiny-model" and both["server"]["replicas"][0]["role"] == "mixed"
    assert [x["id"] for x in both["batches"]] == [bid]

    r = daemon.run("cancel", bid)
    assert r.exit_code == 0 and r.stdout == "cancelled\n"
    r = daemon.run("results", bid, "-o", str(out))  # errors go into OUT after the outputs
    assert [json.loads(x)["custom_id"] for x in out.read_text().splitlines()] == ["a", None]
    assert "2 lines never ran" in r.stderr
    final = daemon.store.get_batch(bid)
    assert out.read_text() == Path(final["output_file"]).read_text() + Path(final["error_file"]).read_text()

    r = daemon.run("status", "batch_nope")
    assert r.exit_code == 2 and "no batch with id 'batch_nope'" in one_error_line(r)


def test_submit_wait_completes(daemon):
    inp = daemon.write("in.jsonl", req("a"), req("b"), "{bad", req("c"))
    out, err = daemon.tmp / "out.jsonl", daemon.tmp / "err.jsonl"
    threading.Thread(target=lambda: _answer_when_submitted(daemon.store), daemon=True).start()
    r = daemon.run("submit", str(inp), "--wait", "-o", str(out), "--errors", str(err))
    assert r.exit_code == 0, r.output
    assert r.stdout.count("\n") == 1 and r.stdout.startswith("batch_")
    assert "completed: 3 completed, 1 failed of 4; 21 output tokens" in r.stderr and "tok/s" in r.stderr
    assert [json.loads(x)["custom_id"] for x in out.read_text().splitlines()] == ["a", "b", "c"]
    assert len(err.read_text().splitlines()) == 1


def _answer_when_submitted(store: BatchStore) -> None:
    deadline = time.time() + 10
    while time.time() < deadline:
        batches = store.list_batches(limit=1)
        if batches:
            answer_lines(store, batches[0]["id"], delay=0.1).join(10)
            return
        time.sleep(0.05)


def test_submit_wait_not_completed_exits_1(daemon):
    bad = daemon.write("bad.jsonl", "{bad", "[1]")
    r = daemon.run("submit", str(bad), "--wait")
    assert r.exit_code == 1
    assert "failed: line 1: invalid_json" in r.stderr.splitlines()[-1]

    inp = daemon.write("in.jsonl", req("a"), req("b"))

    def cancel_soon() -> None:
        time.sleep(0.3)
        daemon.store.cancel_batch(daemon.store.list_batches(limit=1)[0]["id"])

    threading.Thread(target=cancel_soon, daemon=True).start()
    r = daemon.run("submit", str(inp), "--wait", "--no-progress")
    assert r.exit_code == 1 and "was cancelled; 2 of 2 lines did not run" in r.stderr.splitlines()[-1]


def test_usage_errors_and_unreachable(daemon, tmp_path):
    inp = daemon.write("in.jsonl", req("a"))
    r = daemon.run("submit", str(inp), "-o", str(tmp_path / "o.jsonl"))
    assert r.exit_code == 2 and "need --wait" in r.stderr and "hpcserve results" in r.stderr
    r = daemon.run("submit", str(tmp_path / "nope.jsonl"))
    assert r.exit_code == 2 and "input file" in one_error_line(r) and "does not exist" in r.stderr
    r = daemon.run("submit", str(inp), "--completion-window", "soon")
    assert r.exit_code == 2 and "completion_window: must be one of" in one_error_line(r)
    r = daemon.run("results", "batch_x", "-o", str(tmp_path / "no-dir" / "o.jsonl"))
    assert r.exit_code == 2 and "does not exist" in one_error_line(r)

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    r = daemon.run("status", "--endpoint", f"127.0.0.1:{port}")
    assert r.exit_code == 2 and time.monotonic() - t0 < 5
    line = one_error_line(r)
    assert f"cannot reach the hpcserve daemon at 127.0.0.1:{port} (from --endpoint): is `hpcserve serve` running?" in line
    r = CliRunner().invoke(main, ["status", "--state-dir", str(tmp_path / "empty")])
    assert r.exit_code == 2 and "no hpcserve daemon found" in one_error_line(r)


def test_token_resolution(daemon, tmp_path):
    addr = daemon.server.address
    file_ep = Endpoint(addr, token="from-file", source="/s/endpoint.json")
    assert resolve_token(file_ep, env={"HPCSERVE_TOKEN": "env"}) == ("from-file", "/s/endpoint.json")
    assert resolve_token(Endpoint(addr, source="/s/endpoint.json"), env={"HPCSERVE_TOKEN": "env"})[0] == "env"
    flag_ep = Endpoint(addr, source="--endpoint")
    assert resolve_token(flag_ep, daemon.state, env={"HPCSERVE_TOKEN": "env"})[0] == "env"
    assert resolve_token(flag_ep, daemon.state, env={})[0] == TOKEN  # the state dir file names this address
    other = Endpoint("127.0.0.1:1", source="HPCSERVE_ENDPOINT")
    assert resolve_token(other, daemon.state, env={}) == (None, None)

    # end to end: --endpoint + matching state dir file -> works; a wrong HPCSERVE_TOKEN wins and fails
    assert daemon.run("status", "--endpoint", addr).exit_code == 0
    r = daemon.run("status", "--endpoint", addr, env={"HPCSERVE_TOKEN": "wrong"})
    assert r.exit_code == 2
    line = one_error_line(r)
    assert "refused the call (the token from HPCSERVE_TOKEN)" in line and "HPCSERVE_TOKEN" in line
    r = CliRunner().invoke(main, ["status", "--endpoint", addr, "--state-dir", str(tmp_path / "none")],
                           env={"HPCSERVE_ENDPOINT": None})
    assert r.exit_code == 2 and "no token" in one_error_line(r)
    with Client.connect(None, None, env={"HPCSERVE_ENDPOINT": addr, "HPCSERVE_TOKEN": TOKEN}) as c:
        assert c.server_info().model == "tiny-model"
    with Client.connect(addr, tmp_path / "none", env={}) as c, pytest.raises(Unauthenticated):
        c.list_batches()


def test_client_errors_after_daemon_stops(daemon):
    client = Client.connect(None, daemon.state)
    assert client.list_batches() == ([], False)
    daemon.server.stop()
    with pytest.raises(DaemonUnreachable, match="cannot reach the hpcserve daemon"):
        client.get_batch("batch_x")
    client.close()
    daemon.server = ServerThread(daemon.servicer, token=TOKEN)  # for the fixture's teardown


def test_chat_one_shot_and_validation(daemon):
    r = daemon.run("chat", "--prompt", "hello there", "--system", "be brief", "--max-tokens", "5",
                   "--temperature", "0")
    assert r.exit_code == 0 and r.stdout == "echo 2: hello there\n"
    sent = daemon.servicer.chats[-1]
    assert [m.role for m in sent.messages] == ["system", "user"]
    assert sent.sampling_params.max_tokens == 5 and sent.sampling_params.HasField("temperature")
    assert sent.request_id.startswith("chat-")
    r = daemon.run("chat", "--prompt", "-", input="from stdin\n")
    assert r.stdout == "echo 1: from stdin\n"
    r = daemon.run("chat", "--prompt", "long")
    assert r.exit_code == 0 and "max_tokens" in r.stderr

    r = daemon.run("chat", "--prompt", "break", "--retry-for", "0")
    assert r.exit_code == 2 and r.stdout == "partial\n"
    assert one_error_line(r) == "hpcserve: error: workers died: relaunching them; retry shortly"
    r = daemon.run("chat", "--prompt", "break", "--retry-for", "3.5")  # UNAVAILABLE: 1 s, 2 s, then give up
    assert r.exit_code == 2 and r.stdout == "partial\n" * 3
    assert r.stderr.count("retrying in 1 s") == 1 and r.stderr.count("retrying in 2 s") == 1
    assert "retrying in 4 s" not in r.stderr and "Traceback" not in r.stderr
    r = daemon.run("chat", "--prompt", "fail")
    assert r.exit_code == 2 and "failed inside the engine" in one_error_line(r)
    for args, want in ((["--max-tokens", "0"], "--max-tokens"), (["--temperature", "101"], "--temperature")):
        r = daemon.run("chat", "--prompt", "x", *args)
        assert r.exit_code == 2 and want in r.stderr and "Traceback" not in r.output


def test_chat_repl_history_reset_and_errors(daemon):
    r = daemon.run("chat", "--system", "sys", "--retry-for", "0", input="hello\n\nagain\nbreak\n/reset\nthird\n/exit\nignored\n")
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines() == ["echo 2: hello", "echo 4: again", "partial", "echo 2: third"]
    assert "hpcserve: error: workers died" in r.stderr and "(conversation cleared)" in r.stderr
    assert "tiny-model" in r.stderr and r.stderr.count("> ") >= 6
    counts = [len(c.messages) for c in daemon.servicer.chats]
    assert counts == [2, 4, 6, 2]  # the broken turn is dropped from the history
    assert [m.content for m in daemon.servicer.chats[2].messages] == ["sys", "hello", "echo 2: hello", "again",
                                                                     "echo 4: again", "break"]
    r = daemon.run("chat", input="only\n")  # EOF ends the REPL
    assert r.exit_code == 0 and r.stdout == "echo 1: only\n"


def test_chat_ctrl_c_aborts_the_answer(daemon):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    # SIG_DFL for SIGINT in the child, so Python installs its Ctrl-C handler even when this test runs
    # under a shell that started it in the background (which ignores SIGINT, and children inherit that)
    p = subprocess.Popen([sys.executable, "-m", "hpcserve", "chat", "--state-dir", str(daemon.state)], cwd=REPO,
                         env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # noqa: PLW1509
    try:
        p.stdin.write(b"slow\n")
        p.stdin.flush()
        got = b""
        deadline = time.time() + 15
        while b"tick" not in got and time.time() < deadline:
            if select.select([p.stdout], [], [], 0.2)[0]:
                got += os.read(p.stdout.fileno(), 4096)
        assert b"tick" in got
        p.send_signal(signal.SIGINT)
        deadline = time.time() + 30
        while not daemon.servicer.aborted and time.time() < deadline:
            time.sleep(0.05)
        assert daemon.servicer.aborted == [daemon.servicer.chats[0].request_id]
        out, err = p.communicate(b"again\n/exit\n", timeout=15)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, err
    assert b"[stopped]" in err and b"Traceback" not in err
    assert (got + out).decode().rstrip().endswith("echo 3: again")
    assert [m.role for m in daemon.servicer.chats[1].messages] == ["user", "assistant", "user"]


def test_submit_by_path_and_follow_results(daemon):
    inp = daemon.write("in.jsonl", req("a"), req("b"))
    r = daemon.run("submit", "--by-path", str(inp))
    assert r.exit_code == 0, r.output
    bid = r.stdout.strip()
    with Client.connect(None, daemon.state) as client:
        assert client.get_batch(bid)["input_file"] == str(inp)
        answer_lines(daemon.store, bid, delay=0.05)
        got = list(client.iter_batch_results(bid, follow=True))
        assert [(cid, err) for cid, _, err in got] == [("a", False), ("b", False)]
        assert client.get_batch(bid)["status"] == "completed"
        inline = client.submit_batch(req("z").encode(), completion_window="1h", metadata={"k": "v"})
        assert inline["metadata"] == {"k": "v"} and inline["completion_window"] == "1h"
        batches, has_more = client.list_batches(limit=1)
        assert [b["id"] for b in batches] == [inline["id"]] and has_more
