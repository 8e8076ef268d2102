"""CPU: kill -9 the serving keeper of a running local deployment (after `make demo`) and time
until the stable endpoint answers a completion again, with no person (the guardian starts the
keeper again, the keeper its vLLM; nothing is warm). One client polls every 0.5 s.

    .venvs/pipeline/bin/python benchmarks/kill_keeper_once.py [--state-dir .cache/requant/rollout]
        [--url http://127.0.0.1:8000] [--model requant-w8a8] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path

import httpx


def answer(url: str, model: str) -> int | str:
    try:
        return httpx.post(f"{url}/v1/completions", timeout=30, json={
            "model": model, "prompt": "2+2=", "max_tokens": 2}).status_code
    except httpx.HTTPError as exc:
        return type(exc).__name__


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--state-dir", type=Path, default=Path(".cache/requant/rollout"))
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default="requant-w8a8")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    state_file = args.state_dir / "local" / "state.json"
    pid = int(json.loads(state_file.read_text())["active"]["server"]["pid"])
    assert answer(args.url, args.model) == 200, "the endpoint must answer before the kill"
    load = os.getloadavg()[0]
    os.kill(pid, signal.SIGKILL)
    started, answers = time.monotonic(), {}
    while (code := answer(args.url, args.model)) != 200:
        answers[str(code)] = answers.get(str(code), 0) + 1
        if time.monotonic() - started > 600:
            raise SystemExit("not answering 600 s after the kill")
        time.sleep(0.5)
    after = json.loads(state_file.read_text())
    result = {"killed_keeper_pid": pid, "back_after_s": round(time.monotonic() - started, 1),
              "answers_meanwhile": answers, "new_keeper_pid": after["active"]["server"]["pid"],
              "last_event": after["history"][-1]["event"], "load_average_1m_at_kill": load}
    print(json.dumps(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
