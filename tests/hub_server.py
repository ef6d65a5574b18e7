"""A local Hugging Face Hub for tests: a small HTTP server speaking the Hub's protocol.

This is a test fixture only; nothing in ``seg_accel`` may import it. The real, unmodified
``huggingface_hub``, ``datasets`` and ``transformers`` clients work against it once
``HF_ENDPOINT`` points at it, ``HF_HUB_DISABLE_XET=1`` and a token is set: the
``hub_server`` pytest fixture at the end of this module does all of that.

The server itself uses the standard library only. It holds model and dataset repositories
with a branch ``main`` and the branches created through the API; a revision is a branch
name or the current commit sha of a branch. Files are stored on disk by path under ``<root>/<repo_type>s/<namespace>/<name>/``,
Git LFS objects under ``<root>/lfs/<sha256>``. Endpoints (``{type}s`` is ``models`` or
``datasets``; ``[datasets/]`` prefixes the URLs of dataset repos):

* ``GET  /api/whoami-v2``
* ``POST /api/repos/create``: 409 (with the repo ``url``) when it exists, so ``exist_ok`` works
* ``POST /api/validate-yaml``: called for ``README.md`` uploads; every card is valid
* ``POST /api/{type}s/{repo_id}/branch/{branch}``: a branch from ``main`` (or ``startingPoint``);
  409 when it exists, so ``exist_ok`` works
* ``GET  /api/{type}s/{repo_id}[/revision/{rev}]``: repo info with ``sha`` and ``siblings``
  (``blobs=true`` adds sizes and LFS metadata)
* ``GET  /api/{type}s/{repo_id}/tree/{rev}[/{path}]``: ``recursive`` and ``expand`` options,
  cursor pagination through a ``Link: <...>; rel="next"`` header
* ``POST /api/{type}s/{repo_id}/paths-info/{rev}``: form-encoded ``paths`` and ``expand``
* ``POST /api/{type}s/{repo_id}/preupload/{rev}``: "lfs" for binary files (a NUL byte in
  the sample) and files of 10 MB or more, "regular" otherwise
* ``POST /api/{type}s/{repo_id}/commit/{rev}``: ndjson ``header``, ``file`` (base64),
  ``lfsFile``, ``deletedFile`` and ``deletedFolder`` lines
* ``POST /[datasets/]{repo_id}.git/info/lfs/objects/batch``: Git LFS batch API, "basic"
  transfer, with upload and verify actions pointing back at this server
* ``PUT  /lfs/upload/{oid}/{ticket}``: the signed upload URL of the batch answer (no token:
  the ticket authorizes it); checks the size and the sha256
* ``POST /lfs/verify/{oid}``
* ``GET|HEAD /[datasets/]{repo_id}/resolve/{rev}/{path}``: ``ETag``, ``X-Repo-Commit``,
  ``X-Linked-Etag``/``X-Linked-Size`` for LFS files, ``Accept-Ranges`` and single ``Range``
  requests (206 with ``Content-Range``, 416 past the end)

Writes need an ``Authorization: Bearer <token>`` header (any non-empty token). Errors are JSON
``{"error": ...}`` answers with the ``X-Error-Code`` header (``RepoNotFound``,
``RevisionNotFound``, ``EntryNotFound``) that ``hf_raise_for_status`` turns into
``RepositoryNotFoundError``, ``RevisionNotFoundError`` and ``EntryNotFoundError``.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from urllib.parse import parse_qs, parse_qsl, unquote, urlencode, urlsplit

import pytest

HF_TEST_TOKEN = "hf_test_token_for_local_server"
"""The token the ``hub_server`` fixture puts in ``HF_TOKEN`` (the server accepts any)."""

LFS_SIZE_THRESHOLD = 10_000_000
"""Files of this size or larger are uploaded with Git LFS, like on the Hub."""

_REPO_TYPES = {"models": "model", "datasets": "dataset"}
_URL_PREFIXES = {"model": "", "dataset": "datasets/"}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class HubError(Exception):
    """An error answer: HTTP status, message and the ``X-Error-Code`` the clients map to exceptions."""

    def __init__(self, status: int, message: str, error_code: str | None = None,
                 headers: dict[str, str] | None = None, extra: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code
        self.headers = headers or {}
        self.extra = extra or {}


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob holding ``data``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The Git LFS pointer file that git stores in place of an LFS file."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _utc_now() -> str:
    """The current time in the Hub's date format, e.g. ``2024-05-01T12:00:00.000Z``."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _is_true(value: str | None) -> bool:
    return value is not None and value.lower() in ("1", "true")


