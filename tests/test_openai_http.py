"""End-to-end: the official ``openai`` SDK against a real daemon's OpenAI-compatible HTTP API
(``hpcserve serve --http``), with tenants from a site config and keys made by ``hpcserve keys``.

One daemon (1 worker rank under the venv's mpiexec, a tiny random model) serves every test:
chat (streamed and not) equals the gRPC stream of the same greedy request; completions; a
batch through files.create → batches.create → polling → files.content; wrong, revoked and
late-added keys; a per-minute request limit (429 + Retry-After) and a daily token quota on
HTTP and gRPC; tenant isolation of batches and files; model permissions; bad input (the
daemon keeps serving); per-tenant usage over gRPC; admin-only Drain."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import grpc
import openai
import pytest
from daemon_harness import Daemon, chat_line, keys_cli, reap_all

from hpcserve.api.v1 import serving_pb2 as pb

pytestmark = pytest.mark.slow

TENANTS = """
[auth]
keys-file = "{keys}"
endpoint-tenant = "ops"

[tenants.ops]
admin = true

[tenants.alice]

[tenants.bob]

[tenants.limited]
requests-per-minute = 2

[tenants.quota]
daily-token-quota = 120

[tenants.nomodel]
models = ["some-other-model"]

[tenants.batchonly]
max-priority = "batch"

