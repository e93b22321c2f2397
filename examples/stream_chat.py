"""Stream one chat answer from the embedded demo model, token by token, with the engine API."""

import sys

from hpcserve.engine.core import EngineConfig, LLMEngine
from hpcserve.engine.request import SamplingParams

question = " ".join(sys.argv[1:]) or "What is the capital of France?"
engine = LLMEngine(EngineConfig(model="demo"))
prompt = engine.apply_chat_template([{"role": "user", "content": question}])
engine.add_request("chat-1", prompt, SamplingParams(max_tokens=64, temperature=0))
print(f"user> {question}\nassistant> ", end="", flush=True)
while engine.has_unfinished_requests():
    for out in engine.step():
        print(out.new_text, end="", flush=True)
        if out.finished:
            print(f"\n[finish_reason={out.finish_reason}, {len(out.token_ids)} tokens]")
