"""The Hugging Face Hub, served from a local folder: huggingface_hub's HTTP client swapped for one
that answers as the Hub would. Listing, downloading, the cache, HF_HOME and offline mode stay
huggingface_hub's own. FAKE_HUB is that code as text, to install as sitecustomize in a command
the tests start; serving() installs it in the test's own process."""

from contextlib import contextmanager
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"

# Installed as sitecustomize in a training run (or run in-process): huggingface_hub's HTTP
# client answers from the folder $FAKE_HUB_REPO, as the Hub would, and logs each request.
FAKE_HUB = """
import hashlib, os
from pathlib import Path

import httpx2
import huggingface_hub
from huggingface_hub.utils._http import hf_request_event_hook

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_hub(root, log):
    root = Path(root)

    def answer(request):
        with open(log, "a") as f:
            f.write(f"{request.method} {request.url.path}\\n")
        files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
        path = request.url.path
        if "/revision/" in path:  # any branch or ref resolves to the one commit
            siblings = [{"rfilename": f} for f in files]
            return httpx2.Response(200, json={"id": "repo", "sha": COMMIT, "siblings": siblings})
        if "/tree/" in path:
            return httpx2.Response(200, json=[{"type": "file", "path": f, "size": (root / f).stat().st_size,
                                              "oid": hashlib.sha1((root / f).read_bytes()).hexdigest()} for f in files])
        if "/resolve/" in path:  # /resolve/<revision, which may hold slashes>/<file>
            wanted = path.split("/resolve/", 1)[1]
            found = [f for f in files if wanted.endswith("/" + f)]
            if not found:
                return httpx2.Response(404, headers={"X-Error-Code": "EntryNotFound"})
            data = (root / max(found, key=len)).read_bytes()
            etag = hashlib.sha1(data).hexdigest()
            headers = {"X-Repo-Commit": COMMIT, "ETag": etag, "Content-Length": str(len(data))}
            return httpx2.Response(200, headers=headers, content=b"" if request.method == "HEAD" else data)
        return httpx2.Response(404)

    huggingface_hub.set_client_factory(
        lambda: httpx2.Client(transport=httpx2.MockTransport(answer), event_hooks={"request": [hf_request_event_hook]})
    )


if os.environ.get("FAKE_HUB_REPO"):
    fake_hub(os.environ["FAKE_HUB_REPO"], os.environ["FAKE_HUB_LOG"])
"""


@contextmanager
def serving(root: Path, log: Path):
    """The Hub, online, serving `root` as every repository to this process."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.utils._http import default_client_factory

    namespace: dict = {}
    exec(FAKE_HUB, namespace)
    namespace["fake_hub"](root, log)
    offline, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, False
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = offline
        huggingface_hub.set_client_factory(default_client_factory)


def requests(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


@contextmanager
def accepting_uploads(refuse: int | None = None):
    """The Hub taking a commit (create_repo, upload_folder) from this process; yields the files
    committed, {path: bytes}. refuse: answer every request with this status instead."""
    import base64
    import json

    import httpx2
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.utils._http import default_client_factory, hf_request_event_hook

    committed: dict[str, bytes] = {}

    def answer(request):
        path = request.url.path
        if refuse:
            return httpx2.Response(refuse, json={"error": "Invalid credentials"})
        if path == "/api/repos/create":
            return httpx2.Response(200, json={"url": "https://huggingface.co/someone/repo", "name": "someone/repo"})
        if path == "/api/validate-yaml":
            return httpx2.Response(200, json={})
        if "/preupload/" in path:  # every file inline in the commit
            files = json.loads(request.content)["files"]
            return httpx2.Response(
                200,
                json={"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]},
            )
        if "/commit/" in path:
            for line in request.content.decode().splitlines():
                entry = json.loads(line)
                if entry["key"] == "file":
                    committed[entry["value"]["path"]] = base64.b64decode(entry["value"]["content"])
            return httpx2.Response(
                200, json={"commitUrl": "https://huggingface.co/someone/repo/commit/1", "commitOid": "1" * 40}
            )
        return httpx2.Response(404)

    huggingface_hub.set_client_factory(
        lambda: httpx2.Client(transport=httpx2.MockTransport(answer), event_hooks={"request": [hf_request_event_hook]})
    )
    offline, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, False
    try:
        yield committed
    finally:
        constants.HF_HUB_OFFLINE = offline
        huggingface_hub.set_client_factory(default_client_factory)
