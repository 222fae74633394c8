"""A stand-in for the Hugging Face Hub on 127.0.0.1 (stdlib `http.server` in a thread), speaking the
part of the Hub's HTTP API that huggingface_hub's `snapshot_download` uses (test-only):

  GET /api/models/{repo}/revision/{rev}   model info: id, sha (the commit), siblings
  GET /api/models/{repo}/tree/{rev}       the file listing: type, path, size, oid (one page)
  HEAD/GET /{repo}/resolve/{rev}/{file}   X-Repo-Commit, ETag, Content-Length; GET honours Range (206)

A gated repo answers its files with 401 and X-Error-Code: GatedRepo unless the request carries the
token `GRANTED` (its metadata is public, as on the Hub); a private one answers everything with 401 and X-Error-Code: RepoNotFound (what the Hub
tells a client without access); an unknown repo or path answers 404 with X-Error-Code: RepoNotFound
/ EntryNotFound.
`cut_once` names files whose first GET stops halfway (the connection closed) to test resuming;
`requests` logs (method, path, Range header) of every request.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, Set
from urllib.parse import unquote, urlsplit

GRANTED = "hf_granted"                              # the token of an account that accepted the licences


def repo_from_dir(path: str) -> Dict[str, bytes]:
    """{file name: bytes} of the files directly inside `path`."""
    return {n: open(os.path.join(path, n), "rb").read() for n in sorted(os.listdir(path))
            if os.path.isfile(os.path.join(path, n))}


class FakeHub:
    """repos: {'org/name': {file path: bytes}}; gated: the ids whose files need a licence accepted;
    private: the ids only their owners may read."""

    def __init__(self, repos: Dict[str, Dict[str, bytes]], gated: Set[str] = frozenset(),
                 private: Set[str] = frozenset()):
        self.repos, self.gated, self.private = repos, set(gated), set(private)
        self.sha = {r: hashlib.sha1(r.encode()).hexdigest() for r in repos}
        self.cut_once: Set[str] = set()
        self.requests = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def downloads(self, repo: str):
        """The file paths GET from `repo`'s resolve URLs, in order."""
        prefix = f"/{repo}/resolve/"
        return [p[len(prefix):].split("/", 1)[1] for m, p, _ in self.requests if m == "GET" and p.startswith(prefix)]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def _send(self, status: int, body: bytes = b"", headers=(), head: bool = False) -> None:
            self.send_response(status)
            for k, v in (*headers, ("Content-Length", str(len(body)))):
                self.send_header(k, v)
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _error(self, status: int, code: str, message: str, head: bool) -> None:
            self._send(status, json.dumps({"error": message}).encode(),
                       (("X-Error-Code", code), ("X-Error-Message", message), ("Content-Type", "application/json")),
                       head)

        def _json(self, data) -> None:
            self._send(200, json.dumps(data).encode(), (("Content-Type", "application/json"),))

        def _route(self, head: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            hub.requests.append((self.command, path, self.headers.get("Range")))
            parts = path.strip("/").split("/")
            api = parts[0] == "api"
            if api and len(parts) >= 6 and parts[1] == "models":
                repo, kind, rev = "/".join(parts[2:4]), parts[4], parts[5]
            elif not api and len(parts) >= 5 and parts[2] == "resolve":
                repo, kind, rev = "/".join(parts[:2]), "resolve", parts[3]
            else:
                return self._error(404, "RepoNotFound", "Repository not found", head)
            if repo not in hub.repos:
                return self._error(404, "RepoNotFound", "Repository not found", head)
            if repo in hub.private:
                return self._error(401, "RepoNotFound", "Invalid username or password.", head)
            files, sha = hub.repos[repo], hub.sha[repo]
            if rev not in ("main", sha):
                return self._error(404, "RevisionNotFound", "Invalid rev id", head)
            if kind == "revision":
                return self._json({"id": repo, "sha": sha, "private": False, "gated": "auto" if repo in hub.gated
                                   else False, "siblings": [{"rfilename": f} for f in files]})
            if kind == "tree":
                return self._json([{"type": "file", "path": f, "size": len(b),
                                    "oid": hashlib.sha1(b"blob %d\0" % len(b) + b).hexdigest()}
                                   for f, b in files.items()])
            if kind != "resolve":
                return self._error(404, "EntryNotFound", "Entry not found", head)
            if repo in hub.gated and self.headers.get("Authorization") != f"Bearer {GRANTED}":
                return self._error(401, "GatedRepo", f"Access to model {repo} is restricted. You must have access "
                                   "to it and be authenticated to access it. Please log in.", head)
            name = "/".join(parts[4:])
            if name not in files:
                return self._error(404, "EntryNotFound", "Entry not found", head)
            self._file(files[name], name, sha, head)

        def _file(self, body: bytes, name: str, sha: str, head: bool) -> None:
            headers = [("X-Repo-Commit", sha), ("ETag", f'"{hashlib.sha256(body).hexdigest()}"'),
                       ("Accept-Ranges", "bytes")]
            start = int(self.headers["Range"][len("bytes="):].split("-")[0]) if self.headers.get("Range") else 0
            if head:
                return self._send(200, body, headers, head=True)
            if start:
                headers.append(("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}"))
                return self._send(206, body[start:], headers)
            if name in hub.cut_once:                                # half the body, then the line drops
                hub.cut_once.discard(name)
                self.send_response(200)
                for k, v in (*headers, ("Content-Length", str(len(body)))):
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body[:len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            self._send(200, body, headers)

        def do_GET(self):
            self._route(head=False)

        def do_HEAD(self):
            self._route(head=True)

    return Handler
