"""A local, Hugging Face Hub-compatible HTTP server for tests.

The server speaks the subset of the Hub HTTP API that the real, unmodified ``huggingface_hub`` client (and through it
``transformers`` and ``datasets``) uses to create repos, upload (regular and LFS files), list and download files:

- ``GET /api/whoami-v2``, ``POST /api/repos/create``, ``POST /api/repos/delete``, ``POST /api/validate-yaml``
- ``GET /api/{models,datasets}/{repo_id}[/revision/{rev}]`` (``sha``, ``siblings``; ``?blobs=true`` adds sizes/LFS)
- ``POST /api/{type}s/{repo_id}/preupload/{rev}`` ("lfs" for ``*.safetensors``, ``*.parquet``, ``*.bin``, ... and files
  over 10 MB, "regular" otherwise), ``POST .../commit/{rev}`` (NDJSON: header, file, lfsFile, deletedFile,
  deletedFolder), ``POST /{repo_id}.git/info/lfs/objects/batch`` (basic transfer) + ``PUT`` of the object + verify
- ``POST .../paths-info/{rev}``, ``GET .../tree/{rev}[/{path}]`` (``recursive``, ``expand``, cursor pagination with a
  ``Link`` header), ``GET .../refs``, ``GET .../commits/{rev}``, ``POST/DELETE .../branch/{branch}``,
  ``POST .../tag/{rev}``, ``DELETE .../tag/{tag}``
- ``HEAD``/``GET /{repo_id}/resolve/{rev}/{path}`` and ``/datasets/{repo_id}/resolve/...`` with ``X-Repo-Commit``,
  ``ETag``, ``X-Linked-Etag``/``X-Linked-Size`` (LFS files), ``Content-Length``, ``Range`` (206) and 404 errors carrying
  ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``) that the client maps to its own errors.

Storage lives on disk under ``root``: file contents in ``root/objects/<sha256>``, and per repo
``root/repos/<type>s/<namespace>/<name>/refs.json`` plus one JSON manifest per commit in ``commits/<oid>.json``
(``path -> {sha256, size, lfs, oid}``, parents, title, message, date). Creating a repo makes an initial commit holding a
``.gitattributes`` file, as the Hub does. Anyone may read; writes need an ``Authorization`` header (any token).
Every part of a request that names something is checked against the Hub's rules before it is used (HTTP 400
otherwise): the repo type (``model`` / ``dataset`` / ``space``), the namespace and repo name (``check_repo_name``),
the file paths of uploads and commits (``check_path_in_repo``: relative, no ``.``, ``..``, empty or ``.git`` part) and
branch / tag names (``check_ref_name``); a repo folder is always inside ``root/repos``.

Failure injection (real HTTP errors, no mocks): ``server.fail_next(n, status=500, route="commit")`` makes the next
``n`` requests of that route fail; ``server.set_delay(seconds, route="commit")`` slows a route down.
``server.requests`` records ``(method, route, path)`` of every request. Routes are: ``whoami``, ``create-repo``,
``delete-repo``, ``validate-yaml``, ``info``, ``preupload``, ``commit``, ``lfs-batch``, ``lfs-upload``, ``lfs-verify``,
``paths-info``, ``tree``, ``refs``, ``commits``, ``branch``, ``tag``, ``resolve`` (``unknown`` in ``server.requests``
for endpoints this server does not implement); ``"*"`` matches all of them.

Usage
-----
In a test module (pytest puts ``tests/`` on ``sys.path``)::

    from hub_server import hub_server_fixture  # noqa: F401  (registers the `hub_server` fixture)

    def test_push(hub_server, tmp_path):
        from huggingface_hub import HfApi, hf_hub_download
        HfApi().create_repo("user/tiny")  # the server's user is ``hub_server.user == "user"``
        ...  # push_to_hub / upload_folder / from_pretrained("user/tiny") / load_dataset("user/tiny-ds") as usual
        hub_server.fail_next(2, status=503, route="commit")  # the next 2 commits get a real HTTP 503
        assert hub_server.count("lfs-upload", "PUT") == 1

The ``hub_server`` fixture (function scope; needs ``tmp_path`` and ``monkeypatch``) starts a server on ``127.0.0.1``
(free port) with its storage in ``tmp_path / "hub"`` and points this process's clients at it, undone after the test:

- environment: ``HF_ENDPOINT``, a dummy ``HF_TOKEN``, ``HF_HUB_DISABLE_XET=1``, ``HF_HUB_OFFLINE=0`` (also
  ``HF_DATASETS_OFFLINE=0``, ``TRANSFORMERS_OFFLINE=0``), ``HF_HUB_DISABLE_TELEMETRY=1``, and ``HF_HOME``,
  ``HF_HUB_CACHE``, ``HF_DATASETS_CACHE``, ``HF_XET_CACHE`` under ``tmp_path / "hf_home"`` (a fresh, empty cache);
- the values that ``huggingface_hub.constants`` and ``datasets.config`` read from that environment once at import time
  (``transformers`` and ``datasets``, when installed, are imported first so that this covers them), the endpoint of
  ``huggingface_hub``'s module-level ``HfApi`` (behind ``huggingface_hub.create_repo`` & co) and ``transformers``'
  lazily created shared ``HfApi``. These are configuration values, not functions: every call still goes through the
  real client over real HTTP.

It yields the :class:`HubServer`: ``.endpoint`` (``http://127.0.0.1:<port>``), ``.root``, ``.user``, ``.hf_home``,
``.env`` (``os.environ`` plus the variables above: pass ``env=hub_server.env`` to ``subprocess.run`` so that a fresh
process reads them at import), ``.fail_next``, ``.set_delay``, ``.count``, ``.requests``, ``.page_size`` (lower it to
exercise pagination) and ``.errors``; the fixture fails the test if the server itself crashed on a request.
Other scopes: ``server = start_hub_server(root)`` then ``point_clients_at(server, monkeypatch)``, and ``server.close()``
(``HubServer`` is also a context manager).
"""

