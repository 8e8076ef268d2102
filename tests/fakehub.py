"""A Hub-compatible HTTP server on 127.0.0.1: only the endpoints huggingface_hub's upload path uses.

The real ``huggingface_hub`` client talks to it over HTTP (HF endpoint = this server, Xet off:
the server speaks the classic LFS protocol), so everything the client does (preupload, LFS batch,
PUT, commit, refs) is exercised for real. Faults are injected here, at the network boundary:
a status code for the next N calls of an endpoint, or a connection dropped mid-upload.

Objects are content-addressed by sha256 as on the real Hub: a retried upload is told which
objects it already sent, and ``bytes_received`` counts what crossed the wire.

It says no where the Hub says no (each rejection is what huggingface_hub's own error mapping
expects): a bad token is 401, a read-only token writing is 403, a private repo read without a
token is 401 RepoNotFound, a commit to a missing branch or a ref from an unknown revision is 404
RevisionNotFound, ``main`` cannot be deleted (403), an existing tag or branch is 409, a commit
whose ``parentCommit`` is no longer the branch head is 412, LFS uploads need the batch's signed
URL and exactly the declared size, and README metadata is validated on every commit and by
``/api/validate-yaml`` (the rules for ``base_model``, ``base_model_relation``, ``license``,
``pipeline_tag`` and ``model-index``). Commit SHAs derive from content and parent, as in git.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import threading
import urllib.parse
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


class Hold:
    """A request that stops at the server until released: the test's handle on "between two
    steps of the client" (a kill -9 there, a second client racing it)."""

    def __init__(self, serve: bool) -> None:
        self.reached, self.released = threading.Event(), threading.Event()
        self.serve = serve  # False: once released, the request is dropped unserved


class HubState:
    def __init__(self, token: str, storage: Path, read_token: str | None = None) -> None:
        self.token = token
        self.tokens = {token: "write"} | ({read_token: "read"} if read_token else {})
        self.signing_key = os.urandom(16)  # signs LFS upload URLs, as S3 presigned URLs are
        self.holds: dict[str, Hold] = {}
        self.barriers: dict[str, list[Any]] = {}  # endpoint -> [Barrier, calls still to wait]
        self.storage = storage
        self.multipart_threshold = 5 * 10**9  # S3's single-PUT ceiling
        self.chunk_size = 512 * 2**20
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
        """Next calls to ``endpoint`` ("commit", "lfs-put", "preupload", ...; "lfs-put:<oid>"
        for one object's upload) fail in order: an int is an HTTP status; "drop:N" reads N
        bytes of the body, then closes the connection."""
        self.faults.setdefault(endpoint, []).extend(faults)

    def next_fault(self, endpoint: str) -> int | str | None:
        with self.lock:
            queue = self.faults.get(endpoint) or []
            return queue.pop(0) if queue else None

    def hold(self, endpoint: str, serve: bool = True) -> Hold:
        """The next call of ``endpoint`` waits (up to 120 s) until ``released`` is set; with
        ``serve=False`` it is then dropped, as if the client had died before sending it."""
        self.holds[endpoint] = Hold(serve)
        return self.holds[endpoint]

    def barrier(self, endpoint: str, parties: int) -> None:
        """The next ``parties`` calls of ``endpoint`` wait for each other: a real race."""
        self.barriers[endpoint] = [threading.Barrier(parties, timeout=60), parties]

    def commit_count(self, repo_id: str) -> int:
        """Commits made after the repo's own initial one."""
        return len(self.repos[repo_id].commits) - 1

    def sign(self, oid: str, size: int) -> str:
        return hmac.new(self.signing_key, f"{oid}:{size}".encode(), "sha256").hexdigest()


# ---- what the Hub's metadata validation accepts (the subset our cards can touch) -------------

LICENSES = {"apache-2.0", "mit", "bsd-3-clause", "cc-by-4.0", "cc-by-nc-4.0", "cc-by-sa-4.0",
            "openrail", "llama2", "llama3", "llama3.1", "llama3.2", "llama3.3", "llama4", "gemma",
            "other", "unknown"}
PIPELINE_TAGS = {"text-generation", "text2text-generation", "fill-mask", "feature-extraction",
                 "image-text-to-text", "text-classification"}
RELATIONS = {"adapter", "merge", "quantized", "finetune"}
MODEL_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")


