"""Stream a chat answer through the daemon's OpenAI-compatible HTTP API with the openai SDK.

The daemon (`hpcserve serve --http HOST:PORT`) writes its HTTP address and a key into
endpoint.json in its state dir (HPCSERVE_STATE_DIR, default ~/.hpcserve); any OpenAI client
works by pointing base_url at it."""

import json
import os
import sys
from pathlib import Path

import openai

state = Path(os.path.expanduser(os.environ.get("HPCSERVE_STATE_DIR", "~/.hpcserve")))
ep = json.loads((state / "endpoint.json").read_text())
if not ep.get("http"):
    sys.exit("the daemon serves no HTTP API: start it with `hpcserve serve --http 127.0.0.1:8000`")
scheme = "https" if ep.get("tls_ca") else "http"
client = openai.OpenAI(base_url=f"{scheme}://{ep['http']}/v1", api_key=os.environ.get("HPCSERVE_API_KEY", ep["token"]))

question = " ".join(sys.argv[1:]) or "What is the capital of France?"
model = client.models.list().data[0].id
print(f"user> {question}\nassistant (openai SDK, {scheme}://{ep['http']}/v1, model {model})> ", end="", flush=True)
stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                        max_tokens=64, temperature=0, stream=True,
                                        stream_options={"include_usage": True})
for chunk in stream:
    if chunk.choices:
        print(chunk.choices[0].delta.content or "", end="", flush=True)
    elif chunk.usage:
        print(f"\n[{chunk.usage.prompt_tokens} prompt + {chunk.usage.completion_tokens} completion tokens]")