import base64
import fnmatch
import hashlib
import hmac
import importlib
import json
import os
import re
import secrets
import shutil
import sys
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlencode

import pytest
from huggingface_hub import HfFileSystem

USER = "user"
DUMMY_TOKEN = "hf_local_test_server_dummy_token"
LFS_PATTERNS = (
    "*.safetensors", "*.parquet", "*.bin", "*.arrow", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.npy", "*.npz",
    "*.onnx", "*.msgpack", "*.pkl", "*.zip", "*.gz", "*.tar", "*.zst",
)  # fmt: skip
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024  # the Hub requires LFS above 10 MB
GITATTRIBUTES = "".join(f"{pattern} filter=lfs diff=lfs merge=lfs -text\n" for pattern in LFS_PATTERNS)
REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
ROUTES = (
    "whoami", "create-repo", "delete-repo", "validate-yaml", "info", "preupload", "commit", "lfs-batch", "lfs-upload",
    "lfs-verify", "paths-info", "tree", "refs", "commits", "branch", "tag", "resolve",
)  # fmt: skip
COMMIT_OID = re.compile(r"^[0-9a-f]{7,40}$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
# The Hub's naming rules (as `huggingface_hub.utils.validate_repo_id` states them): ASCII letters, digits, "_", "-" and
# "."; 1-96 characters that neither start nor end with "-" or "."; no "--" or ".."; no ".git" ending.
REPO_NAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?", re.ASCII)
FORBIDDEN_PATH_PARTS = ("", ".", "..", ".git")
MAX_PATH_LENGTH = 1000


class HubError(Exception):
    """An HTTP error answered the way the Hub does (JSON body, ``X-Error-Code`` / ``X-Error-Message`` headers)."""

    def __init__(self, status: int, message: str, error_code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code
        self.headers = headers or {}


def check_repo_type(repo_type) -> str:
    """``repo_type`` if it is one of the Hub's repo types, else a 400 error."""
    if repo_type not in URL_PREFIXES:
        raise HubError(400, f"Invalid repo type {repo_type!r}: expected one of {sorted(URL_PREFIXES)}")
    return repo_type


def check_repo_name(name, what: str = "repo name") -> str:
    """``name`` (a namespace or a repo name) if it follows the Hub's naming rules, else a 400 error."""
    if (
        not isinstance(name, str)
        or not REPO_NAME.fullmatch(name)
        or "--" in name
        or ".." in name
        or name.endswith(".git")
    ):
        raise HubError(
            400,
            f"Invalid {what} {name!r}: use letters, digits, '-', '_' or '.' (at most 96), not starting or ending "
            "with '-' or '.', without '--', '..' or a '.git' ending",
        )
    return name


def check_repo_id(repo_id) -> str:
    """``repo_id`` if it is ``namespace/name`` with both parts valid (see ``check_repo_name``), else a 400 error."""
    parts = repo_id.split("/") if isinstance(repo_id, str) else []
    if len(parts) != 2:
        raise HubError(400, f"Invalid repo id {repo_id!r}: expected 'namespace/name'")
    check_repo_name(parts[0], "namespace")
    check_repo_name(parts[1])
    return repo_id


def check_path_in_repo(path, folder: bool = False) -> str:
    """``path`` if it is a relative path inside a repo (no empty, ``.``, ``..`` or ``.git`` part; a ``folder`` may end
    with ``/``), else a 400 error."""
    if (
        not isinstance(path, str)
        or len(path) > MAX_PATH_LENGTH
        or any(part in FORBIDDEN_PATH_PARTS for part in (path.removesuffix("/") if folder else path).split("/"))
        or any(ord(char) < 32 or char == "\\" for char in path)
    ):
        raise HubError(400, f"Invalid path in repo {path!r}: expected a relative path without '.', '..' or '.git'")
    return path


def check_ref_name(name) -> str:
    """``name`` if it is a valid branch or tag name (git's rules, simplified), else a 400 error."""
    if (
        not isinstance(name, str)
        or not name
        or any(part in FORBIDDEN_PATH_PARTS or part.startswith((".", "-")) or part.endswith(".lock")
               for part in name.split("/"))
        or any(ord(char) < 33 or char in "~^:?*[\\\x7f" for char in name)
        or "@{" in name
        or name.endswith(".")
    ):
        raise HubError(400, f"Invalid reference name {name!r}")
    return name


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


class HubStore:
    """Repos, refs and commits as JSON files on disk; file contents addressed by sha256. Thread-safe."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.objects = self.root / "objects"
        self.objects.mkdir(parents=True, exist_ok=True)
        (self.root / "repos").mkdir(exist_ok=True)
        self.lock = threading.RLock()

    # objects
    def put_object(self, data: bytes) -> str:
        sha256 = hashlib.sha256(data).hexdigest()
        path = self.objects / sha256
        if not path.exists():
            tmp = path.with_suffix(f".tmp{threading.get_ident()}")
            tmp.write_bytes(data)
            tmp.replace(path)
        return sha256

    def object_path(self, sha256: str) -> Path:
        if not SHA256.match(sha256):
            raise HubError(400, f"Invalid sha256 oid {sha256!r}")
        return self.objects / sha256

    # repos
    def repo_dir(self, repo_type: str, repo_id: str) -> Path:
        """``root/repos/<type>s/<namespace>/<name>`` after checking every part; never a folder outside ``root``."""
        path = self.root / "repos" / f"{check_repo_type(repo_type)}s" / check_repo_id(repo_id)
        if not path.resolve().is_relative_to((self.root / "repos").resolve()):
            raise HubError(400, f"Invalid repo id {repo_id!r}")
        return path

    def require_repo(self, repo_type: str, repo_id: str) -> Path:
        path = self.repo_dir(repo_type, repo_id)
        if not (path / "refs.json").exists():
            raise HubError(404, f"Repository {repo_type}s/{repo_id} not found", "RepoNotFound")
        return path

    def create_repo(self, repo_type: str, repo_id: str, private: bool) -> bool:
        """Create the repo with an initial commit; return False if it already exists."""
        with self.lock:
            path = self.repo_dir(repo_type, repo_id)
            if (path / "refs.json").exists():
                return False
            (path / "commits").mkdir(parents=True)
            (path / "meta.json").write_text(json.dumps({"private": private, "createdAt": _now()}))
            self._write_refs(path, {"branches": {}, "tags": {}})
            data = GITATTRIBUTES.encode()
            files = {".gitattributes": self._regular_entry(data)}
            oid = self._write_commit(path, parents=[], files=files, title="initial commit", description="")
            self._write_refs(path, {"branches": {"main": oid}, "tags": {}})
            return True

    def delete_repo(self, repo_type: str, repo_id: str) -> None:
        with self.lock:
            shutil.rmtree(self.require_repo(repo_type, repo_id))

    def meta(self, repo_type: str, repo_id: str) -> dict:
        return json.loads((self.require_repo(repo_type, repo_id) / "meta.json").read_text())

    # refs and commits
    def refs(self, repo_type: str, repo_id: str) -> dict:
        return json.loads((self.require_repo(repo_type, repo_id) / "refs.json").read_text())

    @staticmethod
    def _write_refs(path: Path, refs: dict) -> None:
        tmp = path / "refs.json.tmp"
        tmp.write_text(json.dumps(refs, indent=1))
        tmp.replace(path / "refs.json")

    def commit_info(self, repo_type: str, repo_id: str, oid: str) -> dict:
        return json.loads((self.require_repo(repo_type, repo_id) / "commits" / f"{oid}.json").read_text())

    def resolve(self, repo_type: str, repo_id: str, revision: str) -> dict:
        """The commit a branch, tag or (possibly abbreviated) commit oid points to."""
        path = self.require_repo(repo_type, repo_id)
        refs = self.refs(repo_type, repo_id)
        name = revision.removeprefix("refs/heads/").removeprefix("refs/tags/")
        oid = refs["branches"].get(name) or refs["tags"].get(name)
        if oid is None and COMMIT_OID.match(revision):
            matches = [p.stem for p in (path / "commits").glob(f"{revision}*.json")]
            oid = matches[0] if len(matches) == 1 else None
        if oid is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return self.commit_info(repo_type, repo_id, oid)

    def _write_commit(self, path: Path, parents: list, files: dict, title: str, description: str) -> str:
        commit = {
            "parents": parents,
            "title": title,
            "message": title + (f"\n\n{description}" if description else ""),
            "date": _now(),
            "authors": [USER],
            "files": files,
        }
        oid = hashlib.sha1(json.dumps(commit, sort_keys=True).encode() + str(time.time_ns()).encode()).hexdigest()
        commit["id"] = oid
        (path / "commits" / f"{oid}.json").write_text(json.dumps(commit, indent=1))
        return oid

    def _regular_entry(self, data: bytes) -> dict:
        return {"sha256": self.put_object(data), "size": len(data), "lfs": False, "oid": _git_blob_oid(data)}

    def commit(self, repo_type: str, repo_id: str, branch: str, operations: list, header: dict) -> str:
        """Apply NDJSON commit ``operations`` on top of ``branch`` and move the branch; return the new commit oid."""
        with self.lock:
            path = self.require_repo(repo_type, repo_id)
            refs = self.refs(repo_type, repo_id)
            if branch not in refs["branches"]:
                raise HubError(404, f"Invalid rev id: {branch} is not a branch", "RevisionNotFound")
            head = refs["branches"][branch]
            parent_commit = header.get("parentCommit")
            if parent_commit and not head.startswith(parent_commit):
                raise HubError(412, f"A commit has happened since {parent_commit}. Please refresh and try again.")
            files = dict(self.commit_info(repo_type, repo_id, head)["files"])
            for key, value in operations:
                check_path_in_repo(value.get("path"), folder=key == "deletedFolder")
                if key == "file":
                    files[value["path"]] = self._regular_entry(base64.b64decode(value["content"]))
                elif key == "lfsFile":
                    sha256 = value["oid"]
                    if not self.object_path(sha256).exists():
                        raise HubError(
                            422, f"LFS pointer {value['path']} points to an object ({sha256}) never uploaded"
                        )
                    size = self.object_path(sha256).stat().st_size
                    pointer_oid = _git_blob_oid(_lfs_pointer(sha256, size))
                    files[value["path"]] = {"sha256": sha256, "size": size, "lfs": True, "oid": pointer_oid}
                elif key == "deletedFile":
                    if files.pop(value["path"], None) is None:
                        raise HubError(404, f"A file with this name doesn't exist: {value['path']}", "EntryNotFound")
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    doomed = [p for p in files if p.startswith(prefix)]
                    if not doomed:
                        raise HubError(404, f"A folder with this name doesn't exist: {value['path']}", "EntryNotFound")
                    for p in doomed:
                        del files[p]
                else:
                    raise HubError(400, f"Unknown commit operation key {key!r}")
            oid = self._write_commit(path, [head], files, header.get("summary", ""), header.get("description", ""))
            refs["branches"][branch] = oid
            self._write_refs(path, refs)
            return oid

    def set_ref(self, repo_type: str, repo_id: str, kind: str, name: str, oid: str | None) -> None:
        """Create (``oid``) or delete (``None``) a branch or tag; 409 if it exists, 404 if it does not."""
        check_ref_name(name)
        with self.lock:
            path = self.require_repo(repo_type, repo_id)
            refs = self.refs(repo_type, repo_id)
            if oid is None:
                if refs[kind].pop(name, None) is None:
                    raise HubError(404, f"{kind[:-1].capitalize()} {name} not found", "RevisionNotFound")
            elif name in refs[kind]:
                raise HubError(409, f"{kind[:-1].capitalize()} {name} already exists")
            else:
                refs[kind][name] = oid
            self._write_refs(path, refs)

    def history(self, repo_type: str, repo_id: str, oid: str) -> list[dict]:
        """Commits reachable from ``oid`` through first parents, newest first."""
        commits = []
        while True:
            commit = self.commit_info(repo_type, repo_id, oid)
            commits.append(commit)
            if not commit["parents"]:
                return commits
            oid = commit["parents"][0]


class HubServer(ThreadingHTTPServer):
    """The HTTP server; ``endpoint`` is its base URL and ``store`` its on-disk repos."""

    daemon_threads = True

    def __init__(self, root: Path, host: str = "127.0.0.1", port: int = 0):
        super().__init__((host, port), _HubRequestHandler)
        self.root = Path(root)
        self.store = HubStore(self.root)
        self.user = USER
        self.endpoint = f"http://{host}:{self.server_address[1]}"
        self.page_size = 1000  # tree / commits entries per page (the Hub uses 1000); lower it to test pagination
        self.requests: list[tuple[str, str, str]] = []
        self.errors: list[Exception] = []  # unexpected exceptions raised while answering (server bugs)
        self.hf_home: Path | None = None
        self._failures: dict[str, list] = {}
        self._delays: dict[str, float] = {}
        self._control = threading.Lock()
        self._thread: threading.Thread | None = None
        self._secret = secrets.token_bytes(16)

    def sign(self, oid: str) -> str:
        """Signature of an LFS upload URL: like an S3 presigned URL, the PUT carries no token."""
        return hmac.new(self._secret, oid.encode(), hashlib.sha256).hexdigest()

    def fail_next(self, n: int, status: int = 500, route: str = "commit") -> None:
        """Answer the next ``n`` requests of ``route`` with HTTP ``status`` (an injected failure)."""
        self._check_route(route)
        with self._control:
            self._failures[route] = [n, status]

    def set_delay(self, seconds: float, route: str = "commit") -> None:
        """Wait ``seconds`` before answering each request of ``route`` (0 to stop)."""
        self._check_route(route)
        with self._control:
            self._delays[route] = seconds

    def count(self, route: str, method: str | None = None) -> int:
        """How many requests of ``route`` (and ``method``) the server received."""
        with self._control:
            return sum(r == route and (method is None or m == method) for m, r, _ in self.requests)

    @property
    def env(self) -> dict:
        """``os.environ`` plus the variables pointing a fresh Python process at this server."""
        env = dict(os.environ)
        env.update(_client_env(self))
        return env

    def _check_route(self, route: str) -> None:
        if route != "*" and route not in ROUTES:
            raise ValueError(f"Unknown route {route!r}; expected '*' or one of {ROUTES}")

    def _on_request(self, method: str, route: str, path: str) -> int | None:
        """Log the request, apply the configured delay, and return an injected failure status if one is pending."""
        with self._control:
            self.requests.append((method, route, path))
            delay = self._delays.get(route, 0) + self._delays.get("*", 0)
            failure = None
            for key in (route, "*"):
                pending = self._failures.get(key)
                if pending and pending[0] > 0:
                    pending[0] -= 1
                    failure = pending[1]
                    break
        if delay:
            time.sleep(delay)
        return failure

    def start(self) -> "HubServer":
        self._thread = threading.Thread(target=self.serve_forever, args=(0.05,), name="hub-server", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "HubServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def start_hub_server(root: str | os.PathLike) -> HubServer:
    """Start a Hub-compatible server on 127.0.0.1 (free port) storing its repos under ``root``; ``close()`` it."""
    return HubServer(Path(root)).start()


class _HubRequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: HubServer

    def log_message(self, format, *args) -> None:  # keep pytest output quiet
        pass

    # plumbing
    def do_GET(self):
        self._handle()

    def do_HEAD(self):
        self._handle()

    def do_POST(self):
        self._handle()

    def do_PUT(self):
        self._handle()

    def do_DELETE(self):
        self._handle()

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self) -> None:
        body = self._read_body()  # always drain the body: the connection is kept alive
        raw_path, _, raw_query = self.path.partition("?")
        self.query = {k: v[-1] for k, v in parse_qs(raw_query).items()}
        self.body = body
        self.base = f"http://{self.headers.get('Host', self.server.endpoint.removeprefix('http://'))}"
        segments = [unquote(s) for s in raw_path.split("/")[1:]]
        try:
            route, handler, args = self._route(self.command, segments)
            status = self.server._on_request(self.command, route, raw_path)
            if status is not None:
                raise HubError(status, f"Injected failure ({status}) on {route}")
            if route in ("create-repo", "delete-repo", "preupload", "commit", "lfs-batch", "branch", "tag"):
                if not self.headers.get("Authorization"):
                    raise HubError(401, "Invalid credentials in Authorization header")
            handler(*args)
        except HubError as e:
            self._send_error(e)
        except (ValueError, KeyError, json.JSONDecodeError) as e:
            self._send_error(HubError(400, f"Bad request: {e!r}"))
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client went away mid-answer (e.g. it stopped reading a download)
        except Exception as e:  # a bug of this server: answer (rather than drop the connection) and remember it
            self.server.errors.append(e)
            self._send_error(HubError(500, f"Local hub server error: {e!r}"))

    def _route(self, method: str, s: list[str]):
        if s[:2] == ["api", "whoami-v2"]:
            return "whoami", self._whoami, ()
        if s[:2] == ["api", "repos"] and len(s) == 3 and method == "POST":
            if s[2] == "create":
                return "create-repo", self._create_repo, ()
            if s[2] == "delete":
                return "delete-repo", self._delete_repo, ()
        if s[:2] == ["api", "validate-yaml"]:
            return "validate-yaml", self._validate_yaml, ()
        if len(s) >= 4 and s[0] == "api" and s[1] in REPO_TYPES:
            repo = (REPO_TYPES[s[1]], f"{s[2]}/{s[3]}")
            action, rest = (s[4], s[5:]) if len(s) > 4 else (None, [])
            routes = {
                (None, "GET"): ("info", self._info, (*repo, "main")),
                ("revision", "GET"): ("info", self._info, (*repo, "/".join(rest))),
                ("preupload", "POST"): ("preupload", self._preupload, (*repo, "/".join(rest))),
                ("commit", "POST"): ("commit", self._commit, (*repo, "/".join(rest))),
                ("paths-info", "POST"): ("paths-info", self._paths_info, (*repo, "/".join(rest))),
                ("tree", "GET"): ("tree", self._tree, (*repo, rest[0] if rest else "main", "/".join(rest[1:]))),
                ("refs", "GET"): ("refs", self._refs, repo),
                ("commits", "GET"): ("commits", self._commits, (*repo, "/".join(rest) or "main")),
                ("branch", "POST"): ("branch", self._create_branch, (*repo, "/".join(rest))),
                ("branch", "DELETE"): ("branch", self._delete_ref, (*repo, "branches", "/".join(rest))),
                ("tag", "POST"): ("tag", self._create_tag, (*repo, "/".join(rest))),
                ("tag", "DELETE"): ("tag", self._delete_ref, (*repo, "tags", "/".join(rest))),
            }
            if (action, method) in routes:
                return routes[(action, method)]
        if (
            method == "POST"
            and len(s) >= 6
            and s[-4:] == ["info", "lfs", "objects", "batch"]
            and s[-5].endswith(".git")
        ):
            repo_type = "dataset" if s[0] == "datasets" else "space" if s[0] == "spaces" else "model"
            parts = s[1:-4] if repo_type != "model" else s[:-4]
            return "lfs-batch", self._lfs_batch, (repo_type, "/".join(parts).removesuffix(".git"))
        if s[:1] == ["lfs-objects"] and len(s) == 2 and method == "PUT":
            return "lfs-upload", self._lfs_upload, (s[1],)
        if s[:1] == ["lfs-verify"] and len(s) == 2 and method == "POST":
            return "lfs-verify", self._lfs_verify, (s[1],)
        if method in ("GET", "HEAD"):
            repo_type = "dataset" if s[0] == "datasets" else "space" if s[0] == "spaces" else "model"
            parts = s[1:] if repo_type != "model" else s
            if len(parts) >= 5 and parts[2] == "resolve":
                return "resolve", self._resolve, (repo_type, f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
        return "unknown", self._unknown, ()

    def _unknown(self) -> None:
        raise HubError(404, f"This local hub server does not implement {self.command} {self.path}")

    def _json_body(self) -> dict:
        return json.loads(self.body or b"{}")

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, payload, status: int = 200, headers: dict | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), headers)

    def _send_error(self, error: HubError) -> None:
        headers = dict(error.headers)
        headers["X-Error-Message"] = error.message
        if error.error_code:
            headers["X-Error-Code"] = error.error_code
        self._send_json({"error": error.message}, error.status, headers)

    def _repo_url(self, repo_type: str, repo_id: str) -> str:
        return f"{self.base}/{URL_PREFIXES[repo_type]}{repo_id}"

    # account and repos
    def _whoami(self) -> None:
        if not self.headers.get("Authorization"):
            raise HubError(401, "Invalid credentials in Authorization header")
        token = {"displayName": "local-test", "role": "write", "fineGrained": None}
        self._send_json(
            {
                "type": "user",
                "id": "0" * 24,
                "name": USER,
                "fullname": "Local Test User",
                "email": f"{USER}@localhost",
                "emailVerified": True,
                "isPro": False,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": token},
            }
        )

    def _create_repo(self) -> None:
        payload = self._json_body()
        repo_type, repo_id = self._payload_repo(payload)
        private = payload.get("visibility", "public") != "public" or bool(payload.get("private"))
        url = self._repo_url(repo_type, repo_id)
        if not self.server.store.create_repo(repo_type, repo_id, private):
            # The Hub answers 409 with the repo URL, which `create_repo(exist_ok=True)` reads.
            message = f"You already created this {repo_type} repo"
            self._send_json({"error": message, "url": url}, 409, {"X-Error-Message": message})
            return
        self._send_json({"url": url, "name": repo_id, "id": hashlib.sha1(url.encode()).hexdigest()[:24]})

    def _delete_repo(self) -> None:
        self.server.store.delete_repo(*self._payload_repo(self._json_body()))
        self._send_json({})

    @staticmethod
    def _payload_repo(payload: dict) -> tuple[str, str]:
        """``(repo_type, repo_id)`` of a create / delete request body (``type``, ``organization``, ``name``)."""
        repo_type = check_repo_type(payload.get("type") or "model")
        namespace = check_repo_name(payload.get("organization") or USER, "namespace")
        return repo_type, f"{namespace}/{check_repo_name(payload.get('name'))}"

    def _validate_yaml(self) -> None:
        import yaml

        content = self._json_body().get("content", "")
        match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.DOTALL)
        try:
            metadata = yaml.safe_load(match.group(1)) if match else {}
        except yaml.YAMLError as e:
            self._send_json({"errors": [{"message": f"Invalid YAML: {e}"}], "warnings": []}, 400)
            return
        if metadata is not None and not isinstance(metadata, dict):
            self._send_json({"errors": [{"message": "YAML metadata must be a mapping"}], "warnings": []}, 400)
            return
        self._send_json({"errors": [], "warnings": []})

    def _info(self, repo_type: str, repo_id: str, revision: str) -> None:
        store = self.server.store
        commit = store.resolve(repo_type, repo_id, revision)
        meta = store.meta(repo_type, repo_id)
        with_blobs = self.query.get("blobs", "").lower() in ("1", "true")
        siblings = []
        for path, entry in sorted(commit["files"].items()):
            sibling = {"rfilename": path}
            if with_blobs:
                sibling.update(size=entry["size"], blobId=entry["oid"])
                if entry["lfs"]:
                    pointer_size = len(_lfs_pointer(entry["sha256"], entry["size"]))
                    sibling["lfs"] = {"size": entry["size"], "sha256": entry["sha256"], "pointerSize": pointer_size}
            siblings.append(sibling)
        self._send_json(
            {
                "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
                "id": repo_id,
                "author": repo_id.split("/")[0],
                "sha": commit["id"],
                "lastModified": commit["date"],
                "createdAt": meta["createdAt"],
                "private": meta["private"],
                "gated": False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "siblings": siblings,
            }
        )

    # uploads
    def _preupload(self, repo_type: str, repo_id: str, revision: str) -> None:
        store = self.server.store
        files = store.resolve(repo_type, repo_id, revision)["files"]
        payload = self._json_body()
        ignore = [line.strip() for line in payload.get("gitIgnore", "").splitlines()]
        ignore = [line for line in ignore if line and not line.startswith("#")]
        answers = []
        for item in payload["files"]:
            path, size = check_path_in_repo(item["path"]), item["size"]
            name = path.rsplit("/", 1)[-1]
            lfs = size > LFS_SIZE_THRESHOLD or any(fnmatch.fnmatch(name, p) for p in LFS_PATTERNS)
            remote = files.get(path)
            oid = None
            if remote is not None:  # the client skips files whose local oid (sha256 if LFS, else git oid) matches
                if lfs:
                    oid = remote["sha256"]
                else:
                    oid = (
                        remote["oid"]
                        if not remote["lfs"]
                        else _git_blob_oid(store.object_path(remote["sha256"]).read_bytes())
                    )
            should_ignore = any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(name, p) for p in ignore)
            answers.append(
                {"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": should_ignore, "oid": oid}
            )
        self._send_json({"files": answers, "commitOid": store.resolve(repo_type, repo_id, revision)["id"]})

    def _lfs_batch(self, repo_type: str, repo_id: str) -> None:
        store = self.server.store
        store.require_repo(repo_type, repo_id)
        payload = self._json_body()
        if payload.get("operation") != "upload":
            raise HubError(400, "Only the 'upload' LFS operation is supported by this server")
        objects = []
        for obj in payload["objects"]:
            oid, size = obj["oid"], obj["size"]
            answer = {"oid": oid, "size": size, "authenticated": True}
            path = store.object_path(oid)
            if not (path.exists() and path.stat().st_size == size):
                query = urlencode({"size": size, "signature": self.server.sign(oid)})  # a "presigned" URL
                answer["actions"] = {
                    "upload": {"href": f"{self.base}/lfs-objects/{oid}?{query}", "header": {}},
                    "verify": {"href": f"{self.base}/lfs-verify/{oid}", "header": {}},
                }
            objects.append(answer)
        self._send(
            200,
            json.dumps({"transfer": "basic", "objects": objects}).encode(),
            content_type="application/vnd.git-lfs+json",
        )

    def _lfs_upload(self, oid: str) -> None:
        if not hmac.compare_digest(self.query.get("signature", ""), self.server.sign(oid)):
            raise HubError(403, f"Invalid or missing signature for the upload of {oid}")
        if hashlib.sha256(self.body).hexdigest() != oid:
            raise HubError(400, f"Uploaded content does not match its sha256 oid {oid}")
        if "size" in self.query and int(self.query["size"]) != len(self.body):
            raise HubError(400, f"Uploaded {len(self.body)} bytes for {oid}, expected {self.query['size']}")
        self.server.store.put_object(self.body)
        self._send(200, b"", {"ETag": f'"{oid}"'})

    def _lfs_verify(self, oid: str) -> None:
        payload = self._json_body()
        path = self.server.store.object_path(oid)
        if not path.exists() or path.stat().st_size != payload.get("size"):
            raise HubError(404, f"LFS object {oid} not found or of the wrong size")
        self._send_json({"success": True})

    def _commit(self, repo_type: str, repo_id: str, revision: str) -> None:
        if self.query.get("create_pr") == "1":
            raise HubError(400, "create_pr is not supported by this local test server")
        lines = [json.loads(line) for line in self.body.decode().splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The commit payload must start with a 'header' line")
        operations = [(line["key"], line["value"]) for line in lines[1:]]
        oid = self.server.store.commit(repo_type, repo_id, revision, operations, lines[0]["value"])
        url = f"{self._repo_url(repo_type, repo_id)}/commit/{oid}"
        self._send_json({"success": True, "commitOid": oid, "commitUrl": url, "pullRequestUrl": None, "hookOutput": ""})

    # listing
    def _entries(self, files: dict) -> dict:
        """``path -> tree entry`` for every file and (implied) folder of a commit manifest."""
        entries = {}
        folders: dict[str, list] = {}
        for path, entry in files.items():
            item = {"type": "file", "oid": entry["oid"], "size": entry["size"], "path": path}
            if entry["lfs"]:
                pointer_size = len(_lfs_pointer(entry["sha256"], entry["size"]))
                item["lfs"] = {"oid": entry["sha256"], "size": entry["size"], "pointerSize": pointer_size}
            entries[path] = item
            parts = path.split("/")
            for i in range(1, len(parts)):
                folders.setdefault("/".join(parts[:i]), []).append(entry["oid"])
        for folder, oids in folders.items():
            oid = hashlib.sha1("".join(sorted(oids)).encode()).hexdigest()
            entries[folder] = {"type": "directory", "oid": oid, "size": 0, "path": folder}
        return entries

    def _last_commits(self, repo_type: str, repo_id: str, commit: dict, paths: list[str]) -> dict:
        """``path -> lastCommit`` (the newest commit that changed it) for ``expand=true`` listings."""

        def signature(files: dict, path: str) -> list:
            return sorted((p, e["oid"]) for p, e in files.items() if p == path or p.startswith(path + "/"))

        history = self.server.store.history(repo_type, repo_id, commit["id"])
        result = {}
        for path in paths:
            for newer, older in zip(history, history[1:] + [{"files": {}}], strict=True):
                if signature(newer["files"], path) != signature(older["files"], path):
                    result[path] = {"id": newer["id"], "title": newer["title"], "date": newer["date"]}
                    break
        return result

    def _paginate(self, items: list, url: str) -> None:
        """Send one page of ``items``, with a ``Link: <...>; rel="next"`` header when more remain."""
        start = int(self.query.get("cursor", 0))
        limit = min(int(self.query.get("limit", self.server.page_size)), self.server.page_size)
        page = items[start : start + limit]
        headers = {}
        if start + limit < len(items):
            query = {k: v for k, v in self.query.items() if k != "cursor"}
            query["cursor"] = start + limit
            headers["Link"] = f'<{url}?{urlencode(query)}>; rel="next"'
        self._send_json(page, headers=headers)

    def _tree(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        commit = self.server.store.resolve(repo_type, repo_id, revision)
        entries = self._entries(commit["files"])
        path = path.strip("/")
        if path and entries.get(path, {}).get("type") != "directory":
            raise HubError(404, f"Folder {path} not found at {revision}", "EntryNotFound")
        recursive = self.query.get("recursive", "").lower() in ("1", "true")
        prefix = f"{path}/" if path else ""
        items = [
            entry
            for p, entry in sorted(entries.items())
            if p.startswith(prefix) and (recursive or "/" not in p[len(prefix) :])
        ]
        if self.query.get("expand", "").lower() in ("1", "true"):
            last = self._last_commits(repo_type, repo_id, commit, [item["path"] for item in items])
            items = [{**item, "lastCommit": last.get(item["path"])} for item in items]
        url = f"{self.base}/api/{repo_type}s/{repo_id}/tree/{quote(revision, safe='')}"
        self._paginate(items, url + (f"/{quote(path, safe='')}" if path else ""))

    def _paths_info(self, repo_type: str, repo_id: str, revision: str) -> None:
        commit = self.server.store.resolve(repo_type, repo_id, revision)
        entries = self._entries(commit["files"])
        if self.headers.get("Content-Type", "").startswith("application/json"):
            form = self._json_body()
            paths, expand = form.get("paths", []), bool(form.get("expand"))
        else:
            form = parse_qs(self.body.decode())
            paths, expand = form.get("paths", []), form.get("expand", ["false"])[-1].lower() == "true"
        items = [entries[p.strip("/")] for p in paths if p.strip("/") in entries]
        if expand:
            last = self._last_commits(repo_type, repo_id, commit, [item["path"] for item in items])
            items = [{**item, "lastCommit": last.get(item["path"])} for item in items]
        self._send_json(items)

    def _refs(self, repo_type: str, repo_id: str) -> None:
        refs = self.server.store.refs(repo_type, repo_id)

        def listing(kind: str, prefix: str) -> list:
            return [
                {"name": name, "ref": f"{prefix}{name}", "targetCommit": oid}
                for name, oid in sorted(refs[kind].items())
            ]

        payload = {
            "branches": listing("branches", "refs/heads/"),
            "converts": [],
            "tags": listing("tags", "refs/tags/"),
        }
        if self.query.get("include_prs"):
            payload["pullRequests"] = []
        self._send_json(payload)

    def _commits(self, repo_type: str, repo_id: str, revision: str) -> None:
        store = self.server.store
        commit = store.resolve(repo_type, repo_id, revision)
        items = [
            {
                "id": c["id"],
                "title": c["title"],
                "message": c["message"],
                "date": c["date"],
                "authors": [{"user": author} for author in c["authors"]],
            }
            for c in store.history(repo_type, repo_id, commit["id"])
        ]
        self._paginate(items, f"{self.base}/api/{repo_type}s/{repo_id}/commits/{quote(revision, safe='')}")

    # refs
    def _create_branch(self, repo_type: str, repo_id: str, branch: str) -> None:
        store = self.server.store
        payload = self._json_body()
        oid = store.resolve(repo_type, repo_id, payload.get("startingPoint") or "main")["id"]
        store.set_ref(repo_type, repo_id, "branches", branch, oid)
        self._send_json({})

    def _create_tag(self, repo_type: str, repo_id: str, revision: str) -> None:
        store = self.server.store
        oid = store.resolve(repo_type, repo_id, revision)["id"]
        store.set_ref(repo_type, repo_id, "tags", self._json_body()["tag"], oid)
        self._send_json({})

    def _delete_ref(self, repo_type: str, repo_id: str, kind: str, name: str) -> None:
        self.server.store.set_ref(repo_type, repo_id, kind, name, None)
        self._send_json({})

    # downloads
    def _resolve(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        store = self.server.store
        commit = store.resolve(repo_type, repo_id, revision)
        entry = commit["files"].get(path)
        if entry is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit["id"]})
        headers = {"X-Repo-Commit": commit["id"], "ETag": f'"{entry["oid"]}"', "Accept-Ranges": "bytes"}
        if entry["lfs"]:
            headers.update({"X-Linked-Etag": f'"{entry["sha256"]}"', "X-Linked-Size": str(entry["size"])})
        data_path = store.object_path(entry["sha256"])
        size = entry["size"]
        start, end, status = 0, size - 1, 200
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "").strip())
        if match and (match.group(1) or match.group(2)):
            if match.group(1):
                start = int(match.group(1))
                end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
            else:
                start = max(size - int(match.group(2)), 0)
            if start >= size or start > end:
                raise HubError(
                    416,
                    f"Range not satisfiable for {path} ({size} bytes)",
                    headers={"Content-Range": f"bytes */{size}"},
                )
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        length = end - start + 1
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command == "HEAD":
            return
        with open(data_path, "rb") as f:
            f.seek(start)
            remaining = length
            while remaining > 0:
                chunk = f.read(min(remaining, 1 << 20))
                self.wfile.write(chunk)
                remaining -= len(chunk)


def _client_env(server: HubServer) -> dict:
    hf_home = server.hf_home or server.root / "hf_home"
    return {
        "HF_ENDPOINT": server.endpoint,
        "HF_TOKEN": DUMMY_TOKEN,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_OFFLINE": "0",
        "HF_DATASETS_OFFLINE": "0",
        "TRANSFORMERS_OFFLINE": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(hf_home / "hub"),
        "HF_DATASETS_CACHE": str(hf_home / "datasets"),
        "HF_XET_CACHE": str(hf_home / "xet"),
    }


def point_clients_at(server: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point this process's ``huggingface_hub`` (and ``transformers``/``datasets`` if imported) at ``server``.

    Sets the environment and the values these libraries read from it once at import time; ``monkeypatch`` undoes it.
    """
    import huggingface_hub.constants as constants
    import huggingface_hub.hf_api as hf_api

    # Import the libraries that cache these values now, so that the patches below cover them and are undone after
    # the test (a first import during the test would keep the test's endpoint for the rest of the session).
    for module in ("transformers.utils.hub", "datasets.config"):
        if importlib.util.find_spec(module.split(".")[0]) is not None:
            importlib.import_module(module)

    env = _client_env(server)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    hf_home = env["HF_HOME"]
    for name, value in {
        "ENDPOINT": server.endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": server.endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_DISABLE_XET": True,
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HOME": hf_home,
        "HF_HUB_CACHE": env["HF_HUB_CACHE"],
        "HUGGINGFACE_HUB_CACHE": env["HF_HUB_CACHE"],
        "HF_ASSETS_CACHE": os.path.join(hf_home, "assets"),
        "HF_XET_CACHE": env["HF_XET_CACHE"],
        "HF_TOKEN_PATH": os.path.join(hf_home, "token"),
        "HF_STORED_TOKENS_PATH": os.path.join(hf_home, "stored_tokens"),
    }.items():
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, value)
    monkeypatch.setattr(hf_api.api, "endpoint", server.endpoint)  # behind huggingface_hub.create_repo & co
    if "transformers.utils.hub" in sys.modules:  # transformers' shared HfApi, created lazily from constants
        monkeypatch.setattr(sys.modules["transformers.utils.hub"], "_hf_api", None)
    if "datasets.config" in sys.modules:  # datasets reads HF_ENDPOINT & co once, at import
        config = sys.modules["datasets.config"]
        monkeypatch.setattr(config, "HF_ENDPOINT", server.endpoint)
        monkeypatch.setattr(
            config, "HUB_DATASETS_URL", server.endpoint + "/datasets/{repo_id}/resolve/{revision}/{path}"
        )
        monkeypatch.setattr(config, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(config, "HF_DATASETS_OFFLINE", False)
        monkeypatch.setattr(config, "HF_DATASETS_CACHE", Path(env["HF_DATASETS_CACHE"]))


@pytest.fixture(name="hub_server")
def hub_server_fixture(tmp_path, monkeypatch):
    """A running local Hub (see the module docstring) that this process's clients talk to; closed after the test."""
    server = start_hub_server(tmp_path / "hub")
    server.hf_home = tmp_path / "hf_home"
    point_clients_at(server, monkeypatch)
    try:
        yield server
    finally:
        server.close()
        HfFileSystem.clear_instance_cache()  # fsspec caches file systems, with the endpoint they were made with
    if server.errors:
        pytest.fail(f"The local hub server failed while answering: {server.errors!r}")
