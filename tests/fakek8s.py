"""A Kubernetes API server on 127.0.0.1, just enough of it for the rollout: Deployments
(create/read/replace/delete/status) and Services, with a deployment controller simulated on
reads, plus the pods' OpenAI endpoint behind the Service URL (``/svc/...``).

No cluster exists here; this is the network boundary the official client talks across.
Behaviour per revision (the ``requant.dev/revision`` pod-template annotation):
- ``ready_after`` seconds until a new generation is fully rolled out, whoever reads meanwhile;
  ``observedGeneration`` lags a spec change by ``observe_lag`` seconds;
- requests without the kubeconfig's bearer token get 401; creating what exists gets 409; a body
  whose name or namespace differs from the URL's gets 400; Services take PUT, PATCH, DELETE;
- revisions in ``stuck`` never become available and report ProgressDeadlineExceeded;
- the strategy decides who serves meanwhile: with maxUnavailable 0 the old pods do (surge
  first); otherwise nobody until the new pods are ready (``serving_log`` records it);
- revisions in ``slow_answers`` are served but answer after ``slow_s`` seconds (SLO test);
- revisions in ``failing_live`` answer 500 to chat requests carrying ``LIVE_MARK`` (live
  clients' traffic; the smoke and load tests' prompts pass): what a canary exists to catch;
- the API server fills in defaults (each container's ``imagePullPolicy`` and
  ``terminationMessagePath``), so a Deployment read back never equals the one sent;
- Secrets: create (``stringData`` stored as base64 ``data``, as the API server does) and read;
  a Deployment at 0 replicas serves nobody once the controller has scaled it down.
"""

from __future__ import annotations

import base64
import copy
import json
import re
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

TOKEN = "fake-cluster-token"
REV = "requant.dev/revision"
LIVE_MARK = "LIVE-CLIENT"


class ClusterState:
    def __init__(self) -> None:
        self.deployments: dict[tuple[str, str], dict[str, Any]] = {}
        self.services: dict[tuple[str, str], dict[str, Any]] = {}
        self.requests: list[tuple[str, str, Any]] = []  # (method, path, body)
        self.changed_at: dict[tuple[str, str], float] = {}
        self.ready_after = 0.15  # seconds from a spec change until the new pods are ready
        self.observe_lag = 0.03  # seconds before the controller observes a new generation
        self.stuck: set[str] = set()
        self.slow_answers: set[str] = set()
        self.failing_live: set[str] = set()
        self.secrets: dict[tuple[str, str], dict[str, Any]] = {}
        self.slow_s = 0.5
        self.serving_log: list[str | None] = []  # who serves, at each controller step
        self.lock = threading.Lock()

    def serving_revision(self, ns: str, name: str) -> str | None:
        dep = self.deployments.get((ns, name))
        if not dep or not (dep["status"].get("availableReplicas") or 0):
            return None
        return dep["status"].get("_servingRevision")

    def _tick(self, key: tuple[str, str]) -> None:
        """The deployment controller, as the API server's reader sees it: progress depends on
        the time since the spec changed, not on how often anyone reads; a new generation is
        observed only after ``observe_lag`` seconds."""
        dep = self.deployments[key]
        elapsed = time.monotonic() - self.changed_at[key]
        if elapsed < self.observe_lag:
            return
        rev = dep["spec"]["template"]["metadata"].get("annotations", {}).get(REV)
        replicas = dep["spec"].get("replicas", 1)
        status = dep["status"]
        status["observedGeneration"] = dep["metadata"]["generation"]
        in_place = str(dep["spec"].get("strategy", {}).get("rollingUpdate", {})
                       .get("maxUnavailable", "25%")) not in {"0", "0%"}
        if rev in self.stuck or elapsed < self.ready_after:
            if rev in self.stuck and elapsed >= self.ready_after:
                status["conditions"] = [{"type": "Progressing", "status": "False",
                                         "reason": "ProgressDeadlineExceeded",
                                         "message": f'ReplicaSet for {rev} has timed out '
                                                    'progressing.'}]
            old = status.get("_servingRevision")
            if in_place or old is None:
                # the old pod is gone, the new one is not ready (yet, or ever): nobody serves
                status.update({"replicas": replicas, "updatedReplicas": replicas,
                               "availableReplicas": 0, "readyReplicas": 0,
                               "_servingRevision": None})
            elif old != rev:
                # surge first: the old pods keep serving beside the new ones that are loading
                status.update({"replicas": 2 * replicas, "updatedReplicas": replicas,
                               "availableReplicas": replicas, "readyReplicas": replicas})
            self.serving_log.append(status.get("_servingRevision"))
            return
        status.update({"replicas": replicas, "updatedReplicas": replicas,
                       "availableReplicas": replicas, "readyReplicas": replicas,
                       "_servingRevision": rev,
                       "conditions": [{"type": "Available", "status": "True"},
                                      {"type": "Progressing", "status": "True",
                                       "reason": "NewReplicaSetAvailable"}]})
        self.serving_log.append(rev)


