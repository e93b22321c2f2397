"""Print an OpenAI Batch output file (and optional error file) as readable lines."""

import json
import sys

for path in sys.argv[1:]:
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            if rec.get("error"):
                print(f"[{rec['custom_id']}] error {rec['error']['code']}: {rec['error']['message']}")
                continue
            body = rec["response"]["body"]
            choice = body["choices"][0]
            text = choice["message"]["content"] if "message" in choice else choice["text"]
            usage = body["usage"]
            print(f"[{rec['custom_id']}] ({usage['prompt_tokens']}+{usage['completion_tokens']} tokens) {text.strip()}")
