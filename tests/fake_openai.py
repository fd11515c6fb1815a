"""A real HTTP server that speaks enough of the OpenAI API for the backend's tests and
benchmark: chat completions, file upload/download and the Batch API.

It binds 127.0.0.1 on a free port and serves from a thread (stdlib only). Behaviour is
scriptable per question: `server.script(text, *actions)` makes the next requests whose
last user message is `text` take those actions in turn (then answer normally), and
`server.outage(start, count)` makes chat requests number start .. start+count-1 (in order
of arrival, whatever they ask) answer HTTP 503. Every chat request received is recorded in
`server.received`, so tests can check what was sent, and every answer it sent (HTTP 200)
in `server.billed` with its tokens: what a real endpoint would charge, whether or not the
client was still there to read it. `server.served_model(body)` names the model an answer
says it came from (default: the model asked for).
"""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict, deque
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def rate_limited(retry_after: float | None = None) -> dict:
    """HTTP 429, with a Retry-After header (seconds) when given."""
    return {"status": 429, "retry_after": retry_after}


def server_error(status: int = 500) -> dict:
    return {"status": status}


def rejected_key() -> dict:
    """HTTP 401 whose message quotes the Authorization header (as real servers do)."""
    return {"status": 401, "echo_auth": True}


def hang(seconds: float) -> dict:
    """Answer only after `seconds` (longer than the client's time-out)."""
    return {"hang": seconds}


def reply(content: str, finish_reason: str = "stop") -> dict:
    """Answer with this text (malformed answers, truncated ones)."""
    return {"content": content, "finish_reason": finish_reason}


def default_answer(question: str) -> str:
    return f"<think>echo</think><answer>{question}</answer>"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 256  # the default backlog (5) refuses bursts of concurrent connects


