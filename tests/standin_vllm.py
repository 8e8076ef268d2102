"""A stand-in for ``python -m vllm.entrypoints.openai.api_server``, for tests whose subject is
orchestration (kill points, recovery, router switching), not vLLM: it starts in about a second
instead of ~40 s on these CPUs. The worker's ``REQUANT_SERVING_PYTHON`` points at a wrapper
that runs this file with vLLM's arguments (``standin_python``), exactly as an operator points
it at a serving environment, so the code under test starts, watches and stops it as it does
vLLM. Real vLLM runs the same rollout path end to end in test_e2e_demo and test_rollout_local,
and the same evaluation path in test_e2e_demo and test_vllm_integration.

Behaves like vLLM where those tests depend on it: it listens only after a start-up delay
(``STANDIN_STARTUP_S``), ``/health``, ``/v1/models`` (``root`` is the model path, as vLLM's),
chat and text completions with ``max_tokens`` tokens, streaming as server-sent events ending in
``[DONE]``, 404 for an unknown model, and it dies like a process (SIGKILL). SIGTERM as vLLM's
default (``shutdown_timeout`` 0, "abort"): the engine stops first, so requests in flight and new
ones fail (500, ``/health`` 503) while the HTTP server still listens, for ``STANDIN_SHUTDOWN_S``
(0.5 s), then it exits: a server stopped with requests in flight costs those clients. For lm-eval's
``local-completions``: a prompt may be text, token ids, or a batch of either (one choice each,
``index`` in order); ``echo`` with ``logprobs`` returns a log-probability for every prompt token
(equal ones: a model that knows nothing, as the tests' random tiny model); ``/metrics`` counts
finished requests as ``vllm:request_success_total``. The serving environment's version probe
(``python -c ...``) answers ``0+standin``.

A checkpoint that fails only on live traffic (what a canary phase exists to catch): a
``standin-faults.json`` in the model folder, ``{"when_body_contains": "...", "status": 500,
"delay_s": 0.5, "content": "..."}``, answers completion requests whose body contains the text
late, with that status, or (a chat) with that content instead of "ok ok ..."; the smoke and load tests' prompts do not contain it, so the checkpoint passes them.

A model that does gsm8k as well as a test says (the search's tests): ``STANDIN_SKILL`` in the
environment (``standin_python(..., skill=...)`` puts it in the wrapper), see ``Skill``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import stat
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


def standin_python(folder: Path, skill: dict[str, Any] | None = None) -> Path:
    """An executable that takes a Python's place for ``REQUANT_SERVING_PYTHON``; with ``skill``
    (see ``Skill``) the servers it starts answer gsm8k questions that well."""
    folder.mkdir(parents=True, exist_ok=True)
    wrapper = folder / "python"
    env = f"export STANDIN_SKILL='{json.dumps(skill)}'\n" if skill else ""
    wrapper.write_text(f'#!/bin/sh\n{env}exec "{sys.executable}" "{Path(__file__).resolve()}" '
                       '"$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return wrapper


def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("-m", dest="module")
    p.add_argument("--model", required=True)
    p.add_argument("--served-model-name")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    args, _ = p.parse_known_args(argv)
    return args


def prompts_of(body: dict[str, Any]) -> list[list[int] | str]:
    """One entry per prompt: text, token ids, or a batch of either."""
    prompt = body.get("prompt", "")
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], list | str):
        return list(prompt)
    return [prompt]


def text_choice(index: int, prompt: list[int] | str, n: int, body: dict[str, Any]) -> dict:
    choice: dict[str, Any] = {"index": index, "text": "ok " * n, "finish_reason": "length"}
    if body.get("echo") and body.get("logprobs") is not None:
        tokens = len(prompt) if isinstance(prompt, list) else len(prompt.split())
        positions = tokens + n  # the prompt's tokens, then the generated ones
        choice["logprobs"] = {"tokens": ["ok"] * positions,
                              "token_logprobs": [None] + [-1.0] * (positions - 1),
                              "top_logprobs": [None] + [{"ok": -1.0}] * (positions - 1),
                              "text_offset": list(range(positions))}
    return choice


class Skill:
    """How well the served model does gsm8k, for tests whose subject is what the pipeline does
    with scores (the search): ``{"answers": <gsm8k jsonl>, "share": {<text in the model's
    path>: share, ...}}``. A question is answered right when its hash falls below the share
    of the first entry whose text the model path contains ("" matches any), so two models with
    the same share answer the same questions right, and a lower share answers a subset of
    them: the scores are decided, the gate's arithmetic on them is real. Token-id prompts are
    decoded with the model's own tokenizer, as vLLM would read them. An optional
    ``"seconds_per_token": {<text in the path>: s}`` makes that model generate chat answers
    that slowly (the throughput objective's tests: a slower candidate, measured)."""

    def __init__(self, model: str, spec: dict[str, Any]) -> None:
        import hashlib

        self.share = next((v for k, v in spec["share"].items() if k in model), 0.0)
        self.pace = next((v for k, v in spec.get("seconds_per_token", {}).items()
                          if k in model), 0.0)
        rows = [json.loads(line) for line in Path(spec["answers"]).read_text().splitlines()]
        self.gold = {r["question"].strip(): r["answer"].split("####")[-1].strip() for r in rows}
        self.hash = lambda q: int(hashlib.sha256(q.encode()).hexdigest()[:8], 16) / 16**8
        self.model, self._tok = model, None

    def answer(self, prompt: list[int] | str) -> str | None:
        if isinstance(prompt, list):
            if self._tok is None:
                from transformers import AutoTokenizer

                self._tok = AutoTokenizer.from_pretrained(self.model)
            prompt = self._tok.decode(prompt, skip_special_tokens=True)
        question = prompt.rsplit("Question:", 1)[-1].split("\nAnswer:", 1)[0].strip()
        if question not in self.gold:
            return None
        right = self.hash(question) < self.share
        return f" #### {self.gold[question] if right else '-12345'}"


#: Set at SIGTERM: the engine is gone, the HTTP server not yet.
STOPPING = threading.Event()
ENGINE_DEAD = {"error": {"message": "EngineDeadError: the engine is shutting down",
                         "type": "InternalServerError", "code": 500}}


def handler(model: str, served: str) -> type[BaseHTTPRequestHandler]:
    finished = [0]
    faults_file = Path(model) / "standin-faults.json"
    faults = json.loads(faults_file.read_text()) if faults_file.is_file() else {}
    skill = (Skill(model, json.loads(os.environ["STANDIN_SKILL"]))
             if os.environ.get("STANDIN_SKILL") else None)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            if self.path == "/health":
                return self._json(503 if STOPPING.is_set() else 200, {})
            if self.path == "/metrics":
                data = (f'vllm:request_success_total{{finished_reason="length",'
                        f'model_name="{served}"}} {float(finished[0])}\n').encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return None
            if self.path == "/v1/models":
                return self._json(200, {"object": "list", "data": [
                    {"id": served, "object": "model", "root": model, "owned_by": "vllm"}]})
            return self._json(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            body = json.loads(raw or b"{}")
            faulty = faults.get("when_body_contains", "\0") in raw.decode(errors="replace")
            if faulty:
                time.sleep(float(faults.get("delay_s", 0)))
            if STOPPING.is_set():
                return self._json(500, ENGINE_DEAD)
            if faulty and faults.get("status"):
                return self._json(int(faults["status"]), {"error": {
                    "message": "stand-in fault", "type": "InternalServerError"}})
            kind = {"/v1/chat/completions": "chat", "/v1/completions": "text"}.get(self.path)
            if kind is None:
                return self._json(404, {"error": {"message": f"no route {self.path}"}})
            if body.get("model") != served:
                return self._json(404, {"error": {
                    "message": f"The model `{body.get('model')}` does not exist.",
                    "type": "NotFoundError", "code": 404}})
            n = max(1, int(body.get("max_tokens") or 16))
            if body.get("stream"):
                self._stream(kind, n)
            elif kind == "chat":
                time.sleep(skill.pace * n if skill else 0.0)
                self._json(200, {**self._head("chat.completion"), "choices": [
                    {"index": 0, "finish_reason": "length",
                     "message": {"role": "assistant", "content": faults["content"]
                                 if faulty and "content" in faults else "ok " * n}}],
                    "usage": {"prompt_tokens": 8, "completion_tokens": n,
                              "total_tokens": 8 + n}})
            else:
                prompts = prompts_of(body)
                choices = [text_choice(i, prompt, n, body) for i, prompt in enumerate(prompts)]
                if skill and not body.get("echo"):
                    for choice, prompt in zip(choices, prompts, strict=True):
                        choice["text"] = skill.answer(prompt) or choice["text"]
                self._json(200, {**self._head("text_completion"), "choices": choices,
                    "usage": {"prompt_tokens": 8 * len(prompts),
                              "completion_tokens": n * len(prompts),
                              "total_tokens": (8 + n) * len(prompts)}})
            finished[0] += 1
            return None

        def _head(self, obj: str) -> dict[str, Any]:
            return {"id": "cmpl-standin", "object": obj, "created": int(time.time()),
                    "model": served}

        def _stream(self, kind: str, n: int) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(n):
                delta = ({"delta": {"content": "ok "}} if kind == "chat" else {"text": "ok "})
                chunk = {"id": "cmpl-standin", "object": "chat.completion.chunk" if kind ==
                         "chat" else "text_completion", "model": served,
                         "choices": [{"index": 0, **delta,
                                      "finish_reason": "length" if i == n - 1 else None}]}
                self._chunk(f"data: {json.dumps(chunk)}\n\n")
            self._chunk("data: [DONE]\n\n")
            self._chunk("")

        def _chunk(self, text: str) -> None:
            data = text.encode()
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        def _json(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    return Handler


def stop_like_vllm(_signum: int, _frame: Any) -> None:
    STOPPING.set()
    threading.Timer(float(os.environ.get("STANDIN_SHUTDOWN_S", "0.5")), os._exit, (0,)).start()


def main(argv: list[str]) -> None:
    if argv[:1] == ["-c"]:  # the serving environment's vLLM version probe
        print("0+standin")
        return
    args = _args(argv)
    served = args.served_model_name or args.model
    print(f"stand-in for vLLM: {args.model} as {served}, listening after "
          f"{os.environ.get('STANDIN_STARTUP_S', '1')} s", flush=True)
    time.sleep(float(os.environ.get("STANDIN_STARTUP_S", "1")))
    server = ThreadingHTTPServer((args.host, args.port), handler(args.model, served))
    server.daemon_threads = True
    signal.signal(signal.SIGTERM, stop_like_vllm)
    print(f"INFO: Uvicorn running on http://{args.host}:{args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