def _repo_path(path: str) -> str:
    """A path inside a repo, without leading or trailing slash; empty, ``.`` and ``..`` segments are refused."""
    path = path.strip("/")
    if any(part in ("", ".", "..") for part in path.split("/")):
        raise HubError(400, f"Invalid path in repo: {path!r}")
    return path


@dataclass(frozen=True)
class _Commit:
    """A commit: its id (a random 40-hex sha), its title and its date."""

    oid: str
    title: str
    date: str

    def as_json(self) -> dict:
        """The ``lastCommit`` object of tree and paths-info entries."""
        return {"id": self.oid, "title": self.title, "date": self.date}


@dataclass(frozen=True)
class _File:
    """A file of a repo: size, git blob id, sha256 for an LFS file, and the last commit touching it."""

    size: int
    blob_id: str
    sha256: str | None
    commit: _Commit

    @classmethod
    def regular(cls, data: bytes, commit: _Commit) -> _File:
        return cls(len(data), git_blob_oid(data), None, commit)

    @classmethod
    def lfs(cls, sha256: str, size: int, commit: _Commit) -> _File:
        return cls(size, git_blob_oid(lfs_pointer(sha256, size)), sha256, commit)

    @property
    def etag(self) -> str:
        """What the Hub sends as ETag: the sha256 of an LFS file, the git blob id of another."""
        return self.sha256 or self.blob_id

    @property
    def pointer_size(self) -> int:
        """The size of the Git LFS pointer of an LFS file."""
        assert self.sha256 is not None
        return len(lfs_pointer(self.sha256, self.size))

    def tree_entry(self, path: str, expand: bool) -> dict:
        """The entry of this file in tree and paths-info answers."""
        entry: dict = {"type": "file", "oid": self.blob_id, "size": self.size, "path": path}
        if self.sha256:
            entry["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": self.pointer_size}
        if expand:
            entry["lastCommit"] = self.commit.as_json()
        return entry

    def sibling(self, path: str, blobs: bool) -> dict:
        """The entry of this file in the ``siblings`` of repo info."""
        sibling: dict = {"rfilename": path}
        if blobs:
            sibling.update(size=self.size, blobId=self.blob_id)
            if self.sha256:
                sibling["lfs"] = {"size": self.size, "sha256": self.sha256, "pointerSize": self.pointer_size}
        return sibling


@dataclass
class _Repo:
    """A repo: where its files are on disk, its head commit and its files by path."""

    repo_type: str
    repo_id: str
    folder: Path
    private: bool
    created_at: str
    head: _Commit
    files: dict[str, _File]

    @property
    def url_path(self) -> str:
        """The repo's path in web URLs, e.g. ``datasets/user/name``."""
        return _URL_PREFIXES[self.repo_type] + self.repo_id

    def folder_entry(self, path: str, expand: bool) -> dict:
        """The entry of a folder in tree and paths-info answers (its id changes at every commit)."""
        entry: dict = {"type": "directory", "oid": hashlib.sha1(f"{self.head.oid}:{path}".encode()).hexdigest(),
                       "size": 0, "path": path}
        if expand:
            entry["lastCommit"] = self.head.as_json()
        return entry

    def is_folder(self, path: str) -> bool:
        """Whether ``path`` is a folder: it holds at least one file."""
        return any(file_path.startswith(path + "/") for file_path in self.files)


