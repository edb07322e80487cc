"""A scripted OpenAI-compatible upstream on 127.0.0.1 for the endpoint tests.

The upstream model named in a request picks the behaviour:

- ``echo``: answers ``"you said: <last user message>"`` word by word (``n`` choices prefixed
  ``[i]`` after the first; ``stop`` strings cut the answer; ``max_tokens`` counts words;
  usage and logprobs as an upstream reports them);
- ``slow``: like echo, ``SLOW`` seconds between words;
- ``fail500`` / ``ratelimited`` (429, Retry-After: 7) / ``unavailable`` (503): refuses at once;
- ``dropper`` (and ``echo`` asked something with DROP in it): two words, then the connection
  drops; ``hang``: one word, then silence;
- ``tooler``: given ``tools`` and a ``tool_choice`` other than ``"none"``, calls the first tool (and the
  second too unless ``parallel_tool_calls`` is false) as OpenAI streams calls: id and name first, then the
  arguments in two pieces, finish reason ``tool_calls``; otherwise answers like ``echo``;
- ``locked``: requires ``Authorization: Bearer sk-right-key`` and otherwise answers 401 with the
  wrong key echoed in the message (as some hosted APIs do).

``POST /v1/moderations`` flags any input containing "forbidden". Every request is recorded in
``app.state.calls`` (path, body, Authorization header), and ``app.state.max_in_flight`` holds
the most answers each model streamed at once.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

SLOW = 0.3
RIGHT_KEY = "sk-right-key"


def words_of(body: dict) -> list[str]:
    if "messages" in body:
        last = [m for m in body["messages"] if m.get("role") == "user"][-1]["content"]
        text = last if isinstance(last, str) else " ".join(p.get("text", "") for p in last)
    else:
        text = body.get("prompt") or ""
    return f"you said: {text}".split()


def answer(body: dict, i: int) -> tuple[list[str], str]:
    """The words of choice ``i`` and its finish reason."""
    words = words_of(body)
    if i:
        words = [f"[{i}]", *words]
    text, reason = " ".join(words), "stop"
    for s in body.get("stop") or []:
        if s in text:
            text = text[:text.index(s)]
    out = text.split(" ") if text else []
    if body.get("max_tokens") is not None and len(out) > body["max_tokens"]:
        out, reason = out[:body["max_tokens"]], "length"
    return [w if k == 0 else " " + w for k, w in enumerate(out)], reason


def create_upstream() -> FastAPI:
    app = FastAPI()
    app.state.calls = []
    app.state.in_flight, app.state.max_in_flight = {}, {}  # per model: answers streaming now, and the most at once
    lock = threading.Lock()

    def record(path: str, body: dict, request: Request) -> None:
        with lock:
            app.state.calls.append({"path": path, "body": body, "auth": request.headers.get("authorization"),
                                    "at": time.monotonic()})

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": m, "object": "model"} for m in ("echo", "slow", "hang")]}

    @app.post("/v1/moderations")
    async def moderations(request: Request):
        body = await request.json()
        record("/v1/moderations", body, request)
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        return {"id": "modr-1", "model": "scripted-moderation", "results": [
            {"flagged": "forbidden" in t.lower(), "categories": {"harassment": "forbidden" in t.lower()}}
            for t in inputs]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await complete(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    async def complete(request: Request, chat: bool):
        body = await request.json()
        record(request.url.path, body, request)
        model = body["model"]
        if model == "fail500":
            return JSONResponse({"error": {"message": "the upstream broke", "type": "server_error"}}, 500)
        if model == "ratelimited":
            return JSONResponse({"error": {"message": "slow down", "type": "rate_limit_error"}}, 429,
                                headers={"Retry-After": "7"})
        if model == "unavailable":
            return JSONResponse({"error": {"message": "warming up", "type": "server_error"}}, 503)
        if model == "locked" and request.headers.get("authorization") != f"Bearer {RIGHT_KEY}":
            sent = (request.headers.get("authorization") or "")[7:]
            return JSONResponse({"error": {"message": f"Incorrect API key provided: {sent}.", "type":
                                           "invalid_request_error", "code": "invalid_api_key"}}, 401)
        if body.get("max_tokens") == 999_999:
            return JSONResponse({"error": {"message": "maximum context length is 4096 tokens", "type":
                                           "invalid_request_error", "param": "max_tokens"}}, 400)
        n = int(body.get("n") or 1)
        choices = [answer(body, i) for i in range(n)]
        prompt_tokens = len(words_of(body)) - 2
        completion_tokens = sum(len(w) for w, _ in choices)
        rid, created = "cmpl-scripted", int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"

        def piece(i: int, word: str | None, reason: str | None = None) -> dict:
            lp = None
            if body.get("logprobs") and word is not None:
                lp = ({"content": [{"token": word, "logprob": -0.5, "bytes": list(word.encode()),
                                    "top_logprobs": [{"token": word, "logprob": -0.5, "bytes": list(word.encode())}]
                                    [:body.get("top_logprobs") or 0]}]} if chat else
                      {"tokens": [word], "token_logprobs": [-0.5], "top_logprobs": [{word: -0.5}], "text_offset": [0]})
            content = {"delta": {"content": word} if word is not None else {}} if chat else {"text": word or ""}
            return {"index": i, **content, "logprobs": lp, "finish_reason": reason}

        def event(obj: dict) -> str:
            return f"data: {json.dumps(obj)}\n\n"

        async def stream():
            app.state.in_flight[model] = app.state.in_flight.get(model, 0) + 1
            app.state.max_in_flight[model] = max(app.state.max_in_flight.get(model, 0), app.state.in_flight[model])
            try:
                async for e in events():
                    yield e
            finally:
                app.state.in_flight[model] -= 1

        calling = (model == "tooler" and chat and body.get("tools") and body.get("tool_choice") != "none")

        async def tool_events():
            head = {"id": rid, "object": kind, "created": created, "model": model}
            yield event({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": None},
                                              "finish_reason": None}]})
            tools = body["tools"][:1 if body.get("parallel_tool_calls") is False else 2]
            for k, t in enumerate(tools):
                args = json.dumps({"city": words_of(body)[-1], "call": k})
                for part in ({"index": k, "id": f"call_up_{k}", "type": "function",
                              "function": {"name": t["function"]["name"], "arguments": ""}},
                             {"index": k, "function": {"arguments": args[:5]}},
                             {"index": k, "function": {"arguments": args[5:]}}):
                    yield event({**head, "choices": [{"index": 0, "delta": {"tool_calls": [part]},
                                                      "finish_reason": None}]})
            yield event({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
            yield event({**head, "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 5 * len(tools),
                                                         "total_tokens": 9 + 5 * len(tools)}})
            yield "data: [DONE]\n\n"

        async def events():
            if calling:
                async for e in tool_events():
                    yield e
                return
            if chat:
                yield event({"id": rid, "object": kind, "created": created, "model": model,
                             "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                          "logprobs": None, "finish_reason": None} for i in range(n)]})
            drop = model == "dropper" or "DROP" in words_of(body)  # echo drops too when asked to
            for k in range(max(len(w) for w, _ in choices)):
                if drop and k == 2:
                    raise ConnectionResetError("scripted drop")  # uvicorn cuts the connection mid-stream
                if model == "hang" and k == 1:
                    await asyncio.sleep(3600)
                if model == "slow":
                    await asyncio.sleep(SLOW)
                for i, (words, _) in enumerate(choices):
                    if k < len(words):
                        yield event({"id": rid, "object": kind, "created": created, "model": model,
                                     "choices": [piece(i, words[k])]})
            for i, (_, reason) in enumerate(choices):
                yield event({"id": rid, "object": kind, "created": created, "model": model,
                             "choices": [piece(i, None, reason)]})
            if (body.get("stream_options") or {}).get("include_usage"):
                yield event({"id": rid, "object": kind, "created": created, "model": model, "choices": [],
                             "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                       "total_tokens": prompt_tokens + completion_tokens}})
            yield "data: [DONE]\n\n"

        if body.get("stream"):
            return StreamingResponse(stream(), media_type="text/event-stream")
        texts = ["".join(w) for w, _ in choices]
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}

        def logprobs(words: list[str]) -> dict | None:  # the pieces' logprobs as one answer's
            if not body.get("logprobs"):
                return None
            parts = [piece(0, w)["logprobs"] for w in words]
            if chat:
                return {"content": [e for p in parts for e in p["content"]]}
            return {key: [v for p in parts for v in p[key]] for key in ("tokens", "token_logprobs", "top_logprobs",
                                                                         "text_offset")}

        if chat:
            return {"id": rid, "object": "chat.completion", "created": created, "model": model, "usage": usage,
                    "choices": [{"index": i, "message": {"role": "assistant", "content": t},
                                 "logprobs": logprobs(w), "finish_reason": r}
                                for i, (t, (w, r)) in enumerate(zip(texts, choices))]}
        return {"id": rid, "object": "text_completion", "created": created, "model": model, "usage": usage,
                "choices": [{"index": i, "text": t, "logprobs": logprobs(w), "finish_reason": r}
                            for i, (t, (w, r)) in enumerate(zip(texts, choices))]}

    return app