def front_matter(text: str) -> dict[str, Any] | str:
    import yaml

    m = re.match(r"^---\n(.*?)\n---\n", text, re.S)
    if not m:
        return {}
    try:
        data = yaml.safe_load(m.group(1))
    except yaml.YAMLError as exc:
        return f"YAML metadata is not valid: {exc}"
    return data if isinstance(data, dict) else "YAML metadata must be a mapping"


#: Public models "on the Hub" that a card may name as base_model (the Hub checks the id exists).
PUBLIC_MODELS = {"HuggingFaceTB/SmolLM2-135M-Instruct", "meta-llama/Meta-Llama-3-8B-Instruct",
                 "meta-llama/Llama-3.1-8B-Instruct", "Qwen/Qwen3-8B", "acme/tiny-llama"}


def metadata_errors(card: str, known: set[str] = PUBLIC_MODELS) -> list[str]:
    data = front_matter(card)
    if isinstance(data, str):
        return [data]
    errors = []
    if "license" in data and data["license"] not in LICENSES:
        errors.append(f'"license" must be one of [{", ".join(sorted(LICENSES))}]')
    if data.get("license") == "other" and not data.get("license_name"):
        errors.append('"license_name" is required when "license" is "other"')
    if "pipeline_tag" in data and data["pipeline_tag"] not in PIPELINE_TAGS:
        errors.append(f'"pipeline_tag" must be one of [{", ".join(sorted(PIPELINE_TAGS))}]')
    bases = data.get("base_model")
    for base in (bases if isinstance(bases, list) else [bases] if bases is not None else []):
        if not (isinstance(base, str) and MODEL_ID.match(base) and ".." not in base
                and "--" not in base and len(base) <= 96 and base in known):
            errors.append(f'"base_model" with value "{base}" is not valid. Use a model id from '
                          "https://hf.co/models.")
    relation = data.get("base_model_relation")
    if relation is not None and relation not in RELATIONS:
        errors.append(f'"base_model_relation" must be one of [{", ".join(sorted(RELATIONS))}]')
    if relation is not None and not bases:
        errors.append('"base_model_relation" requires "base_model"')
    tags = data.get("tags")
    if tags is not None and not (isinstance(tags, list) and all(isinstance(t, str) for t in tags)):
        errors.append('"tags" must be an array of strings')
    errors += model_index_errors(data.get("model-index"))
    return errors


def model_index_errors(index: Any) -> list[str]:
    if index is None:
        return []
    if not isinstance(index, list):
        return ['"model-index" must be an array']
    errors = []
    for i, entry in enumerate(index):
        where = f"model-index[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            errors.append(f'"{where}.name" is required and must be a string')
            continue
        for j, result in enumerate(entry.get("results") or []):
            at = f"{where}.results[{j}]"
            if not isinstance((result.get("task") or {}).get("type"), str):
                errors.append(f'"{at}.task.type" is required and must be a string')
            dataset = result.get("dataset") or {}
            for key in ("type", "name"):
                if not isinstance(dataset.get(key), str):
                    errors.append(f'"{at}.dataset.{key}" is required and must be a string')
            for k, metric in enumerate(result.get("metrics") or [None]):
                if not (isinstance(metric, dict) and isinstance(metric.get("type"), str)
                        and isinstance(metric.get("value"), int | float | str)):
                    errors.append(f'"{at}.metrics[{k}]" needs a string "type" and a "value"')
    return errors


