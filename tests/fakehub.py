"""A Hub-compatible HTTP server on 127.0.0.1: only the endpoints huggingface_hub's upload path uses.

The real ``huggingface_hub`` client talks to it over HTTP (HF endpoint = this server, Xet off:
the server speaks the classic LFS protocol), so everything the client does (preupload, LFS batch,
PUT, commit, refs) is exercised for real. Faults are injected here, at the network boundary:
a status code for the next N calls of an endpoint, or a connection dropped mid-upload.

Objects are content-addressed by sha256 as on the real Hub: a retried upload is told which
objects it already sent, and ``bytes_received`` counts what crossed the wire.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class FileEntry:
    oid: str  # sha256 for LFS files, git blob sha1 for regular ones (what preupload reports)
    size: int
    lfs: bool
    content: bytes | None = None  # regular files only


@dataclass
class Commit:
    sha: str
    parent: str | None
    message: str
    description: str
    files: dict[str, FileEntry]


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str | None] = field(default_factory=lambda: {"main": None})
    tags: dict[str, str] = field(default_factory=dict)

    def head(self, rev: str) -> Commit | None:
        sha = self.branches.get(rev) or self.tags.get(rev) or (rev if rev in self.commits else None)
        return self.commits.get(sha) if sha else None


class HubState:
    def __init__(self, token: str, storage: Path) -> None:
        self.token = token
        self.storage = storage
        self.repos: dict[str, Repo] = {}
        self.objects: dict[str, int] = {}  # sha256 -> size, complete uploads only
        self.bytes_received = 0
        self.lfs_bytes_received = 0  # bytes of LFS object uploads (PUT), partial ones included
        self.download_bytes = 0  # bytes served by /resolve (file downloads)
        self.faults: dict[str, list[int | str]] = {}  # endpoint -> queue of faults
        self.calls: list[tuple[str, str]] = []  # (method, path): what the client asked
        self.seen_auth: list[str] = []  # Authorization headers (to prove the token is *sent*)
        self.lock = threading.Lock()

    def inject(self, endpoint: str, *faults: int | str) -> None:
        """Next calls to ``endpoint`` ("commit", "lfs-put", "preupload", ...) fail in order: an
        int is an HTTP status; "drop:N" reads N bytes of the body, then closes the connection."""
        self.faults.setdefault(endpoint, []).extend(faults)

    def next_fault(self, endpoint: str) -> int | str | None:
        with self.lock:
            queue = self.faults.get(endpoint) or []
            return queue.pop(0) if queue else None

    def commit_count(self, repo_id: str) -> int:
        return len(self.repos[repo_id].commits)


class _Handler(BaseHTTPRequestHandler):
    state: HubState  # set on the subclass made per server
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:  # keep test output clean
        pass

    # ---- plumbing -----------------------------------------------------------------------

    def _send(self, status: int, body: Any = None, headers: dict[str, str] | None = None) -> None:
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, status: int, message: str) -> None:
        self._send(status, {"error": message}, {"X-Error-Message": message})

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        data = self.rfile.read(length) if length else b""
        with self.state.lock:
            self.state.bytes_received += len(data)
        return data

    def _authorized(self) -> bool:
        auth = self.headers.get("Authorization", "")
        with self.state.lock:
            self.state.seen_auth.append(auth)
        if auth != f"Bearer {self.state.token}":
            self._body()
            self._error(401, "Invalid credentials in Authorization header")
            return False
        return True

    def _fault(self, endpoint: str) -> bool:
        fault = self.state.next_fault(endpoint)
        if fault is None:
            return False
        if isinstance(fault, str) and fault.startswith("drop:"):
            keep = int(fault.split(":")[1])
            chunk = self.rfile.read(min(keep, int(self.headers.get("Content-Length") or 0)))
            with self.state.lock:
                self.state.bytes_received += len(chunk)
                if endpoint == "lfs-put":
                    self.state.lfs_bytes_received += len(chunk)
            self.close_connection = True
            self.connection.shutdown(2)
            return True
        self._body()
        self._error(int(fault), f"injected fault on {endpoint}")
        return True

    def _repo(self, repo_id: str) -> Repo | None:
        repo = self.state.repos.get(repo_id)
        if repo is None:
            self._error(404, "Repository not found")
        return repo

    def _route(self, method: str) -> None:
        path = self.path.split("?", 1)[0]
        with self.state.lock:
            self.state.calls.append((method, path))
        for pattern, handler_method, name in ROUTES:
            if method != handler_method:
                continue
            m = re.fullmatch(pattern, path)
            if m:
                if name != "lfs-put" and not self._authorized():
                    return
                if self._fault(name):
                    return
                getattr(self, f"h_{name.replace('-', '_')}")(**m.groupdict())
                return
        self._body()
        self._error(404, f"no fake endpoint for {method} {path}")

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def do_PUT(self) -> None:
        self._route("PUT")

    def do_DELETE(self) -> None:
        self._route("DELETE")

    def do_HEAD(self) -> None:
        self._route("HEAD")

    # ---- endpoints ----------------------------------------------------------------------

    def h_create(self) -> None:
        body = json.loads(self._body() or b"{}")
        repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") \
            else body["name"]
        if repo_id in self.state.repos:  # as the Hub does: the conflict still names the repo's URL
            self._send(409, {"error": "You already created this model repo",
                             "url": f"http://{self.headers['Host']}/{repo_id}"})
            return
        private = body.get("visibility") == "private" or bool(body.get("private"))
        self.state.repos[repo_id] = Repo(repo_id, private)
        self._send(200, {"url": f"http://{self.headers['Host']}/{repo_id}", "name": repo_id})

    def h_info(self, repo: str, rev: str | None = None) -> None:
        self._body()
        r = self._repo(repo)
        if r is None:
            return
        head = r.head(rev or "main")
        if rev and head is None and r.branches.get(rev) is None:
            self._error(404, "Revision not found")
            return
        files = head.files if head else {}
        self._send(200, {"id": repo, "modelId": repo, "private": r.private,
                         "sha": head.sha if head else None,
                         "siblings": [{"rfilename": p} for p in sorted(files)],
                         "tags": [], "downloads": 0, "likes": 0})

    def h_preupload(self, repo: str, rev: str) -> None:
        body = json.loads(self._body())
        r = self._repo(repo)
        if r is None:
            return
        head = r.head(rev)
        out = []
        for f in body["files"]:
            existing = head.files.get(f["path"]) if head else None
            lfs = f["size"] > 1024 * 1024 or f["path"].endswith((".safetensors", ".bin"))
            out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular",
                        "shouldIgnore": False, "oid": existing.oid if existing else None})
        self._send(200, {"files": out, "commitOid": head.sha if head else None})

    def h_validate_yaml(self) -> None:
        self._body()
        self._send(200, {"errors": [], "warnings": []})

    def h_lfs_batch(self, repo: str) -> None:
        body = json.loads(self._body())
        host = self.headers["Host"]
        objects = []
        for obj in body["objects"]:
            entry: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.state.objects:  # already have it: no action, no re-send
                entry["actions"] = {"upload": {"href": f"http://{host}/lfs-upload/{obj['oid']}",
                                               "header": {}}}
            objects.append(entry)
        self._send(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

    def h_lfs_put(self, oid: str) -> None:
        data = self._body()
        with self.state.lock:
            self.state.lfs_bytes_received += len(data)
        if hashlib.sha256(data).hexdigest() != oid:
            self._error(400, "content does not match its oid")
            return
        (self.state.storage / oid).write_bytes(data)
        with self.state.lock:
            self.state.objects[oid] = len(data)
        self._send(200, {})

    def h_commit(self, repo: str, rev: str) -> None:
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        r = self._repo(repo)
        if r is None:
            return
        head = r.head(rev)
        files = dict(head.files) if head else {}
        header = {}
        for item in lines:
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                content = base64.b64decode(value["content"])
                files[value["path"]] = FileEntry(git_blob_sha1(content), len(content), False,
                                                 content)
            elif key == "lfsFile":
                if value["oid"] not in self.state.objects:
                    self._error(422, f"LFS object {value['oid']} was never uploaded")
                    return
                files[value["path"]] = FileEntry(value["oid"], value["size"], True)
            elif key in ("deletedFile", "deletedFolder"):
                files.pop(value["path"], None)
        sha = uuid.uuid4().hex + uuid.uuid4().hex[:8]
        r.commits[sha] = Commit(sha, head.sha if head else None, header.get("summary", ""),
                                header.get("description", ""), files)
        r.branches[rev] = sha
        host = self.headers["Host"]
        self._send(200, {"commitUrl": f"http://{host}/{repo}/commit/{sha}", "commitOid": sha,
                         "success": True})

    def h_tree(self, repo: str, rev: str) -> None:
        """Recursive listing (what snapshot_download asks for), one page."""
        r = self._repo(repo)
        if r is None:
            return
        head = r.head(rev)
        if head is None:
            self._error(404, "Revision not found")
            return
        out = []
        for path, entry in sorted(head.files.items()):
            item: dict[str, Any] = {"type": "file", "path": path, "size": entry.size,
                                    "oid": entry.oid}
            if entry.lfs:
                item["lfs"] = {"oid": entry.oid, "size": entry.size, "pointerSize": 134}
            out.append(item)
        self._send(200, out)

    def h_resolve(self, repo: str, rev: str, path: str) -> None:
        """File download as the client does it: HEAD for metadata, then GET for the bytes."""
        r = self._repo(repo)
        if r is None:
            return
        head = r.head(rev)
        entry = head.files.get(path) if head else None
        if entry is None:
            self._error(404, f"{path} not found at {rev}")
            return
        data = (self.state.storage / entry.oid).read_bytes() if entry.lfs else entry.content
        headers = {"X-Repo-Commit": head.sha, "ETag": f'"{entry.oid}"'}
        if entry.lfs:
            headers |= {"X-Linked-Etag": f'"{entry.oid}"', "X-Linked-Size": str(len(data))}
        with self.state.lock:
            self.state.download_bytes += len(data) if self.command == "GET" else 0
        self.send_response(200)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(data)

    def h_create_tag(self, repo: str, rev: str) -> None:
        body = json.loads(self._body())
        r = self._repo(repo)
        if r is None:
            return
        if body["tag"] in r.tags:
            self._error(409, "Tag already exists")
            return
        head = r.head(rev)
        if head is None:
            self._error(404, "Revision not found")
            return
        r.tags[body["tag"]] = head.sha
        self._send(200, {})

    def h_delete_tag(self, repo: str, tag: str) -> None:
        self._body()
        r = self._repo(repo)
        if r is None:
            return
        if r.tags.pop(tag, None) is None:
            self._error(404, "Tag not found")
            return
        self._send(200, {})

    def h_refs(self, repo: str) -> None:
        self._body()
        r = self._repo(repo)
        if r is None:
            return
        self._send(200, {
            "branches": [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": s}
                         for b, s in r.branches.items() if s],
            "tags": [{"name": t, "ref": f"refs/tags/{t}", "targetCommit": s}
                     for t, s in r.tags.items()],
            "converts": [],
        })

    def h_create_branch(self, repo: str, branch: str) -> None:
        body = json.loads(self._body() or b"{}")
        r = self._repo(repo)
        if r is None:
            return
        if r.branches.get(branch):
            self._error(409, "Branch already exists")
            return
        start = r.head(body.get("startingPoint") or "main")
        r.branches[branch] = start.sha if start else None
        self._send(200, {})

    def h_delete_branch(self, repo: str, branch: str) -> None:
        self._body()
        r = self._repo(repo)
        if r is None:
            return
        r.branches.pop(branch, None)
        self._send(200, {})


_REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
ROUTES = [
    (r"/api/repos/create", "POST", "create"),
    (rf"/api/models/{_REPO}", "GET", "info"),
    (rf"/api/models/{_REPO}/revision/(?P<rev>[^/]+)", "GET", "info"),
    (rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)", "POST", "preupload"),
    (r"/api/validate-yaml", "POST", "validate-yaml"),
    (rf"/{_REPO}\.git/info/lfs/objects/batch", "POST", "lfs-batch"),
    (r"/lfs-upload/(?P<oid>[0-9a-f]{64})", "PUT", "lfs-put"),
    (rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)", "POST", "commit"),
    (rf"/api/models/{_REPO}/tag/(?P<rev>[^/]+)", "POST", "create-tag"),
    (rf"/api/models/{_REPO}/tag/(?P<tag>[^/]+)", "DELETE", "delete-tag"),
    (rf"/api/models/{_REPO}/refs", "GET", "refs"),
    (rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)", "GET", "tree"),
    (rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "GET", "resolve"),
    (rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "HEAD", "resolve"),
    (rf"/api/models/{_REPO}/branch/(?P<branch>[^/]+)", "POST", "create-branch"),
    (rf"/api/models/{_REPO}/branch/(?P<branch>[^/]+)", "DELETE", "delete-branch"),
]


class FakeHub:
    """Context manager: ``with FakeHub(token, tmp) as hub: ... hub.endpoint ... hub.state``."""

    def __init__(self, token: str, storage: Path) -> None:
        storage.mkdir(parents=True, exist_ok=True)
        self.state = HubState(token, storage)
        handler = type("Handler", (_Handler,), {"state": self.state})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()
