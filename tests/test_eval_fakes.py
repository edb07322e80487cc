"""A scripted OpenAI-compatible server on 127.0.0.1 for the eval tests (plus tests of it).

Real HTTP, real JSON: the `openai` client talks to it exactly as to a real provider. A
``responder(request_body, call_number) -> Reply`` decides each answer: a text, an HTTP
error status, a delay (to trigger client timeouts) or a garbage body.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai


@dataclass
class Reply:
    text: str | None = None
    status: int = 200
    delay: float = 0.0
    raw: bytes | None = None  # sent verbatim instead of a completion
    content_type: str = "application/json"


class ScriptedServer:
    """``with ScriptedServer(responder) as s: s.base_url``; ``s.requests`` records every body."""

    def __init__(self, responder, model: str = "scripted"):
        self.responder = responder
        self.model = model
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def _send(self, status: int, body: bytes, content_type: str = "application/json"):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and hung up

            def do_GET(self):
                if self.path.rstrip("/") in ("/v1/models", "/health"):
                    self._send(200, json.dumps({"object": "list", "data": [{"id": server.model, "object": "model"}]}).encode())
                else:
                    self._send(404, b'{"error": {"message": "not found"}}')

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self._send(404, b'{"error": {"message": "not found"}}')
                    return
                with server._lock:
                    server.requests.append(body)
                    n = len(server.requests)
                reply = server.responder(body, n)
                if isinstance(reply, str):
                    reply = Reply(text=reply)
                if reply.delay:
                    time.sleep(reply.delay)
                if reply.raw is not None:
                    self._send(reply.status, reply.raw, reply.content_type)
                elif reply.status != 200:
                    err = {"error": {"message": f"scripted failure {reply.status}", "type": "server_error"}}
                    self._send(reply.status, json.dumps(err).encode())
                else:
                    self._send(200, json.dumps(completion(body, reply.text)).encode())

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def completion(body: dict, text: str) -> dict:
    return {
        "id": "chatcmpl-scripted", "object": "chat.completion", "created": int(time.time()),
        "model": body.get("model", "scripted"),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": usage(body, text),
    }


def usage(body: dict, text: str) -> dict:
    """Token usage as the scripted server reports it: one token per whitespace-separated word."""
    prompt = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
    completion = len(text.split())
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def user_text(body: dict) -> str:
    return body["messages"][-1]["content"]


# ---------------------------------------------------------------- tests of the fake and the client


def test_scripted_server_speaks_openai():
    with ScriptedServer(lambda body, n: f"echo {user_text(body)}") as s:
        client = openai.OpenAI(base_url=s.base_url, api_key="x", max_retries=0)
        out = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        assert out.choices[0].message.content == "echo hi"
        assert s.requests[0]["model"] == "m"


def test_client_retries_then_records(caplog):
    from vicuna.eval.openai_client import CompletionFailed, Endpoint, chat

    script = {1: Reply(status=500), 2: Reply(raw=b"<html>oops</html>", content_type="text/html"),
              3: Reply(delay=1.5, text="late"), 4: Reply(status=429), 5: Reply(raw=b'{"choices": []}')}
    with ScriptedServer(lambda body, n: script.get(n, "finally")) as s:
        ep = Endpoint(api_base=s.base_url, model="m", timeout=0.5, retries=5, backoff=0.01)
        reply = chat(ep, [{"role": "user", "content": "q"}])
        assert (reply.text, reply.attempts) == ("finally", 6)
        assert reply.usage == {"prompt_tokens": 1, "completion_tokens": 1}  # "q" in, "finally" out
    with ScriptedServer(lambda body, n: Reply(status=503)) as s:
        ep = Endpoint(api_base=s.base_url, model="m", timeout=5, retries=2, backoff=0.01)
        try:
            chat(ep, [{"role": "user", "content": "q"}])
            raise AssertionError("should fail")
        except CompletionFailed as e:
            assert e.attempts == 3 and "HTTP 503" in str(e)
        assert len(s.requests) == 3
    with ScriptedServer(lambda body, n: Reply(status=400)) as s:  # a client error is not retried
        ep = Endpoint(api_base=s.base_url, model="m", retries=5, backoff=0.01)
        try:
            chat(ep, [{"role": "user", "content": "q"}])
            raise AssertionError("should fail")
        except CompletionFailed as e:
            assert e.attempts == 1 and "HTTP 400" in str(e)