class FakeOpenAI:
    """Start with `with FakeOpenAI(delay=...) as server:`; point clients at `server.base_url`."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay  # seconds every normal answer waits
        self.received: list[dict] = []  # chat requests: question, body, auth, time, outcome
        self.batch_creates: list[dict] = []
        self.batches_done = threading.Event()  # batches stay in_progress until this is set
        self._scripts: dict[str, deque] = defaultdict(deque)
        self._files: dict[str, bytes] = {}
        self._batches: dict[str, dict] = {}
        self.billed: list[dict] = []  # every HTTP 200 chat answer: question, prompt and completion tokens
        self.served_model = lambda body: body.get("model", "")
        self._outage: range = range(0)
        self._lock = threading.Lock()
        self._httpd = _Server(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def __enter__(self) -> FakeOpenAI:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def script(self, question: str, *actions: dict) -> None:
        with self._lock:
            self._scripts[question].extend(actions)

    def outage(self, start: int, count: int) -> None:
        """Chat requests number start .. start+count-1 (0-based, in order of arrival) get HTTP 503."""
        with self._lock:
            self._outage = range(start, start + count)

    def billed_usd(self, price: dict) -> float:
        """What the answers sent cost at `price` (USD per million input and output tokens)."""
        with self._lock:
            return sum(b["prompt_tokens"] * price["input"] + b["completion_tokens"] * price["output"]
                       for b in self.billed) / 1e6  # fmt: skip

    def questions_received(self) -> list[str]:
        with self._lock:
            return [r["question"] for r in self.received]

    # -- chat completions ---------------------------------------------------------------

    def _chat(self, body: dict, auth: str) -> tuple[int, dict, dict, float]:
        """Decide (status, headers, json body, wait seconds) for one chat request."""
        user = [m["content"] for m in body.get("messages", []) if m.get("role") == "user"]
        question = user[-1] if user else ""
        with self._lock:
            action = self._scripts[question].popleft() if self._scripts[question] else {}
            if len(self.received) in self._outage:
                action = server_error(503)
            self.received.append(
                {"question": question, "body": body, "auth": auth, "time": time.monotonic(), "action": action}
            )
        if "status" in action:
            headers = {} if action.get("retry_after") is None else {"Retry-After": str(action["retry_after"])}
            message = f"Incorrect API key provided: {auth}" if action.get("echo_auth") else f"scripted {action['status']}"
            error = {"error": {"message": message, "type": "fake", "code": None}}
            return action["status"], headers, error, 0.0
        content = action.get("content", default_answer(question))
        completion = {
            "id": f"chatcmpl-{len(self.received)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.served_model(body),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": action.get("finish_reason", "stop"),
                }
            ],
            "usage": {
                "prompt_tokens": sum(len(m["content"].split()) for m in body.get("messages", [])),
                "completion_tokens": len(content.split()),
                "total_tokens": 0,
            },
        }
        with self._lock:
            self.billed.append({"question": question, **{k: completion["usage"][k] for k in ("prompt_tokens", "completion_tokens")}})
        return 200, {}, completion, action.get("hang", self.delay)

    # -- files and batches ---------------------------------------------------------------

    def _upload(self, content_type: str, raw: bytes) -> dict:
        message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + raw)
        fields = {}
        for part in message.iter_parts():
            fields[part.get_param("name", header="content-disposition")] = part.get_payload(decode=True)
        with self._lock:
            file_id = f"file-{len(self._files) + 1}"
            self._files[file_id] = fields["file"]
        return self._file_object(file_id, fields.get("purpose", b"batch").decode())

    def _file_object(self, file_id: str, purpose: str) -> dict:
        return {
            "id": file_id,
            "object": "file",
            "bytes": len(self._files[file_id]),
            "created_at": int(time.time()),
            "filename": f"{file_id}.jsonl",
            "purpose": purpose,
            "status": "processed",
        }

    def _create_batch(self, body: dict) -> dict:
        with self._lock:
            batch_id = f"batch-{len(self._batches) + 1}"
            batch = {
                "id": batch_id,
                "object": "batch",
                "endpoint": body["endpoint"],
                "input_file_id": body["input_file_id"],
                "completion_window": body["completion_window"],
                "created_at": int(time.time()),
                "status": "in_progress",
                "output_file_id": None,
                "error_file_id": None,
                "request_counts": {"total": 0, "completed": 0, "failed": 0},
            }
            self._batches[batch_id] = batch
            self.batch_creates.append(body)
        return batch

    def _retrieve_batch(self, batch_id: str) -> dict:
        with self._lock:
            batch = self._batches[batch_id]
            ready = batch["status"] == "in_progress" and self.batches_done.is_set()
        if ready:
            self._finish_batch(batch)
        return batch

    def _finish_batch(self, batch: dict) -> None:
        lines = self._files[batch["input_file_id"]].decode().splitlines()
        out = []
        for line in lines:
            item = json.loads(line)
            status, _, body, _ = self._chat(item["body"], auth="batch")
            out.append({"id": f"r-{item['custom_id'][:8]}", "custom_id": item["custom_id"],
                        "response": {"status_code": status, "body": body}, "error": None})
        with self._lock:
            file_id = f"file-{len(self._files) + 1}"
            self._files[file_id] = "".join(json.dumps(o) + "\n" for o in out).encode()
            batch.update(status="completed", output_file_id=file_id,
                         request_counts={"total": len(out), "completed": len(out), "failed": 0})

    # -- HTTP plumbing -------------------------------------------------------------------

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, like the real API
            disable_nagle_algorithm = True  # headers and body go out in two writes

            def log_message(self, *args) -> None:
                pass

            def _send(self, status: int, body: dict | bytes, headers: dict | None = None) -> None:
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for name, value in (headers or {}).items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (time-out test)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length", 0)))

            def do_POST(self) -> None:
                raw = self._body()
                if self.path == "/v1/chat/completions":
                    status, headers, body, wait = server._chat(json.loads(raw), self.headers.get("Authorization", ""))
                    time.sleep(wait)
                    self._send(status, body, headers)
                elif self.path == "/v1/files":
                    self._send(200, server._upload(self.headers["Content-Type"], raw))
                elif self.path == "/v1/batches":
                    self._send(200, server._create_batch(json.loads(raw)))
                else:
                    self._send(404, {"error": {"message": f"no route {self.path}"}})

            def do_GET(self) -> None:
                parts = self.path.strip("/").split("/")
                if parts[:2] == ["v1", "batches"] and len(parts) == 3 and parts[2] in server._batches:
                    self._send(200, server._retrieve_batch(parts[2]))
                elif parts[:2] == ["v1", "files"] and len(parts) == 4 and parts[3] == "content":
                    self._send(200, server._files[parts[2]])
                else:
                    self._send(404, {"error": {"message": f"no route {self.path}"}})

        return Handler


if __name__ == "__main__":
    # A server in its own process (the benchmark): prints its base URL, serves until stdin closes.
    import argparse
    import sys

    parser = argparse.ArgumentParser(description="fake OpenAI-compatible server")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds every answer waits")
    with FakeOpenAI(delay=parser.parse_args().delay) as fake:
        print(fake.base_url, flush=True)
        sys.stdin.read()
