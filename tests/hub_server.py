"""A minimal Hub-compatible HTTP endpoint on 127.0.0.1, enough for `huggingface_hub` uploads and downloads.

It speaks the parts of the Hub API that `create_repo`, `upload_folder` (regular, non-LFS uploads) and
`hf_hub_download` / `from_pretrained` use, keeps repositories in memory, and requires a bearer token for writes.
"""

import base64
import hashlib
import json
import re
import threading

import yaml
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

TOKEN = "hf_test_token"


class FakeHub:
    def __init__(self):
        self.repos: dict[str, dict] = {}  # repo_id -> {"private": bool, "branches": {name: {"sha", "files"}}}
        self.requests: list[str] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def files(self, repo_id: str, branch: str = "main") -> dict[str, bytes]:
        return self.repos[repo_id]["branches"][branch]["files"]

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status, body=b"", headers=None, content_type="application/json"):
                if isinstance(body, (dict, list)):
                    body = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _error(self, status, code, message):
                self._send(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message})

            def _authorised(self):
                return self.headers.get("Authorization") == f"Bearer {TOKEN}"

            def _body(self):
                return self.rfile.read(int(self.headers.get("Content-Length", 0)))

            def do_POST(self):
                path = unquote(urlparse(self.path).path)
                hub.requests.append(f"POST {path}")
                if path == "/api/validate-yaml":
                    errors = metadata_errors(json.loads(self._body())["content"])
                    return self._send(400 if errors else 200, {"errors": [{"message": e} for e in errors]})
                if not self._authorised():
                    return self._error(401, "Unauthorized", "Invalid credentials in Authorization header")
                if path == "/api/repos/create":
                    data = json.loads(self._body())
                    repo_id = f"{data['organization']}/{data['name']}" if data.get("organization") else data["name"]
                    if repo_id in hub.repos:
                        return self._send(409, {"error": "You already created this model repo", "url": f"{hub.endpoint}/{repo_id}"})
                    hub.repos[repo_id] = {"private": bool(data.get("private")) or data.get("visibility") == "private",
                                          "branches": {"main": {"sha": "0" * 40, "files": {}}}}
                    return self._send(200, {"url": f"{hub.endpoint}/{repo_id}", "name": repo_id})
                match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit|branch)/(.+)", path)
                if not match or match.group(1) not in hub.repos:
                    return self._error(404, "RepoNotFound", f"Repository not found: {path}")
                repo_id, action, revision = match.groups()
                repo = hub.repos[repo_id]
                if action == "branch":
                    main = repo["branches"]["main"]
                    repo["branches"].setdefault(revision, {"sha": main["sha"], "files": dict(main["files"])})
                    return self._send(200, {})
                if revision not in repo["branches"]:
                    return self._error(404, "RevisionNotFound", f"Revision not found: {revision}")
                body = self._body()
                if action == "preupload":
                    files = json.loads(body)["files"]
                    return self._send(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                      for f in files]})
                branch = repo["branches"][revision]
                for line in body.splitlines():
                    item = json.loads(line)
                    if item["key"] == "file":
                        branch["files"][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    elif item["key"] == "deletedFile":
                        branch["files"].pop(item["value"]["path"], None)
                    elif item["key"] != "header":
                        return self._error(400, "BadRequest", f"unsupported commit operation {item['key']}")
                digest = hashlib.sha1(branch["sha"].encode())
                for name in sorted(branch["files"]):
                    digest.update(name.encode() + branch["files"][name])
                branch["sha"] = digest.hexdigest()
                return self._send(200, {"commitUrl": f"{hub.endpoint}/{repo_id}/commit/{branch['sha']}",
                                        "commitOid": branch["sha"], "pullRequestUrl": None})

            def do_GET(self):
                path = unquote(urlparse(self.path).path)
                hub.requests.append(f"{self.command} {path}")
                match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)/?(.*)", path)
                if match:
                    repo_id, revision, folder = match.groups()
                    branch = self._branch(repo_id, revision)
                    if branch is None:
                        return None
                    prefix = f"{folder.rstrip('/')}/" if folder else ""
                    entries = {}
                    for name, content in branch["files"].items():
                        if name.startswith(prefix):
                            head, _, rest = name[len(prefix):].partition("/")
                            entries[prefix + head] = {"type": "directory" if rest else "file", "path": prefix + head,
                                                      "size": len(content), "oid": hashlib.sha1(content).hexdigest()}
                    if not entries and folder:
                        return self._error(404, "EntryNotFound", f"Entry not found: {folder}")
                    return self._send(200, sorted(entries.values(), key=lambda e: e["path"]))
                match = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/(.+))?", path)
                if match:
                    repo_id, revision = match.group(1), match.group(2) or "main"
                    branch = self._branch(repo_id, revision)
                    if branch is None:
                        return None
                    return self._send(200, {"id": repo_id, "modelId": repo_id, "sha": branch["sha"],
                                            "private": hub.repos[repo_id]["private"],
                                            "siblings": [{"rfilename": name} for name in sorted(branch["files"])]})
                match = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
                if not match:
                    return self._error(404, "NotFound", f"Not found: {path}")
                repo_id, revision, filename = match.groups()
                branch = self._branch(repo_id, revision)
                if branch is None:
                    return None
                if filename not in branch["files"]:
                    return self._error(404, "EntryNotFound", f"Entry not found: {filename}")
                content = branch["files"][filename]
                etag = hashlib.sha256(content).hexdigest()
                return self._send(200, content, {"ETag": f'"{etag}"', "X-Repo-Commit": branch["sha"]},
                                  content_type="application/octet-stream")

            do_HEAD = do_GET

            def _branch(self, repo_id, revision):
                repo = hub.repos.get(repo_id)
                if repo is None or (repo["private"] and not self._authorised()):
                    self._error(404, "RepoNotFound", f"Repository not found: {repo_id}")
                    return None
                branch = repo["branches"].get(revision) or next(
                    (b for b in repo["branches"].values() if b["sha"] == revision), None)
                if branch is None:
                    self._error(404, "RevisionNotFound", f"Revision not found: {revision}")
                return branch

        return Handler


def metadata_errors(readme: str) -> list[str]:
    """Checks a card's YAML front matter the way the Hub does for the fields lm-lstm writes."""
    match = re.match(r"^---\n(.*?)\n---\n", readme, re.DOTALL)
    if not match:
        return ["README.md has no YAML metadata block"]
    metadata = yaml.safe_load(match.group(1))
    if not isinstance(metadata, dict):
        return ["metadata must be a mapping"]
    errors = [f"{key} must be a string" for key in ("license", "library_name", "pipeline_tag")
              if key in metadata and not isinstance(metadata[key], str)]
    for key in ("tags", "datasets"):
        if key in metadata and not (isinstance(metadata[key], list) and all(isinstance(v, str) for v in metadata[key])):
            errors.append(f"{key} must be a list of strings")
    for entry in metadata.get("model-index", []):
        if not isinstance(entry.get("name"), str):
            errors.append("model-index entries need a name")
        for result in entry.get("results", []):
            if not isinstance(result.get("task", {}).get("type"), str):
                errors.append("model-index results need task.type")
            if not {"name", "type"} <= set(result.get("dataset", {})):
                errors.append("model-index results need dataset.name and dataset.type")
            for metric in result.get("metrics", []):
                if not isinstance(metric.get("type"), str) or not isinstance(metric.get("value"), (int, float)):
                    errors.append("metrics need a string type and a numeric value")
    return errors