class _Handler(BaseHTTPRequestHandler):
    state: ClusterState
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _status(self, code: int, reason: str, message: str) -> None:
        self._send(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                          "message": message, "reason": reason, "code": code})

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        return json.loads(raw) if raw else None

    def _handle(self, method: str) -> None:
        path = self.path.split("?", 1)[0]
        body = self._body()
        with self.state.lock:
            self.state.requests.append((method, path, copy.deepcopy(body)))
        if m := re.fullmatch(r"/svc/(?P<ns>[^/]+)/(?P<name>[^/]+)(?P<rest>/.*)", path):
            return self._pod(method, m["ns"], m["name"], m["rest"], body)
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self._status(401, "Unauthorized", "Unauthorized")
        if problem := self._identity_problem(method, path, body):
            return self._status(400, "BadRequest", problem)
        if m := re.fullmatch(r"/apis/apps/v1/namespaces/(?P<ns>[^/]+)/deployments"
                             r"(?:/(?P<name>[^/]+))?(?P<status>/status)?", path):
            return self._deployment(method, m["ns"], m["name"], body)
        if m := re.fullmatch(r"/api/v1/namespaces/(?P<ns>[^/]+)/services(?:/(?P<name>[^/]+))?",
                             path):
            return self._service(method, m["ns"], m["name"], body)
        if m := re.fullmatch(r"/api/v1/namespaces/(?P<ns>[^/]+)/secrets(?:/(?P<name>[^/]+))?",
                             path):
            return self._secret(method, m["ns"], m["name"], body)
        self._status(404, "NotFound", f"no fake endpoint for {method} {path}")

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def do_PATCH(self) -> None:
        self._handle("PATCH")

    @staticmethod
    def _identity_problem(method: str, path: str, body: Any) -> str | None:
        """What the API server says when a body names another object than the URL."""
        if method not in {"POST", "PUT"} or not isinstance(body, dict):
            return None
        meta = body.get("metadata") or {}
        ns = re.search(r"/namespaces/([^/]+)/", path)
        if ns and meta.get("namespace") not in (None, ns[1]):
            return ("the namespace of the provided object does not match the namespace sent on "
                    "the request")
        name = re.search(r"/(?:deployments|services|secrets)/([^/]+)$", path)
        if method == "PUT" and name and meta.get("name") != name[1]:
            return (f"the name of the object ({meta.get('name')}) does not match the name on "
                    f"the URL ({name[1]})")
        return None

    def _deployment(self, method: str, ns: str, name: str | None, body: Any) -> None:
        st = self.state
        with st.lock:
            if method == "POST":
                key = (ns, body["metadata"]["name"])
                if key in st.deployments:
                    return self._status(409, "AlreadyExists", "deployment exists")
                dep = with_defaults(body)
                dep["metadata"].update({"generation": 1, "resourceVersion": "1",
                                        "uid": str(uuid.uuid4())})
                dep["status"] = {}
                st.deployments[key] = dep
                st.changed_at[key] = time.monotonic()
                return self._send(201, dep)
            key = (ns, name)
            dep = st.deployments.get(key)
            if dep is None:
                return self._status(404, "NotFound", f'deployments.apps "{name}" not found')
            if method == "GET":
                st._tick(key)
                return self._send(200, dep)
            if method == "PUT":
                if body["metadata"].get("resourceVersion") != dep["metadata"]["resourceVersion"]:
                    return self._status(409, "Conflict", "the object has been modified")
                new = with_defaults(body)
                changed = new["spec"] != dep["spec"]
                new["metadata"].update({
                    "generation": dep["metadata"]["generation"] + (1 if changed else 0),
                    "resourceVersion": str(int(dep["metadata"]["resourceVersion"]) + 1),
                    "uid": dep["metadata"]["uid"]})
                new["status"] = {k: v for k, v in dep["status"].items() if k != "conditions"}
                if changed:
                    new["status"]["updatedReplicas"] = 0
                    st.changed_at[key] = time.monotonic()
                st.deployments[key] = new
                return self._send(200, new)
            if method == "DELETE":
                del st.deployments[key]
                return self._send(200, {"kind": "Status", "status": "Success"})
        self._status(405, "MethodNotAllowed", method)

    def _service(self, method: str, ns: str, name: str | None, body: Any) -> None:
        st = self.state
        with st.lock:
            if method == "POST":
                if (ns, body["metadata"]["name"]) in st.services:
                    return self._status(409, "AlreadyExists",
                                        f'services "{body["metadata"]["name"]}" already exists')
                st.services[(ns, body["metadata"]["name"])] = body
                return self._send(201, body)
            svc = st.services.get((ns, name))
            if svc is None:
                return self._status(404, "NotFound", f'services "{name}" not found')
            if method == "PUT":
                st.services[(ns, name)] = body
                return self._send(200, body)
            if method == "PATCH":
                st.services[(ns, name)] = merged(svc, body)
                return self._send(200, st.services[(ns, name)])
            if method == "DELETE":
                del st.services[(ns, name)]
                return self._send(200, {"kind": "Status", "status": "Success"})
            return self._send(200, svc)

    def _secret(self, method: str, ns: str, name: str | None, body: Any) -> None:
        st = self.state
        with st.lock:
            if method == "POST":
                key = (ns, body["metadata"]["name"])
                if key in st.secrets:
                    return self._status(409, "AlreadyExists",
                                        f'secrets "{key[1]}" already exists')
                secret = copy.deepcopy(body)
                data = {k: base64.b64encode(v.encode()).decode()
                        for k, v in (secret.pop("stringData", None) or {}).items()}
                secret["data"] = {**(secret.get("data") or {}), **data}
                st.secrets[key] = secret
                return self._send(201, secret)
            secret = st.secrets.get((ns, name))
            if secret is None:
                return self._status(404, "NotFound", f'secrets "{name}" not found')
            if method == "GET":
                return self._send(200, secret)
        self._status(405, "MethodNotAllowed", method)

    def _pod(self, method: str, ns: str, name: str, rest: str, body: Any) -> None:
        """What the Service's pods answer: vLLM's OpenAI API for the available revision."""
        with self.state.lock:
            rev = self.state.serving_revision(ns, name)
            dep = self.state.deployments.get((ns, name))
        if rev is None or dep is None:
            return self._status(503, "ServiceUnavailable", "no ready endpoints")
        args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
        served = args[args.index("--served-model-name") + 1]
        if rev in self.state.slow_answers:
            time.sleep(self.state.slow_s)
        if rest == "/health":
            return self._send(200, {})
        if rest == "/v1/models":
            return self._send(200, {"object": "list", "data": [
                {"id": served, "object": "model", "root": f"{args[0]}@{rev}"}]})
        if rest == "/v1/chat/completions" and method == "POST":
            if rev in self.state.failing_live and LIVE_MARK in json.dumps(body):
                return self._status(500, "InternalError", "stand-in fault on live traffic")
            n = int(body.get("max_tokens", 16))
            return self._send(200, {
                "id": "chatcmpl-fake", "object": "chat.completion", "model": served,
                "choices": [{"index": 0, "finish_reason": "length",
                             "message": {"role": "assistant", "content": "42 " * n}}],
                "usage": {"prompt_tokens": 10, "completion_tokens": n, "total_tokens": 10 + n}})
        self._status(404, "NotFound", rest)


def with_defaults(deployment: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(deployment)
    for container in out["spec"]["template"]["spec"]["containers"]:
        container.setdefault("imagePullPolicy", "IfNotPresent")
        container.setdefault("terminationMessagePath", "/dev/termination-log")
    return out


def merged(base: Any, patch: Any) -> Any:
    """A JSON merge patch (RFC 7386), which is what a strategic merge does for these fields."""
    if not isinstance(patch, dict) or not isinstance(base, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merged(out.get(key), value)
    return out


class _Server(ThreadingHTTPServer):
    request_queue_size = 256  # the load test opens 64 connections at once
    daemon_threads = True


class FakeCluster:
    def __init__(self) -> None:
        self.state = ClusterState()
        handler = type("Handler", (_Handler,), {"state": self.state})
        self.server = _Server(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def kubeconfig(self, path) -> str:
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": TOKEN}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
        }))
        return str(path)

    def service_url(self, ns: str, name: str) -> str:
        return f"{self.url}/svc/{ns}/{name}"

    def __enter__(self) -> FakeCluster:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()