class HubServer:
    """A local Hugging Face Hub on ``127.0.0.1``, serving from a background thread.

    ``start()`` returns the base URL to use as ``HF_ENDPOINT``; ``stop()`` closes the port and
    cuts open connections (clients then get connection errors, as in a network failure); a
    later ``start()`` serves the same repos again on the same port. ``requests_log`` records
    ``(method, path)`` of every request (the URL path, without the query string).
    """

    tree_page_size = 1000
    """Entries per page of a tree listing (the Hub's page size)."""

    def __init__(self, root: Path, user: str = "tester"):
        self.root = Path(root)
        self.user = user
        self.requests_log: list[tuple[str, str]] = []
        self._lock = threading.RLock()
        self._repos: dict[tuple[str, str], _Repo] = {}  # main
        self._branches: dict[tuple[str, str, str], _Repo] = {}  # other branches: their own files and head
        self._upload_tickets: dict[str, tuple[str, int]] = {}  # LFS oid -> (ticket, size) of its upload URL
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._port = 0
        self._history: dict[tuple[str, str], list[tuple[str, dict[str, bytes]]]] = {}

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> str:
        """Serve in a background thread (on the port of a previous run, if any); return the base URL."""
        if self._httpd is not None:
            raise RuntimeError("the server is already running")
        self._httpd = _HTTPServer(("127.0.0.1", self._port), self)
        self._port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="local-hub-server", daemon=True)
        self._thread.start()
        return self.url

    def stop(self) -> None:
        """Stop serving: close the listening socket and every open connection."""
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.close_connections()
        self._httpd.server_close()
        assert self._thread is not None
        self._thread.join()
        self._httpd = self._thread = None

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:41234``."""
        if not self._port:
            raise RuntimeError("the server has not been started")
        return f"http://127.0.0.1:{self._port}"

    def files(self, repo_id: str, repo_type: str = "model") -> dict[str, bytes]:
        """The files of a repo at its current commit, by path."""
        with self._lock:
            repo = self._repos.get((repo_type, repo_id))
            if repo is None:
                raise KeyError(f"no {repo_type} repo {repo_id!r}")
            return {path: (repo.folder / path).read_bytes() for path in sorted(repo.files)}

    def commit_history(self, repo_id: str, repo_type: str = "model") -> list[tuple[str, dict[str, bytes]]]:
        """Every commit of a repo, oldest first: its title and the files it added or changed."""
        with self._lock:
            return list(self._history.get((repo_type, repo_id), []))

    def log_request(self, method: str, path: str) -> None:
        """Record a request in ``requests_log``."""
        with self._lock:
            self.requests_log.append((method, path))

    # -- repos -------------------------------------------------------------------------------

    def whoami(self) -> dict:
        """The user of every token: ``self.user`` with a write token."""
        return {
            "type": "user", "id": hashlib.sha1(self.user.encode()).hexdigest()[:24], "name": self.user,
            "fullname": self.user, "email": f"{self.user}@localhost", "emailVerified": True,
            "canPay": False, "isPro": False, "orgs": [],
            "auth": {"type": "access_token", "accessToken": {"displayName": "local-test-token", "role": "write"}},
        }

    def create_repo(self, repo_type: str, name: str, namespace: str | None, private: bool) -> str:
        """Create an empty repo (with an initial commit); return its URL."""
        repo_id = f"{namespace or self.user}/{name}"
        if not all(_NAME.fullmatch(part) for part in repo_id.split("/")):
            raise HubError(400, f"Invalid repo name {repo_id!r}")
        with self._lock:
            url = f"{self.url}/{_URL_PREFIXES[repo_type]}{repo_id}"
            if (repo_type, repo_id) in self._repos:
                raise HubError(409, f"You already created this {repo_type} repo", extra={"url": url})
            folder = self.root / f"{repo_type}s" / repo_id
            folder.mkdir(parents=True)
            now = _utc_now()
            self._repos[repo_type, repo_id] = _Repo(repo_type, repo_id, folder, private, now,
                                                    _Commit(secrets.token_hex(20), "initial commit", now), {})
            return url

    def _repo(self, repo_type: str, repo_id: str, revision: str | None = None) -> _Repo:
        """The repo's branch named by ``revision`` (a branch name or a branch's current commit;
        ``main`` when not given)."""
        repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(404, "Repository not found", "RepoNotFound")
        if revision is None or revision in ("main", repo.head.oid):
            return repo
        for (kind, name, branch), view in self._branches.items():
            if (kind, name) == (repo_type, repo_id) and revision in (branch, view.head.oid):
                return view
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def create_branch(self, repo_type: str, repo_id: str, branch: str, starting_point: str | None) -> None:
        """A new branch with the files and head of ``starting_point`` (default ``main``)."""
        with self._lock:
            source = self._repo(repo_type, repo_id, starting_point)
            if branch == "main" or (repo_type, repo_id, branch) in self._branches:
                raise HubError(409, f"Branch {branch} already exists")
            if not _NAME.fullmatch(branch):
                raise HubError(400, f"Invalid branch name {branch!r}")
            folder = source.folder.parent / f"{source.folder.name}@{branch}"
            shutil.copytree(source.folder, folder)
            self._branches[repo_type, repo_id, branch] = _Repo(repo_type, repo_id, folder, source.private,
                                                               source.created_at, source.head, dict(source.files))

    def branch_files(self, repo_id: str, branch: str, repo_type: str = "model") -> dict[str, bytes]:
        """The files of a branch at its current commit, by path."""
        with self._lock:
            repo = self._repo(repo_type, repo_id, branch)
            return {path: (repo.folder / path).read_bytes() for path in sorted(repo.files)}

    def repo_info(self, repo_type: str, repo_id: str, revision: str | None, blobs: bool) -> dict:
        """Repo info; ``blobs`` adds size, blob id and LFS metadata to the siblings."""
        with self._lock:
            repo = self._repo(repo_type, repo_id, revision)
            return {
                "_id": repo.head.oid[:24], "id": repo.repo_id, "author": repo.repo_id.split("/")[0],
                "sha": repo.head.oid, "lastModified": repo.head.date, "createdAt": repo.created_at,
                "private": repo.private, "gated": False, "disabled": False, "downloads": 0, "likes": 0,
                "tags": [], "siblings": [repo.files[path].sibling(path, blobs) for path in sorted(repo.files)],
                "usedStorage": sum(file.size for file in repo.files.values()),
            }

    def tree(self, repo_type: str, repo_id: str, revision: str, path: str | None, recursive: bool,
             expand: bool) -> list[dict]:
        """All the entries of a folder (recursively: of its whole sub-tree, folders included), sorted."""
        with self._lock:
            repo = self._repo(repo_type, repo_id, revision)
            folder = path.strip("/") if path else ""
            if folder and not repo.is_folder(folder):
                raise HubError(404, f"{folder} does not exist or is not a folder", "EntryNotFound")
            prefix = folder + "/" if folder else ""
            entries: dict[str, dict] = {}
            for file_path, file in repo.files.items():
                if not file_path.startswith(prefix):
                    continue
                relative = PurePosixPath(file_path[len(prefix):])
                if recursive:
                    entries[file_path] = file.tree_entry(file_path, expand)
                    for parent in relative.parents[:-1]:
                        entries[prefix + str(parent)] = repo.folder_entry(prefix + str(parent), expand)
                elif len(relative.parts) == 1:
                    entries[file_path] = file.tree_entry(file_path, expand)
                else:
                    entries[prefix + relative.parts[0]] = repo.folder_entry(prefix + relative.parts[0], expand)
            return [entries[entry_path] for entry_path in sorted(entries)]

    def paths_info(self, repo_type: str, repo_id: str, revision: str, paths: list[str], expand: bool) -> list[dict]:
        """The entries of the given paths that exist (files or folders)."""
        with self._lock:
            repo = self._repo(repo_type, repo_id, revision)
            entries = []
            for path in (path.strip("/") for path in paths):
                if path in repo.files:
                    entries.append(repo.files[path].tree_entry(path, expand))
                elif repo.is_folder(path):
                    entries.append(repo.folder_entry(path, expand))
            return entries

    def lookup_file(self, repo_type: str, repo_id: str, revision: str, path: str) -> tuple[str, _File, Path]:
        """``(commit sha, file, path on disk)`` of a file, for the resolve endpoint."""
        with self._lock:
            repo = self._repo(repo_type, repo_id, revision)
            file = repo.files.get(path)
            if file is None:
                raise HubError(404, f"Entry not found: {path}", "EntryNotFound",
                               headers={"X-Repo-Commit": repo.head.oid})
            return repo.head.oid, file, repo.folder / path

    # -- uploads -----------------------------------------------------------------------------

    def preupload(self, repo_type: str, repo_id: str, revision: str, files: list[dict]) -> dict:
        """Upload mode of each file, and the id of the file already at that path (to skip no-ops)."""
        with self._lock:
            repo = self._repo(repo_type, repo_id, revision)
            answers = []
            for file in files:
                binary = b"\0" in base64.b64decode(file.get("sample", ""))
                mode = "lfs" if binary or file["size"] >= LFS_SIZE_THRESHOLD else "regular"
                remote = repo.files.get(file["path"])
                answers.append({"path": file["path"], "uploadMode": mode, "shouldIgnore": False,
                                "oid": remote.etag if remote else None})
            return {"files": answers, "commitOid": repo.head.oid}

    def lfs_batch(self, repo_type: str, repo_id: str, request: dict) -> dict:
        """Answer a Git LFS batch upload request: an upload URL for each object not stored yet."""
        if request.get("operation") != "upload":
            raise HubError(400, "Only the 'upload' operation of the LFS batch API is supported")
        with self._lock:
            self._repo(repo_type, repo_id)
            objects = []
            for item in request.get("objects", []):
                oid, size = item["oid"], item["size"]
                if not _SHA256.fullmatch(oid):
                    raise HubError(422, f"Invalid LFS object id {oid!r}")
                answer: dict = {"oid": oid, "size": size, "authenticated": True}
                if not self._lfs_path(oid).is_file():
                    ticket = secrets.token_hex(16)
                    self._upload_tickets[oid] = (ticket, size)
                    answer["actions"] = {"upload": {"href": f"{self.url}/lfs/upload/{oid}/{ticket}"},
                                         "verify": {"href": f"{self.url}/lfs/verify/{oid}"}}
                objects.append(answer)
            return {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}

    def store_lfs_object(self, oid: str, ticket: str, chunks: Iterable[bytes]) -> None:
        """Store an uploaded LFS object, checking the upload ticket, its size and its sha256."""
        with self._lock:
            expected = self._upload_tickets.get(oid)
        if expected is None or expected[0] != ticket:
            raise HubError(403, "Invalid or expired upload URL")
        staging = self._lfs_path(oid).with_name(f"{oid}.{secrets.token_hex(4)}.incomplete")
        staging.parent.mkdir(parents=True, exist_ok=True)
        digest, size = hashlib.sha256(), 0
        try:
            with staging.open("wb") as out:
                for chunk in chunks:
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
            if size != expected[1] or digest.hexdigest() != oid:
                raise HubError(400, f"Uploaded content does not match the LFS object {oid} of size {expected[1]}")
            staging.replace(self._lfs_path(oid))
        finally:
            staging.unlink(missing_ok=True)
        with self._lock:
            self._upload_tickets.pop(oid, None)

    def verify_lfs_object(self, oid: str, size: int) -> None:
        """The verify action of an LFS upload: the object must be stored, with that size."""
        path = self._lfs_path(oid)
        if not path.is_file() or path.stat().st_size != size:
            raise HubError(404, f"LFS object {oid} of size {size} has not been uploaded")

    def _lfs_path(self, oid: str) -> Path:
        """Where the LFS object of sha256 ``oid`` is (or will be) stored."""
        return self.root / "lfs" / oid

    def commit(self, repo_type: str, repo_id: str, revision: str, lines: list[dict]) -> dict:
        """Apply the operations of an ndjson commit payload as one new commit."""
        with self._lock:
            repo = self._repo(repo_type, repo_id, revision)
            header = next((line["value"] for line in lines if line["key"] == "header"), None)
            if header is None:
                raise HubError(400, "The commit payload has no header line")
            if header.get("parentCommit") not in (None, repo.head.oid):
                raise HubError(412, "The parent commit is not the head of the branch")
            commit = _Commit(secrets.token_hex(20), header["summary"], _utc_now())
            files = dict(repo.files)
            writes: dict[str, bytes | Path | None] = {}  # content, LFS object to copy, or None to delete
            for line in lines:
                key, value = line["key"], line["value"]
                if key == "header":
                    continue
                path = _repo_path(value["path"])
                if key == "file":
                    data = base64.b64decode(value["content"])
                    files[path], writes[path] = _File.regular(data, commit), data
                elif key == "lfsFile":
                    oid = value["oid"]
                    lfs_object = self._lfs_path(oid)
                    if not _SHA256.fullmatch(oid) or not lfs_object.is_file():
                        raise HubError(400, f"LFS object {oid!r} of {path} has not been uploaded")
                    files[path] = _File.lfs(oid, lfs_object.stat().st_size, commit)
                    writes[path] = lfs_object
                elif key == "deletedFile":
                    if path not in files:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                    del files[path]
                    writes[path] = None
                elif key == "deletedFolder":
                    deleted = [file_path for file_path in files if file_path.startswith(path + "/")]
                    if not deleted:
                        raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                    for deleted_path in deleted:
                        del files[deleted_path]
                        writes[deleted_path] = None
                else:
                    raise HubError(400, f"Unsupported commit operation {key!r}")
            for path, content in writes.items():
                _write_file(repo.folder, path, content)
            repo.files, repo.head = files, commit
            changed = {path: content if isinstance(content, bytes) else content.read_bytes()
                       for path, content in writes.items() if content is not None}
            self._history.setdefault((repo_type, repo_id), []).append((commit.title, changed))
            return {"success": True, "commitOid": commit.oid, "hookOutput": "", "pullRequestUrl": None,
                    "commitUrl": f"{self.url}/{repo.url_path}/commit/{commit.oid}"}


def _write_file(folder: Path, path: str, content: bytes | Path | None) -> None:
    """Write (atomically), copy from an LFS object, or delete (with emptied folders) a file of a repo."""
    target = folder / path
    if content is None:
        target.unlink(missing_ok=True)  # missing if added and deleted in the same commit
        for parent in target.parents:
            if parent == folder or not parent.is_dir() or any(parent.iterdir()):
                break
            parent.rmdir()
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.{secrets.token_hex(4)}.incomplete")
    if isinstance(content, Path):
        shutil.copyfile(content, staging)
    else:
        staging.write_bytes(content)
    os.replace(staging, target)


class _HTTPServer(ThreadingHTTPServer):
    """A threading HTTP server that keeps track of its connections, so that they can be cut."""

    def __init__(self, address: tuple[str, int], hub: HubServer):
        self.hub = hub
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request, client_address):
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Shut down every open connection (idle keep-alive ones included)."""
        with self._connections_lock:
            for connection in self._connections:
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


