"""A stand-in for vLLM's OpenAI server, for pool tests that need no model: ``PoolSpec.server_command``.

Started with vLLM's own arguments (``--host``, ``--port``, ``--served-model-name``, the rest ignored)
and environment. Like vLLM it binds its port with SO_REUSEADDR and fails when the port is taken
("[Errno 98] Address already in use"), answers ``/health`` to anyone, and with ``VLLM_API_KEY`` set
wants ``Authorization: Bearer <key>`` on ``/v1/...`` (401 otherwise). ``/v1/models`` lists the
served name; ``/v1/chat/completions`` answers ``echo:<last user message>``; ``/v1/env`` returns the
server's environment (so tests can read what the pool gave it).
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import signal
import sys


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--served-model-name", required=True)
    args, _ = ap.parse_known_args()
    key = os.environ.get("VLLM_API_KEY")

    class Handler(http.server.BaseHTTPRequestHandler):
        def reply(self, status: int, obj) -> None:
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def authorised(self) -> bool:
            if key and self.headers.get("Authorization") != f"Bearer {key}":
                self.reply(401, {"error": "Unauthorized"})
                return False
            return True

        def do_GET(self):  # noqa: N802
            if self.path == "/health":
                self.reply(200, {})
            elif not self.authorised():
                return
            elif self.path == "/v1/models":
                self.reply(200, {"object": "list", "data": [{"id": args.served_model_name}]})
            elif self.path == "/v1/env":
                self.reply(200, dict(os.environ))
            else:
                self.reply(404, {"error": "not found"})

        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if not self.authorised():
                return
            if self.path != "/v1/chat/completions" or body.get("model") != args.served_model_name:
                self.reply(404, {"error": f"no {self.path} for model {body.get('model')!r}"})
                return
            last = [m["content"] for m in body["messages"] if m["role"] == "user"][-1]
            answer = "echo:" + last
            self.reply(200, {"choices": [{"message": {"role": "assistant", "content": answer},
                                          "finish_reason": "stop"}],
                             "usage": {"prompt_tokens": len(last.split()), "completion_tokens": len(answer.split())}})

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer((args.host, args.port), Handler)  # SO_REUSEADDR, like vLLM
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"fake vLLM serving {args.served_model_name} on {args.host}:{args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
