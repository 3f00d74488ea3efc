"""A stdlib OpenAI-compatible chat server with canned replies, in a thread: the fake model and the stub judge.

Reply selection, first match wins: VLMEvalKit's ``hello`` probe -> a greeting; a rule ``{"model", "contains":
[...], "reply"}`` whose substrings all occur in the request's text (``"status": 500`` answers that HTTP error
instead); otherwise ``default``. Every chat request is recorded in ``requests`` (model, text head, image count,
sampling parameters, Authorization header), every request of any kind in ``hits`` (method, path, Authorization).
``down_after_models``: the server answers one ``GET /models`` (gndpo's check before it starts), then stops
listening, as a judge that goes away.
"""
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeOpenAI:
    def __init__(self, rules=(), *, models=("fixture-vlm", "fixture-org/judge-1"), default="Z", broken_chat=False,
                 key=None, down_after_models=False):
        self.rules, self.models, self.default = list(rules), list(models), default
        self.broken_chat, self.key, self.down_after_models = broken_chat, key, down_after_models
        self.requests, self.hits = [], []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def send(self, code, obj):
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def authorized(self):
                with outer.lock:
                    outer.hits.append({"method": self.command, "path": self.path,
                                       "auth": self.headers.get("Authorization")})
                if outer.key and self.headers.get("Authorization") != f"Bearer {outer.key}":
                    self.send(401, {"error": {"message": "bad key"}})
                    return False
                return True

            def do_GET(self):
                if not self.authorized():
                    return
                if self.path.rstrip("/").endswith("/models"):
                    self.send(200, {"object": "list", "data": [{"id": m, "object": "model"} for m in outer.models]})
                    if outer.down_after_models:
                        threading.Thread(target=outer.__exit__, daemon=True).start()
                else:
                    self.send(404, {"error": {"message": "not found"}})

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if not self.authorized():
                    return
                if outer.broken_chat:
                    self.send(500, {"error": {"message": "injected failure"}})
                    return
                req = json.loads(raw or b"{}")
                texts, images = [], 0
                for m in req.get("messages", []):
                    content = m.get("content")
                    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content or []
                    texts += [p.get("text", "") for p in parts if p.get("type") == "text"]
                    images += sum(p.get("type") == "image_url" for p in parts)
                text = "\n".join(texts)
                reply = outer.reply(req.get("model", ""), text)
                with outer.lock:
                    outer.requests.append({"model": req.get("model"), "text": text[:300], "images": images,
                                           "params": {k: v for k, v in req.items() if k != "messages"},
                                           "auth": self.headers.get("Authorization")})
                if isinstance(reply, int):  # a rule's "status": that HTTP error
                    self.send(reply, {"error": {"message": f"injected HTTP {reply}"}})
                    return
                self.send(200, {"id": "chatcmpl-" + uuid.uuid4().hex[:12], "object": "chat.completion",
                                "created": int(time.time()), "model": req.get("model"),
                                "choices": [{"index": 0, "finish_reason": "stop",
                                             "message": {"role": "assistant", "content": reply}}],
                                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

        self.closed = False
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def reply(self, model, text):
        if text.strip().lower() == "hello":
            return "Hello!"
        for rule in self.rules:
            if rule.get("model") in (None, "*", model) and all(t in text for t in rule["contains"]):
                return rule.get("status") or rule["reply"]
        return self.default

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        with self.lock:
            if self.closed:
                return
            self.closed = True
        self.server.shutdown()
        self.server.server_close()

    def count(self, model):
        with self.lock:
            return sum(r["model"] == model for r in self.requests)