_REPO_ID = r"(?P<repo_id>[^/]+/[^/]+)"
_API_REPO = r"/api/(?P<plural>models|datasets)/" + _REPO_ID
_WEB_REPO = r"/(?:(?P<plural>datasets)/)?" + _REPO_ID
_ROUTES = [(method, re.compile(pattern), name) for method, pattern, name in [
    (("GET",), r"/api/whoami-v2", "whoami"),
    (("POST",), r"/api/repos/create", "create_repo"),
    (("POST",), r"/api/validate-yaml", "validate_yaml"),
    (("GET",), _API_REPO + r"(?:/revision/(?P<revision>[^/]+))?", "repo_info"),
    (("GET",), _API_REPO + r"/tree/(?P<revision>[^/]+)(?:/(?P<path>.+))?", "tree"),
    (("POST",), _API_REPO + r"/paths-info/(?P<revision>[^/]+)", "paths_info"),
    (("POST",), _API_REPO + r"/preupload/(?P<revision>[^/]+)", "preupload"),
    (("POST",), _API_REPO + r"/commit/(?P<revision>[^/]+)", "commit"),
    (("POST",), _API_REPO + r"/branch/(?P<branch>[^/]+)", "create_branch"),
    (("POST",), _WEB_REPO + r"\.git/info/lfs/objects/batch", "lfs_batch"),
    (("PUT",), r"/lfs/upload/(?P<oid>[0-9a-f]{64})/(?P<ticket>[0-9a-f]+)", "lfs_upload"),
    (("POST",), r"/lfs/verify/(?P<oid>[0-9a-f]{64})", "lfs_verify"),
    (("GET", "HEAD"), _WEB_REPO + r"/resolve/(?P<revision>[^/]+)/(?P<path>.+)", "resolve"),
]]