def commit_sha(parent: str | None, files: dict[str, FileEntry], summary: str,
               description: str) -> str:
    """Content and parent, as git: the same tree on another parent is another commit."""
    tree = sorted((path, entry.oid) for path, entry in files.items())
    return hashlib.sha1(json.dumps([parent, tree, summary, description]).encode()).hexdigest()


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

    def _error(self, status: int, message: str, code: str | None = None) -> None:
        headers = {"X-Error-Message": message} | ({"X-Error-Code": code} if code else {})
        self._send(status, {"error": message}, headers)

    def _body(self) -> bytes:
        if getattr(self, "_read", None) is not None:
            return self._read
        length = int(self.headers.get("Content-Length") or 0)
        data = self.rfile.read(length) if length else b""
        with self.state.lock:
            self.state.bytes_received += len(data)
        self._read = data
        return data

    def _role(self) -> str | bool | None:
        """"write", "read", None (anonymous), or False after answering 401 for a bad token."""
        auth = self.headers.get("Authorization", "")
        with self.state.lock:
            self.state.seen_auth.append(auth)
        if not auth:
            return None
        role = self.state.tokens.get(auth.removeprefix("Bearer "))
        if role is None:
            self._body()
            self._error(401, "Invalid credentials in Authorization header")
            return False
        return role

    def _can_write(self, role: str | None) -> bool:
        if role == "write":
            return True
        self._body()
        if role is None:
            self._error(401, "You must be authenticated to write to a repository")
        else:
            self._error(403, "You don't have the rights to write to this repository: the token "
                        "is read-only")
        return False

    def _fault(self, endpoint: str) -> bool:
        fault = self.state.next_fault(endpoint)
        if fault is None:
            return False
        if isinstance(fault, str) and fault.startswith("drop:"):
            keep = int(fault.split(":")[1])
            chunk = self.rfile.read(min(keep, int(self.headers.get("Content-Length") or 0)))
            with self.state.lock:
                self.state.bytes_received += len(chunk)
                if endpoint.startswith("lfs-put"):
                    self.state.lfs_bytes_received += len(chunk)
            self.close_connection = True
            self.connection.shutdown(2)
            return True
        self._body()
        self._error(int(fault), f"injected fault on {endpoint}")
        return True

    def _wait(self, endpoint: str) -> bool:
        """False when the request is to be dropped unserved."""
        with self.state.lock:
            entry = self.state.barriers.get(endpoint)
            if entry is not None:
                entry[1] -= 1
                if entry[1] == 0:
                    del self.state.barriers[endpoint]
        if entry is not None:
            entry[0].wait()
        hold = self.state.holds.pop(endpoint, None)
        if hold is not None:
            hold.reached.set()
            hold.released.wait(120)
            if not hold.serve:
                self.close_connection = True
                return False
        return True

    def _repo(self, repo_id: str, role: str | None = "write") -> Repo | None:
        """The repo, or a 404/401 as the Hub answers: a private repo is invisible to anonymous
        callers (401 with RepoNotFound, which the client maps to RepositoryNotFoundError)."""
        repo = self.state.repos.get(repo_id)
        if repo is None:
            self._error(404, "Repository not found", "RepoNotFound")
        elif repo.private and role is None:
            self._error(401, "Repository not found", "RepoNotFound")
            return None
        return repo

    def _route(self, method: str) -> None:
        self._read = None
        path = self.path.split("?", 1)[0]
        with self.state.lock:
            self.state.calls.append((method, path))
        for pattern, handler_method, name in ROUTES:
            if method != handler_method:
                continue
            m = re.fullmatch(pattern, path)
            if m:
                role = self._role() if name not in PRESIGNED | {"validate-yaml"} else "write"
                if role is False or (name in WRITES and not self._can_write(role)):
                    return
                target = f"{name}:{m.groupdict().get('oid')}"  # a fault for one object
                if self._fault(target if target in self.state.faults else name):
                    return
                if not self._wait(name):
                    return
                args = {k: urllib.parse.unquote(v) for k, v in m.groupdict().items()}
                if name in READS:
                    args["role"] = role
                getattr(self, f"h_{name.replace('-', '_')}")(**args)
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

    def _readable(self, repo: str, rev: str, role: str | None) -> Commit | None:
        r = self._repo(repo, role)
        return self._revision(r, rev) if r is not None else None

    def _revision(self, r: Repo, rev: str) -> Commit | None:
        """The commit ``rev`` names, or None after answering 404 (an empty branch included:
        nothing we call reads one)."""
        head = r.head(rev)
        if head is None:
            self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return head

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
        repo = self.state.repos[repo_id] = Repo(repo_id, private)
        # as on the Hub, a new repo has one commit: .gitattributes routing weights to LFS
        attrs = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
        files = {".gitattributes": FileEntry(git_blob_sha1(attrs), len(attrs), False, attrs)}
        sha = commit_sha(None, files, "initial commit", "")
        repo.commits[sha] = Commit(sha, None, "initial commit", "", files)
        repo.branches["main"] = sha
        self._send(200, {"url": f"http://{self.headers['Host']}/{repo_id}", "name": repo_id})

    def h_info(self, repo: str, role: str | None, rev: str | None = None) -> None:
        self._body()
        r = self._repo(repo, role)
        if r is None:
            return
        head = r.head(rev or "main")
        if rev and head is None and r.branches.get(rev) is None:
            self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
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
        """As the Hub: 400 with the reasons as text (huggingface_hub raises ValueError on it)."""
        body = json.loads(self._body() or b"{}")
        errors = metadata_errors(body.get("content", ""), PUBLIC_MODELS | set(self.state.repos))
        if errors:
            data = "\n".join(errors).encode()
            self.send_response(400)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        self._send(200, {"errors": [], "warnings": []})

    def h_lfs_batch(self, repo: str) -> None:
        """Upload URLs for the objects the Hub lacks: one presigned PUT, or (over the
        multipart threshold, as S3 caps a single PUT at 5 GB) presigned part URLs and a
        completion URL. Each batch answer is a new upload: parts of an earlier, abandoned
        upload are not reused, as with S3 multipart uploads."""
        body = json.loads(self._body())
        if self._repo(repo) is None:
            return
        objects = []
        for obj in body["objects"]:
            entry: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.state.objects:  # already have it: no action, no re-send
                entry["actions"] = {"upload": self._upload_action(obj["oid"], obj["size"])}
            objects.append(entry)
        self._send(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

    def _upload_action(self, oid: str, size: int) -> dict[str, Any]:
        host = self.headers["Host"]
        if size <= self.state.multipart_threshold:
            query = urllib.parse.urlencode({"size": size, "sig": self.state.sign(oid, size)})
            return {"href": f"http://{host}/lfs-upload/{oid}?{query}", "header": {}}
        upload_id = os.urandom(8).hex()
        chunk = self.state.chunk_size
        header: dict[str, str] = {"chunk_size": str(chunk)}
        for n in range(1, -(-size // chunk) + 1):
            part = min(chunk, size - (n - 1) * chunk)
            key = f"{oid}:{upload_id}:{n}"
            query = urllib.parse.urlencode({"size": part, "sig": self.state.sign(key, part)})
            header[f"{n:05d}"] = f"http://{host}/lfs-part/{oid}/{upload_id}/{n}?{query}"
        query = urllib.parse.urlencode({"size": size, "sig": self.state.sign(upload_id, size)})
        return {"href": f"http://{host}/lfs-complete/{oid}/{upload_id}?{query}", "header": header}

    def _signed(self, key: str) -> int | None:
        """The declared size if the URL's signature for ``key`` holds, else None after 403."""
        query = dict(urllib.parse.parse_qsl(self.path.partition("?")[2]))
        size = int(query.get("size", -1))
        if hmac.compare_digest(query.get("sig", ""), self.state.sign(key, size)):
            return size
        self._drain()
        self._error(403, "Request signature does not match: ask the LFS batch endpoint for an "
                    "upload URL")
        return None

    def _drain(self) -> None:
        self._receive(None)

    def _receive(self, path: Path | None) -> tuple[int, str]:
        """Stream the body to ``path`` in 8 MiB pieces (a 5 GB shard never sits in memory);
        count every byte that arrives, also of a cut-off upload."""
        remaining = int(self.headers.get("Content-Length") or 0)
        digest, total = hashlib.sha256(), 0
        with open(path, "wb") if path else open(os.devnull, "wb") as out:
            while remaining:
                chunk = self.rfile.read(min(remaining, 8 << 20))
                if not chunk:
                    break
                remaining -= len(chunk)
                total += len(chunk)
                digest.update(chunk)
                out.write(chunk)
                with self.state.lock:
                    self.state.bytes_received += len(chunk)
                    self.state.lfs_bytes_received += len(chunk)
        self._read = b""
        return total, digest.hexdigest()

    def _receive_declared(self, path: Path, size: int) -> str | None:
        """The body's sha256 if exactly the declared size arrived; else None after a 400."""
        got, sha = self._receive(path)
        if got == size:
            return sha
        path.unlink(missing_ok=True)
        self._error(400, f"Upload of {got} bytes does not match the declared {size}")
        return None

    def h_lfs_put(self, oid: str) -> None:
        """A presigned URL: no token, but the signature of (oid, declared size) must match."""
        size = self._signed(oid)
        if size is None:
            return
        tmp = self.state.storage / f"{oid}.{os.urandom(4).hex()}.partial"
        sha = self._receive_declared(tmp, size)
        if sha is None:
            return
        if sha != oid:
            tmp.unlink(missing_ok=True)
            self._error(400, "content does not match its oid")
            return
        self._store(oid, tmp, size)
        self._send(200, {})

    def _store(self, oid: str, tmp: Path, size: int) -> None:
        tmp.replace(self.state.storage / oid)
        with self.state.lock:
            self.state.objects[oid] = size

    def h_lfs_part(self, oid: str, upload_id: str, n: str) -> None:
        size = self._signed(f"{oid}:{upload_id}:{n}")
        if size is None:
            return
        sha = self._receive_declared(self.state.storage / f"{oid}.{upload_id}.{int(n):05d}", size)
        if sha is None:
            return
        self.send_response(200)
        self.send_header("ETag", f'"{sha[:32]}"')
        self.send_header("Content-Length", "0")
        self.end_headers()

    def h_lfs_complete(self, oid: str, upload_id: str) -> None:
        size = self._signed(upload_id)
        if size is None:
            return
        body = json.loads(self._body())
        parts = sorted(self.state.storage.glob(f"{oid}.{upload_id}.*"))
        if body.get("oid") != oid or len(body.get("parts", [])) != len(parts):
            self._error(400, "Completion does not list every uploaded part")
            return
        tmp = self.state.storage / f"{oid}.{upload_id}.assembled"
        digest = hashlib.sha256()
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as src:
                    while chunk := src.read(8 << 20):
                        digest.update(chunk)
                        out.write(chunk)
                part.unlink()
        if tmp.stat().st_size != size or digest.hexdigest() != oid:
            tmp.unlink()
            self._error(400, "Assembled parts do not match the declared oid and size")
            return
        self._store(oid, tmp, size)
        self._send(200, {})

    def h_commit(self, repo: str, rev: str) -> None:
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        r = self._repo(repo)
        if r is None:
            return
        with self.state.lock:  # one commit at a time per server, as one git ref update
            self._commit(r, rev, lines)

    def _commit(self, r: Repo, rev: str, lines: list[dict[str, Any]]) -> None:
        if rev not in r.branches:
            self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            return
        head = r.head(rev)
        header = next((i["value"] for i in lines if i["key"] == "header"), {})
        parent = header.get("parentCommit")
        if parent and not (head and head.sha.startswith(parent)):
            self._error(412, "A commit has happened since. Please refresh and try again.")
            return
        files = dict(head.files) if head else {}
        for item in lines:
            key, value = item["key"], item["value"]
            if key == "file":
                content = base64.b64decode(value["content"])
                files[value["path"]] = FileEntry(git_blob_sha1(content), len(content), False,
                                                 content)
            elif key == "lfsFile":
                if value["oid"] not in self.state.objects:
                    self._error(422, f"LFS object {value['oid']} was never uploaded")
                    return
                files[value["path"]] = FileEntry(value["oid"], self.state.objects[value["oid"]],
                                                 True)
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                files = {p: f for p, f in files.items()
                         if not p.startswith(value["path"].rstrip("/") + "/")}
        card = files.get("README.md")
        known = PUBLIC_MODELS | set(self.state.repos)
        errors = metadata_errors(card.content.decode(), known) if card and card.content else []
        if errors:
            self._error(400, "Invalid metadata in README.md.\n- " + "\n- ".join(errors))
            return
        summary, description = header.get("summary", ""), header.get("description", "")
        sha = commit_sha(head.sha if head else None, files, summary, description)
        r.commits[sha] = Commit(sha, head.sha if head else None, summary, description, files)
        r.branches[rev] = sha
        host = self.headers["Host"]
        self._send(200, {"commitUrl": f"http://{host}/{r.repo_id}/commit/{sha}",
                         "commitOid": sha, "success": True})

    def h_tree(self, repo: str, rev: str, role: str | None) -> None:
        """Recursive listing (what snapshot_download asks for), one page."""
        head = self._readable(repo, rev, role)
        if head is None:
            return
        self._send(200, [self._file_info(path, entry)
                         for path, entry in sorted(head.files.items())])

    @staticmethod
    def _file_info(path: str, entry: FileEntry) -> dict[str, Any]:
        item: dict[str, Any] = {"type": "file", "path": path, "size": entry.size,
                                "oid": entry.oid}
        if entry.lfs:
            item["lfs"] = {"oid": entry.oid, "size": entry.size, "pointerSize": 134}
        return item

    def h_paths_info(self, repo: str, rev: str, role: str | None) -> None:
        form = urllib.parse.parse_qs(self._body().decode())
        head = self._readable(repo, rev, role)
        if head is None:
            return
        self._send(200, [self._file_info(p, head.files[p]) for p in form.get("paths", [])
                         if p in head.files])

    def h_commits(self, repo: str, rev: str, role: str | None) -> None:
        commit = self._readable(repo, rev, role)
        if commit is None:
            return
        r = self.state.repos[repo]
        out = []
        while commit is not None:
            out.append({"id": commit.sha, "authors": [{"user": "requant-bot"}],
                        "date": "2026-11-25T00:00:00.000Z", "title": commit.message,
                        "message": commit.description})
            commit = r.commits.get(commit.parent) if commit.parent else None
        self._send(200, out)

    def h_resolve(self, repo: str, rev: str, path: str, role: str | None) -> None:
        """File download as the client does it: HEAD for metadata, then GET for the bytes."""
        r = self._repo(repo, role)
        if r is None:
            return
        head = r.head(rev)
        entry = head.files.get(path) if head else None
        if entry is None:
            self._error(404, f"{path} not found at {rev}", "EntryNotFound")
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
        with self.state.lock:
            if body["tag"] in r.tags:
                self._error(409, "Tag already exists")
                return
            head = self._revision(r, rev)
            if head is None:
                return
            r.tags[body["tag"]] = head.sha
        self._send(200, {})

    def h_delete_tag(self, repo: str, tag: str) -> None:
        self._body()
        r = self._repo(repo)
        if r is None:
            return
        if r.tags.pop(tag, None) is None:
            self._error(404, f"Invalid rev id: {tag}", "RevisionNotFound")
            return
        self._send(200, {})

    def h_refs(self, repo: str, role: str | None) -> None:
        self._body()
        r = self._repo(repo, role)
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
        with self.state.lock:
            if branch in r.branches:
                self._error(409, f"Reference refs/heads/{branch} already exists")
                return
            start = r.head("main")
            if body.get("startingPoint"):
                start = self._revision(r, body["startingPoint"])
                if start is None:
                    return
            r.branches[branch] = start.sha if start else None
        self._send(200, {})

    def h_delete_branch(self, repo: str, branch: str) -> None:
        self._body()
        r = self._repo(repo)
        if r is None:
            return
        if branch == "main":
            self._error(403, "Cannot delete the default branch 'main'")
            return
        if r.branches.pop(branch, "missing") == "missing":
            self._error(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            return
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
    (r"/lfs-part/(?P<oid>[0-9a-f]{64})/(?P<upload_id>[0-9a-f]+)/(?P<n>\d+)", "PUT", "lfs-part"),
    (r"/lfs-complete/(?P<oid>[0-9a-f]{64})/(?P<upload_id>[0-9a-f]+)", "POST", "lfs-complete"),
    (rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)", "POST", "commit"),
    (rf"/api/models/{_REPO}/commits/(?P<rev>[^/]+)", "GET", "commits"),
    (rf"/api/models/{_REPO}/paths-info/(?P<rev>[^/]+)", "POST", "paths-info"),
    (rf"/api/models/{_REPO}/tag/(?P<rev>[^/]+)", "POST", "create-tag"),
    (rf"/api/models/{_REPO}/tag/(?P<tag>[^/]+)", "DELETE", "delete-tag"),
    (rf"/api/models/{_REPO}/refs", "GET", "refs"),
    (rf"/api/models/{_REPO}/tree/(?P<rev>[^/]+)", "GET", "tree"),
    (rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "GET", "resolve"),
    (rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "HEAD", "resolve"),
    (rf"/api/models/{_REPO}/branch/(?P<branch>[^/]+)", "POST", "create-branch"),
    (rf"/api/models/{_REPO}/branch/(?P<branch>[^/]+)", "DELETE", "delete-branch"),
]
PRESIGNED = {"lfs-put", "lfs-part", "lfs-complete"}  # the signature is the credential
READS = {"info", "commits", "paths-info", "refs", "tree", "resolve"}
WRITES = {"create", "preupload", "lfs-batch", "commit", "create-tag", "delete-tag",
          "create-branch", "delete-branch"}


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that died mid-request (the kill -9 tests) is expected, not an error."""
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class FakeHub:
    """Context manager: ``with FakeHub(token, tmp) as hub: ... hub.endpoint ... hub.state``."""

    def __init__(self, token: str, storage: Path, read_token: str | None = None) -> None:
        storage.mkdir(parents=True, exist_ok=True)
        self.state = HubState(token, storage, read_token)
        handler = type("Handler", (_Handler,), {"state": self.state})
        self.server = _Server(("127.0.0.1", 0), handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()