[tenants.onepm]
requests-per-minute = 1
"""


@pytest.fixture(autouse=True, scope="module")
def _reap_daemons():
    yield
    reap_all()


@pytest.fixture(scope="module")
def site(tiny_model_factory, tmp_path_factory):
    root = tmp_path_factory.mktemp("openai-http")
    config = root / "site.toml"
    config.write_text(TENANTS.format(keys=root / "keys.json"))
    keys = {t: keys_cli(config, "add", "--tenant", t) for t in ("alice", "bob", "limited", "quota", "nomodel", "batchonly", "onepm")}
    d = Daemon(root / "state", tiny_model_factory("llama"), ranks=1,
               extra_args=("--config", str(config), "--http", "127.0.0.1:0")).start()
    ep = json.loads((root / "state" / "endpoint.json").read_text())
    yield {"daemon": d, "config": config, "keys": keys, "http": ep["http"], "ops": ep["token"]}
    assert d.stop() == 0, d.log_tail()


def _client(site, tenant: str, **kw) -> openai.OpenAI:
    key = site["ops"] if tenant == "ops" else site["keys"].get(tenant, tenant)
    return openai.OpenAI(api_key=key, base_url=f"http://{site['http']}/v1", max_retries=0, timeout=120, **kw)


def _grpc_md(key: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")]


def _grpc_chat_text(site, key: str, content: str, max_tokens: int) -> tuple[str, list[int]]:
    d = site["daemon"]
    req = pb.ChatRequest(messages=[pb.ChatMessage(role="user", content=content)],
                         sampling_params=pb.SamplingParams(max_tokens=max_tokens, temperature=0))
    text, ids = [], []
    for c in d.stub.Chat(req, metadata=_grpc_md(key), timeout=300):
        text.append(c.text)
        ids.extend(c.token_ids)
    return "".join(text), ids


# ---------------------------------------------------------------------- chat and completions
def test_models_list(site):
    models = _client(site, "alice").models.list()
    assert [m.id for m in models.data] == [site["daemon"].info().model]
    assert _client(site, "nomodel").models.list().data == []


def test_chat_not_streamed_equals_grpc_stream(site):
    content = "Tell me a story about a red fox"
    ref_text, ref_ids = _grpc_chat_text(site, site["keys"]["alice"], content, 20)
    r = _client(site, "alice").chat.completions.create(
        model=site["daemon"].info().model, messages=[{"role": "user", "content": content}], max_tokens=20,
        temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref_text
    assert r.usage.completion_tokens == len(ref_ids) and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_streamed_equals_not_streamed(site):
    c = _client(site, "alice")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is MPI?"}]
    whole = c.chat.completions.create(model="", messages=msgs, max_tokens=24, temperature=0)
    chunks = list(c.chat.completions.create(model="", messages=msgs, max_tokens=24, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[0].choices[0].delta.role == "assistant"


def test_completions_streamed_and_not(site):
    c = _client(site, "bob")
    whole = c.completions.create(model=site["daemon"].info().model, prompt="The capital of France is",
                                 max_tokens=12, temperature=0)
    assert whole.object == "text_completion" and whole.usage.completion_tokens >= 1
    parts = list(c.completions.create(model=site["daemon"].info().model, prompt="The capital of France is",
                                      max_tokens=12, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in parts) == whole.choices[0].text
    assert parts[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_n_choices_whole_and_streamed(site):
    c = _client(site, "alice")
    msgs = [{"role": "user", "content": "Pick a random animal"}]
    one = c.chat.completions.create(model="", messages=msgs, max_tokens=8, temperature=0)
    three = c.chat.completions.create(model="", messages=msgs, max_tokens=8, temperature=0, n=3)
    assert [ch.index for ch in three.choices] == [0, 1, 2]
    assert {ch.message.content for ch in three.choices} == {one.choices[0].message.content}  # greedy: all equal
    assert three.usage.prompt_tokens == one.usage.prompt_tokens
    assert three.usage.completion_tokens == 3 * one.usage.completion_tokens
    seeded = {"model": "", "messages": msgs, "max_tokens": 8, "temperature": 1.0, "seed": 7, "n": 2}
    a, b = c.chat.completions.create(**seeded), c.chat.completions.create(**seeded)
    assert [x.message.content for x in a.choices] == [x.message.content for x in b.choices]  # reproducible
    parts: dict[int, list[str]] = {0: [], 1: []}
    for ch in c.chat.completions.create(**seeded, stream=True):
        for choice in ch.choices:
            parts[choice.index].append(choice.delta.content or "")
    assert ["".join(parts[i]) for i in (0, 1)] == [x.message.content for x in a.choices]
    for bad in (0, 17):
        with pytest.raises(openai.BadRequestError) as err:
            c.chat.completions.create(model="", messages=msgs, n=bad)
        assert "n:" in err.value.message


# ---------------------------------------------------------------------- batches and files
def _run_batch(client, lines: list[str], timeout: float = 300):
    f = client.files.create(file=("in.jsonl", ("\n".join(lines) + "\n").encode()), purpose="batch")
    assert f.object == "file" and f.purpose == "batch" and f.bytes > 0
    b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                              metadata={"job": "test"})
    assert b.input_file_id == f.id and b.metadata == {"job": "test"}
    deadline = time.monotonic() + timeout
    while b.status not in ("completed", "failed", "expired", "cancelled"):
        assert time.monotonic() < deadline, b
        time.sleep(0.3)
        b = client.batches.retrieve(b.id)
    return f, b


def test_batch_end_to_end(site):
    c = _client(site, "alice")
    lines = [chat_line(f"q{i}", f"question number {i}", 8) for i in range(6)]
    lines.insert(3, '{"custom_id": "bad", "method": "POST", "url": "/v1/chat/completions", "body": {}}')
    _, b = _run_batch(c, lines)
    assert b.status == "completed", b
    assert (b.request_counts.total, b.request_counts.completed, b.request_counts.failed) == (7, 6, 1)
    out = [json.loads(x) for x in c.files.content(b.output_file_id).text.splitlines()]
    assert sorted(o["custom_id"] for o in out) == [f"q{i}" for i in range(6)]
    errs = [json.loads(x) for x in c.files.content(b.error_file_id).text.splitlines()]
    assert [e["custom_id"] for e in errs] == ["bad"] and errs[0]["error"]["code"] == "missing_field"
    # a batch line's answer equals the same request made interactively (greedy)
    live = c.chat.completions.create(model="", messages=[{"role": "user", "content": "question number 2"}],
                                     max_tokens=8, temperature=0)
    q2 = next(o for o in out if o["custom_id"] == "q2")
    assert q2["response"]["body"]["choices"][0]["message"]["content"] == live.choices[0].message.content
    assert b.id in [x.id for x in c.batches.list(limit=100).data]
    assert c.files.retrieve(b.output_file_id).purpose == "batch_output"


def test_tenant_cannot_see_another_tenants_batch_or_file(site):
    alice, bob = _client(site, "alice"), _client(site, "bob")
    f, b = _run_batch(alice, [chat_line("only", "private question", 4)])
    for call in (lambda: bob.batches.retrieve(b.id), lambda: bob.files.retrieve(f.id),
                 lambda: bob.files.content(f.id), lambda: bob.files.content(b.output_file_id),
                 lambda: bob.batches.cancel(b.id), lambda: bob.batches.create(
                     input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")):
        with pytest.raises(openai.NotFoundError):
            call()
    assert b.id not in [x.id for x in bob.batches.list(limit=100).data]
    assert f.id not in [x.id for x in bob.files.list().data]
    with pytest.raises(grpc.RpcError) as err:
        site["daemon"].stub.GetBatch(pb.GetBatchRequest(batch_id=b.id), metadata=_grpc_md(site["keys"]["bob"]),
                                     timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert alice.batches.retrieve(b.id).status == "completed"  # the owner still can


# ---------------------------------------------------------------------- keys, limits, permissions
def test_wrong_key_is_rejected_on_http_and_grpc(site):
    with pytest.raises(openai.AuthenticationError) as err:
        _client(site, "hps_not-a-real-key").models.list()
    assert "key" in str(err.value)
    with pytest.raises(grpc.RpcError) as gerr:
        _grpc_chat_text(site, "hps_not-a-real-key", "hi", 2)
    assert gerr.value.code() == grpc.StatusCode.UNAUTHENTICATED
    req = urllib.request.Request(f"http://{site['http']}/v1/models")  # no Authorization header at all
    with pytest.raises(urllib.error.HTTPError) as herr:
        urllib.request.urlopen(req, timeout=30)
    assert herr.value.code == 401 and "error" in json.loads(herr.value.read())


def test_key_added_and_revoked_while_running(site):
    key = keys_cli(site["config"], "add", "--tenant", "bob", "--note", "late")
    deadline = time.monotonic() + 30
    while True:  # the daemon re-reads the keys file within about a second
        try:
            _client(site, key).models.list()
            break
        except openai.AuthenticationError:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    listed = json.loads(keys_cli(site["config"], "list", "--json"))
    key_id = next(k["key_id"] for k in listed if k["note"] == "late")
    keys_cli(site["config"], "revoke", key_id)
    deadline = time.monotonic() + 30
    while True:
        try:
            _client(site, key).models.list()
        except openai.AuthenticationError:
            break
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_rate_limit_returns_429_with_retry_after(site):
    c = _client(site, "limited")
    for _ in range(2):
        c.completions.create(model="", prompt="one", max_tokens=1)
    with pytest.raises(openai.RateLimitError) as err:
        c.completions.create(model="", prompt="one", max_tokens=1)
    assert int(err.value.response.headers["retry-after"]) >= 1
    assert "requests-per-minute" in err.value.message
    with pytest.raises(grpc.RpcError) as gerr:  # the same tenant over gRPC shares the limit
        _grpc_chat_text(site, site["keys"]["limited"], "hi", 1)
    assert gerr.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert int(dict(gerr.value.trailing_metadata())["retry-after"]) >= 1


def test_cli_chat_waits_out_a_rate_limit(site):
    _client(site, "onepm").completions.create(model="", prompt="first", max_tokens=1)  # the minute's one request
    no_wait = _cli(site, "chat", "--prompt", "second", "--max-tokens", "2", "--retry-for", "0",
                   key=site["keys"]["onepm"])
    assert no_wait.returncode != 0 and "requests-per-minute" in no_wait.stderr
    waited = _cli(site, "chat", "--prompt", "second", "--max-tokens", "2", "--retry-for", "120",
                  key=site["keys"]["onepm"])
    assert waited.returncode == 0, waited.stderr
    assert "retrying in" in waited.stderr and waited.stdout.strip()


def test_daily_token_quota_is_enforced(site):
    c = _client(site, "quota")
    used, served = 0, 0
    while used < 120:
        r = c.chat.completions.create(model="", messages=[{"role": "user", "content": "count to ten"}],
                                      max_tokens=8, temperature=0)
        used += r.usage.total_tokens
        served += 1
        assert served < 50
    with pytest.raises(openai.RateLimitError) as err:  # the first request after the quota is used up
        c.chat.completions.create(model="", messages=[{"role": "user", "content": "count"}], max_tokens=1)
    assert err.value.code == "insufficient_quota" and int(err.value.response.headers["retry-after"]) >= 1
    usage = site["daemon"].stub.GetUsage(pb.GetUsageRequest(), metadata=_grpc_md(site["keys"]["quota"]), timeout=10)
    row = next(t for t in usage.tenants if t.tenant == "quota")
    assert row.tokens_today == used and row.daily_token_quota == 120 and row.requests == served


def test_priority_cap_schedules_a_tenants_chats_as_batch(site):
    d = site["daemon"]

    def last_chunk(tenant: str, request_class=pb.REQUEST_CLASS_UNSPECIFIED):
        req = pb.ChatRequest(messages=[pb.ChatMessage(role="user", content="hi")], request_class=request_class,
                             sampling_params=pb.SamplingParams(max_tokens=2, temperature=0))
        return list(d.stub.Chat(req, metadata=_grpc_md(site["keys"][tenant]), timeout=300))[-1]

    assert last_chunk("alice").metrics.request_class == pb.REQUEST_CLASS_INTERACTIVE
    assert last_chunk("alice", pb.REQUEST_CLASS_BATCH).metrics.request_class == pb.REQUEST_CLASS_BATCH
    capped = last_chunk("batchonly", pb.REQUEST_CLASS_INTERACTIVE)  # asks for interactive, runs as batch
    assert capped.metrics.request_class == pb.REQUEST_CLASS_BATCH and capped.usage.completion_tokens >= 1
    r = _client(site, "batchonly").chat.completions.create(model="", messages=[{"role": "user", "content": "x"}],
                                                           max_tokens=2)  # served over HTTP too, never refused
    assert r.usage.completion_tokens >= 1


def test_model_permission_and_bad_input(site):
    with pytest.raises(openai.PermissionDeniedError):
        _client(site, "nomodel").chat.completions.create(model="", messages=[{"role": "user", "content": "x"}])
    c = _client(site, "bob")
    with pytest.raises(openai.NotFoundError) as nf:
        c.chat.completions.create(model="gpt-unknown", messages=[{"role": "user", "content": "x"}])
    assert nf.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        c.chat.completions.create(model="", messages=[{"role": "user", "content": "x"}], temperature="hot")
    assert bad.value.param == "temperature" or "temperature" in bad.value.message
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="", messages=[])
    with pytest.raises(openai.BadRequestError) as ctx:
        c.completions.create(model="", prompt="word " * 5000, max_tokens=4)
    assert "context" in ctx.value.message or "tokens" in ctx.value.message
    req = urllib.request.Request(f"http://{site['http']}/v1/chat/completions", data=b"{not json", method="POST",
                                 headers={"Authorization": f"Bearer {site['keys']['bob']}",
                                          "Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as herr:
        urllib.request.urlopen(req, timeout=30)
    body = json.loads(herr.value.read())
    assert herr.value.code == 400 and "JSON" in body["error"]["message"]
    with pytest.raises(openai.BadRequestError) as md:  # the gRPC batch API's metadata rules, checked first
        c.batches.create(input_file_id="file-none", endpoint="/v1/chat/completions", completion_window="24h",
                         metadata={"k": "v" * 600})
    assert md.value.param == "metadata"
    # still serving
    assert c.completions.create(model="", prompt="still alive", max_tokens=2).usage.completion_tokens >= 1


def test_usage_per_tenant_and_admin_rpcs(site):
    c = _client(site, "bob")
    rs = [c.completions.create(model="", prompt=f"usage probe {i}", max_tokens=5, temperature=0) for i in range(3)]
    d = site["daemon"]
    mine = d.stub.GetUsage(pb.GetUsageRequest(), metadata=_grpc_md(site["keys"]["bob"]), timeout=10)
    assert [t.tenant for t in mine.tenants] == ["bob"]
    everyone = d.stub.GetUsage(pb.GetUsageRequest(), metadata=_grpc_md(site["ops"]), timeout=10)
    names = {t.tenant for t in everyone.tenants}
    assert {"alice", "bob", "ops"} <= names
    bob = mine.tenants[0]
    assert bob.requests >= 3 and bob.gpu_seconds > 0
    assert bob.output_tokens >= sum(r.usage.completion_tokens for r in rs)
    assert everyone.allocation_gpu_seconds > 0 and not mine.allocation_gpu_seconds  # server-wide: admin only
    with pytest.raises(grpc.RpcError) as err:
        d.stub.Drain(pb.DrainRequest(), metadata=_grpc_md(site["keys"]["alice"]), timeout=10)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    info = d.stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=_grpc_md(site["keys"]["alice"]), timeout=10)
    assert info.tenant == "alice" and not info.is_admin and not info.replicas and info.is_ready


def _cli(site, *args, key: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("HPCSERVE_API_KEY", "HPCSERVE_TOKEN")}
    if key is not None:
        env["HPCSERVE_API_KEY"] = key
    return subprocess.run([sys.executable, "-m", "hpcserve", *args, "--state-dir", str(site["daemon"].state_dir)],
                          capture_output=True, text=True, timeout=240, env=env, check=False)


def test_admin_manages_keys_through_the_daemon(site):
    made = _cli(site, "keys", "add", "--remote", "--tenant", "bob", "--note", "remote")  # endpoint.json: admin
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert _client(site, key).models.list().data  # works at once: the daemon re-reads what it wrote
    listed = _cli(site, "keys", "list", "--remote", "--json", "--tenant", "bob")
    row = next(k for k in json.loads(listed.stdout) if k["note"] == "remote")
    assert row["status"] == "active" and key.startswith(row["hint"].rstrip("…"))
    assert key not in (site["config"].parent / "keys.json").read_text()  # only the digest is stored
    denied = _cli(site, "keys", "add", "--remote", "--tenant", "alice", key=site["keys"]["alice"])
    assert denied.returncode == 2 and "admin" in denied.stderr
    unknown = _cli(site, "keys", "add", "--remote", "--tenant", "nobody")
    assert unknown.returncode == 2 and "nobody" in unknown.stderr and "tenants" in unknown.stderr
    assert _cli(site, "keys", "revoke", "--remote", row["key_id"]).returncode == 0
    with pytest.raises(openai.AuthenticationError):
        _client(site, key).models.list()


def test_status_tenants_and_drain_from_the_cli(site):  # last in the module: it drains the daemon
    mine = _cli(site, "status", "--tenants", "--json", key=site["keys"]["alice"])
    assert mine.returncode == 0, mine.stderr
    assert [t["tenant"] for t in json.loads(mine.stdout)["tenants"]] == ["alice"]
    every = _cli(site, "status", "--tenants")  # the endpoint.json key: tenant ops, admin
    assert every.returncode == 0, every.stderr
    assert all(name in every.stdout for name in ("alice", "bob", "quota")) and "rank-seconds" in every.stdout
    plain = _cli(site, "status", key=site["keys"]["alice"])
    assert plain.returncode == 0 and "your key: tenant alice;" in plain.stdout and "replica 0" not in plain.stdout
    admin = _cli(site, "status")
    assert "your key: tenant ops (admin)" in admin.stdout and "replica 0" in admin.stdout
    denied = _cli(site, "drain", key=site["keys"]["alice"])
    assert denied.returncode == 2 and "admin" in denied.stderr
    ok = _cli(site, "drain")
    assert ok.returncode == 0, ok.stderr
    assert site["daemon"].proc.wait(timeout=120) == 0