class _Handler(BaseHTTPRequestHandler):
    """Parses requests, routes them to the ``HubServer`` and writes the answers (HTTP/1.1, keep-alive)."""

    protocol_version = "HTTP/1.1"
    server: _HTTPServer

    def log_message(self, format, *args) -> None:
        """Silence the default stderr log: requests are recorded in ``HubServer.requests_log``."""

    def _dispatch(self) -> None:
        """Route the request; answer HubErrors, and malformed requests with a 400."""
        url = urlsplit(self.path)
        self.hub = self.server.hub
        self.query = parse_qs(url.query)
        self.body_pending = "Transfer-Encoding" in self.headers or self.headers.get("Content-Length", "0") != "0"
        self.hub.log_request(self.command, url.path)
        try:
            for methods, pattern, name in _ROUTES:
                match = pattern.fullmatch(url.path) if self.command in methods else None
                if match:
                    params = {key: unquote(value) for key, value in match.groupdict().items() if value is not None}
                    if "plural" in match.groupdict():
                        params["repo_type"] = _REPO_TYPES[params.pop("plural", "models")]
                    getattr(self, "_" + name)(**params)
                    return
            raise HubError(404, f"No route for {self.command} {url.path}")
        except (KeyError, TypeError, ValueError) as error:  # missing fields, bad JSON, bad numbers...
            self._send_error(HubError(400, f"Malformed request: {error!r}"))
        except HubError as error:
            self._send_error(error)

    do_GET = do_HEAD = do_POST = do_PUT = _dispatch

    def _send_error(self, error: HubError) -> None:
        message = error.message.encode("ascii", "replace").decode()  # header values must be Latin-1
        headers = {"X-Error-Message": message, **error.headers}
        if error.error_code:
            headers["X-Error-Code"] = error.error_code
        self._send_json({"error": error.message, **error.extra}, error.status, headers)

    # -- request and answer helpers ----------------------------------------------------------

    def _body_chunks(self, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """The request body (the clients always send a Content-Length)."""
        if "Transfer-Encoding" in self.headers:
            raise HubError(411, "Send the body with a Content-Length")
        remaining = int(self.headers.get("Content-Length", 0))
        while remaining:
            chunk = self.rfile.read(min(chunk_size, remaining))
            if not chunk:
                raise HubError(400, "Truncated request body")
            remaining -= len(chunk)
            yield chunk
        self.body_pending = False

    def _json_body(self) -> dict:
        return json.loads(b"".join(self._body_chunks()) or b"{}")

    def _query_flag(self, name: str) -> bool:
        return _is_true(self.query.get(name, [None])[0])

    def _require_token(self) -> None:
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise HubError(401, "Invalid credentials in Authorization header")

    def _send_headers(self, status: int, content_type: str, length: int, headers: dict[str, str]) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(length))
        for name, value in headers.items():
            self.send_header(name, value)
        if self.body_pending:  # an unread request body would be taken for the next request
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()

    def _send_json(self, data, status: int = 200, headers: dict[str, str] | None = None,
                   content_type: str = "application/json; charset=utf-8") -> None:
        body = json.dumps(data).encode()
        self._send_headers(status, content_type, len(body), headers or {})
        if self.command != "HEAD":
            self.wfile.write(body)

    # -- routes ------------------------------------------------------------------------------

    def _whoami(self) -> None:
        self._require_token()
        self._send_json(self.hub.whoami())

    def _create_repo(self) -> None:
        self._require_token()
        payload = self._json_body()
        repo_type = payload.get("type") or "model"
        if repo_type not in _URL_PREFIXES:
            raise HubError(400, f"Unsupported repo type {repo_type!r}")
        private = payload.get("visibility", "public") == "private" or bool(payload.get("private"))
        url = self.hub.create_repo(repo_type, payload["name"], payload.get("organization"), private)
        self._send_json({"url": url})

    def _create_branch(self, repo_type: str, repo_id: str, branch: str) -> None:
        self._require_token()
        payload = self._json_body() if self.body_pending else {}
        self.hub.create_branch(repo_type, repo_id, branch, payload.get("startingPoint"))
        self._send_json({})

    def _validate_yaml(self) -> None:
        self._json_body()
        self._send_json({"errors": [], "warnings": []})

    def _repo_info(self, repo_type: str, repo_id: str, revision: str | None = None) -> None:
        self._send_json(self.hub.repo_info(repo_type, repo_id, revision, self._query_flag("blobs")))

    def _tree(self, repo_type: str, repo_id: str, revision: str, path: str | None = None) -> None:
        entries = self.hub.tree(repo_type, repo_id, revision, path, self._query_flag("recursive"),
                                self._query_flag("expand"))
        start = int(self.query.get("cursor", ["0"])[0])
        end = start + self.hub.tree_page_size
        headers = {}
        if end < len(entries):
            url = urlsplit(self.path)
            query = [(key, value) for key, value in parse_qsl(url.query) if key != "cursor"] + [("cursor", str(end))]
            headers["Link"] = f'<{self.hub.url}{url.path}?{urlencode(query)}>; rel="next"'
        self._send_json(entries[start:end], headers=headers)

    def _paths_info(self, repo_type: str, repo_id: str, revision: str) -> None:
        form = parse_qs(b"".join(self._body_chunks()).decode())
        self._send_json(self.hub.paths_info(repo_type, repo_id, revision, form.get("paths", []),
                                            _is_true(form.get("expand", [None])[0])))

    def _preupload(self, repo_type: str, repo_id: str, revision: str) -> None:
        self._require_token()
        self._send_json(self.hub.preupload(repo_type, repo_id, revision, self._json_body().get("files", [])))

    def _commit(self, repo_type: str, repo_id: str, revision: str) -> None:
        self._require_token()
        if self._query_flag("create_pr"):
            raise HubError(400, "Pull requests are not supported by the local Hub")
        lines = [json.loads(line) for line in b"".join(self._body_chunks()).splitlines() if line.strip()]
        self._send_json(self.hub.commit(repo_type, repo_id, revision, lines))

    def _lfs_batch(self, repo_type: str, repo_id: str) -> None:
        self._require_token()
        self._send_json(self.hub.lfs_batch(repo_type, repo_id, self._json_body()),
                        content_type="application/vnd.git-lfs+json")

    def _lfs_upload(self, oid: str, ticket: str) -> None:
        self.hub.store_lfs_object(oid, ticket, self._body_chunks())
        self._send_json({})

    def _lfs_verify(self, oid: str) -> None:
        self._require_token()
        self.hub.verify_lfs_object(oid, int(self._json_body().get("size", -1)))
        self._send_json({})

    def _resolve(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        commit, file, disk_path = self.hub.lookup_file(repo_type, repo_id, revision, path)
        headers = {"ETag": f'"{file.etag}"', "X-Repo-Commit": commit, "Accept-Ranges": "bytes"}
        if file.sha256:
            headers.update({"X-Linked-Etag": f'"{file.sha256}"', "X-Linked-Size": str(file.size)})
        status, first, last = 200, 0, file.size - 1
        if "Range" in self.headers:
            byte_range = _byte_range(self.headers["Range"], file.size)
            if byte_range is None:
                raise HubError(416, "Requested range not satisfiable",
                               headers={"Content-Range": f"bytes */{file.size}"})
            status, (first, last) = 206, byte_range
            headers["Content-Range"] = f"bytes {first}-{last}/{file.size}"
        self._send_headers(status, "application/octet-stream", last - first + 1, headers)
        if self.command == "HEAD":
            return
        with disk_path.open("rb") as content:
            content.seek(first)
            remaining = last - first + 1
            while remaining > 0 and (chunk := content.read(min(1 << 20, remaining))):
                self.wfile.write(chunk)
                remaining -= len(chunk)


def _byte_range(header: str, size: int) -> tuple[int, int] | None:
    """``(first, last)`` byte positions of a single ``bytes=`` range; None if it is not satisfiable."""
    match = re.fullmatch(r"bytes=(\d*)-(\d*)", header.strip())
    if match is None or match.groups() == ("", ""):
        return None
    first, last = match.groups()
    if not first:  # suffix range: the last N bytes
        return (max(size - int(last), 0), size - 1) if int(last) and size else None
    first_byte = int(first)
    last_byte = min(int(last), size - 1) if last else size - 1
    return (first_byte, last_byte) if first_byte <= last_byte else None


@pytest.fixture
def hub_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    """A running ``HubServer`` that the in-process clients and child processes use as their Hub.

    Sets the environment (inherited by subprocesses): ``HF_ENDPOINT``, ``HF_HUB_DISABLE_XET=1``,
    ``HF_TOKEN``, ``HF_HUB_CACHE`` and ``HF_DATASETS_CACHE`` (under ``tmp_path``), and unsets
    ``HF_HUB_OFFLINE``, ``TRANSFORMERS_OFFLINE`` and ``HF_DATASETS_OFFLINE``. Patches the values
    that the libraries read from that environment at import time: in ``huggingface_hub.constants``
    ``ENDPOINT``, ``HUGGINGFACE_CO_URL_TEMPLATE``, ``HF_URL_HOSTS``, ``HF_HUB_OFFLINE``,
    ``HF_HUB_DISABLE_XET``, ``HF_HUB_CACHE``; ``huggingface_hub.utils._http._HUB_ORIGINS``; in
    ``datasets.config`` ``HF_ENDPOINT``, ``HUB_DATASETS_URL``, ``HF_HUB_OFFLINE``,
    ``HF_DATASETS_OFFLINE``, ``HF_DATASETS_CACHE`` (``transformers`` reads
    ``huggingface_hub.constants``). Everything is restored and the server stopped afterwards.
    """
    import datasets.config
    from huggingface_hub import HfFileSystem, close_session, constants
    from huggingface_hub.utils import _http

    server = HubServer(tmp_path / "hub")
    url = server.start()
    hub_cache, datasets_cache = tmp_path / "hf_cache" / "hub", tmp_path / "hf_cache" / "datasets"
    for name, value in {"HF_ENDPOINT": url, "HF_HUB_DISABLE_XET": "1", "HF_TOKEN": HF_TEST_TOKEN,
                        "HF_HUB_CACHE": str(hub_cache), "HF_DATASETS_CACHE": str(datasets_cache)}.items():
        monkeypatch.setenv(name, value)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    for module, name, value in [
        (constants, "ENDPOINT", url),
        (constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}"),
        (constants, "HF_URL_HOSTS", constants.HF_URL_HOSTS | {"127.0.0.1"}),
        (constants, "HF_HUB_OFFLINE", False),
        (constants, "HF_HUB_DISABLE_XET", True),
        (constants, "HF_HUB_CACHE", str(hub_cache)),
        (_http, "_HUB_ORIGINS", _http._HUB_ORIGINS | {_http._url_origin(url)}),
        (datasets.config, "HF_ENDPOINT", url),
        (datasets.config, "HUB_DATASETS_URL", url + "/datasets/{repo_id}/resolve/{revision}/{path}"),
        (datasets.config, "HF_HUB_OFFLINE", False),
        (datasets.config, "HF_DATASETS_OFFLINE", False),
        (datasets.config, "HF_DATASETS_CACHE", datasets_cache),
    ]:
        monkeypatch.setattr(module, name, value)
    try:
        yield server
    finally:
        server.stop()
        close_session()  # drop pooled connections to this server
        HfFileSystem.clear_instance_cache()
