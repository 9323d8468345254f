"""Two users on one served studio: as bob, call every API endpoint the app has (enumerated from the app, so a new
endpoint is covered the day it is added) with ann's ids, collection, conversation and run-file paths, server paths
and a FileData that names a server file. Nothing of ann's may come back, and nothing of hers may change."""
import json
import time
import uuid

import pytest
from conftest import FakeNvml, free_port

import app
from studio import Config, Studio
from studio.conversations import Conversations

FILE_COMPONENTS = {"File", "Audio", "Image", "Video", "UploadButton", "Gallery", "Model3D", "Microphone"}
SECRET = "ann-secret-7f3a"  # in her conversation, her collection's manifest and her job's params
CALL_TIMEOUT_S = 5.0  # a call still going after this (following a job of bob's) is cancelled; what came is checked


class RemoteUser:
    """A logged-in remote client on Gradio's own HTTP API, as any remote client can call it: one keep-alive connection
    and one session for all its calls, as gradio_client keeps one. (gradio_client opens a new connection, TLS context
    and polling thread per call: ~0.2 s of CPU each, 200 s for the sweep's ~1000 calls.)"""

    def __init__(self, url: str, user: str, password: str):
        import httpx

        self.http = httpx.Client(base_url=url, timeout=10)
        self.http.post("login", data={"username": user, "password": password}).raise_for_status()
        self.session = uuid.uuid4().hex  # one session, as one browser tab or one gradio_client has
        config = self.http.get("config").json()
        self.fn_index = {"/" + d["api_name"]: d["id"] for d in config["dependencies"] if d.get("api_name")}

    def endpoints(self) -> dict:
        """The named endpoints with their parameters, as gradio_client's view_api(return_format="dict") gives them."""
        return self.http.get("gradio_api/info", params={"serialize": "False"}).json()["named_endpoints"]

    def call(self, name: str, args: list) -> tuple[bool, list]:
        """(queued, everything the server sent back): the HTTP refusal, or every message of the event (progress,
        logs, partial and final outputs, errors)."""
        r = self.http.post(f"gradio_api/call{name}", json={"data": args, "session_hash": self.session})
        if r.status_code != 200:
            return False, [r.status_code, r.text]
        event, seen = r.json()["event_id"], []
        if not self._read(event, seen):
            self.http.post("gradio_api/cancel",
                           json={"session_hash": self.session, "fn_index": self.fn_index[name], "event_id": event})
            self._read(event, seen)  # its end, and whatever it sent before it stopped
        return True, seen

    def _read(self, event: str, seen: list) -> bool:
        """Collect the session's messages until `event` completes (True), or it is still going after the timeout or
        waits for a next input chunk no one-shot call sends (False)."""
        import httpx

        deadline = time.monotonic() + CALL_TIMEOUT_S
        try:
            with self.http.stream("GET", "gradio_api/queue/data", params={"session_hash": self.session},
                                  timeout=httpx.Timeout(10, read=CALL_TIMEOUT_S)) as stream:
                for line in stream.iter_lines():
                    if line.startswith("data:"):
                        msg = json.loads(line[5:])
                        if msg.get("msg") not in ("estimation", "process_starts", "heartbeat"):  # queue bookkeeping
                            seen.append(msg)
                        mine = msg.get("event_id") == event
                        if (mine and msg.get("msg") == "process_completed") or msg.get("msg") == "close_stream":
                            return True  # close_stream: nothing of the session is pending any more
                        if mine and msg.get("msg") == "process_streaming":
                            return False
                    if time.monotonic() > deadline:
                        return False
        except httpx.TransportError:  # read timed out, or the server dropped the stream of a cancelled event
            return False
        return False


@pytest.fixture(scope="module")
def two_users(tmp_path_factory):
    # two (fake) cards, so the endpoints a multi-GPU box adds (Settings' per-card table) are swept too
    s = Studio(Config.load(tmp_path_factory.mktemp("two-users")), devices=[FakeNvml(), FakeNvml()]).start()
    s.admin = "ann"
    s.pause("two-user test: nothing runs")
    anns = s.submit("selftest", {"mib": 1}, owner="ann")
    # a queued job of a tab's kind with the secret in its params: a tab's attach/follow must not show it to bob
    s.submit("chat", {"model": "gemma-3-270m-packaged", "prompt": SECRET, "n_ctx": 512, "max_tokens": 4},
             owner="ann")
    cid = Conversations(s.config.data_dir / "chat.db").create(SECRET, owner="ann")
    Conversations(s.config.data_dir / "chat.db").add(cid, "user", SECRET)
    collections = s.config.data_dir / "rag" / "collections"
    collections.mkdir(parents=True)
    (collections / "anns-notes.json").write_text(json.dumps({"embedder": "x", "root": "/x", "files": {},
                                                             "owner": "ann", "note": SECRET}))
    demo = app.build_ui(s, auth=True)
    port = free_port()
    with pytest.MonkeyPatch.context() as env:
        # Gradio's queue re-summarises all its past events with pandas after each one (for its monitoring page):
        # quadratic over the sweep's ~1000 calls, half its time. Read once, when launch creates the queue.
        env.setenv("GRADIO_ANALYTICS_CACHE_FREQUENCY", str(10**9))
        app.launch(demo, s, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                   auth=[("ann", "pw1"), ("bob", "pw2")])
    yield s, f"http://127.0.0.1:{port}/", anns, cid
    demo.close()
    s.shutdown()


def probes(anns_job, cid, studio) -> list[str]:
    run = studio.run_dir(anns_job.id)
    return [anns_job.id, cid, "anns-notes", str(run / "run.json"), str(run), "/etc/hostname",
            str(studio.config.db_path), "../../../../etc/hostname"]


def is_file(p: dict) -> bool:
    kind = json.dumps(p.get("python_type", {}))
    return p.get("component", "") in FILE_COMPONENTS or "filepath" in kind or "FileData" in kind


def args_for(params: list[dict], probe: str) -> list:
    out = []
    for p in params:
        component = p.get("component", "")
        if is_file(p):  # a client would upload a local file as bob's own: injection is tried raw below
            out.append(None)
        elif component in ("Number", "Slider"):
            out.append(p.get("parameter_default") if p.get("parameter_has_default") else 1)
        elif component == "Checkbox":
            out.append(False)
        elif component in ("Dataframe", "CheckboxGroup", "Chatbot", "Gallery"):
            out.append(p.get("parameter_default") if p.get("parameter_has_default") else [])
        else:  # text, dropdowns, hidden ids: the probe
            out.append(probe)
    return out


def test_every_endpoint_refuses_bob_what_is_anns(two_users):
    studio, url, anns, cid = two_users
    before = {"job": studio.store.get(anns.id), "conv": Conversations(studio.config.data_dir / "chat.db").get(cid),
              "manifest": (studio.config.data_dir / "rag" / "collections" / "anns-notes.json").read_text()}
    bob = RemoteUser(url, "bob", "pw2")
    endpoints = bob.endpoints()
    assert len(endpoints) > 40  # every tab's endpoints are here
    leaks, tried, queued = [], 0, set()
    for name, spec in sorted(endpoints.items()):
        for probe in probes(anns, cid, studio):
            tried += 1
            reached, result = bob.call(name, args_for(spec["parameters"], probe))
            if reached:
                queued.add(name)
            shown = json.dumps(result, default=str).replace(probe, "")  # an error quoting what bob sent is no leak
            for secret in (SECRET, anns.id, cid):
                if secret in shown:
                    at = shown.index(secret)
                    leaks.append(f"{name} with {probe!r} showed {secret!r}: …{shown[max(0, at - 150):at + 50]}…")
    assert not leaks, "\n".join(leaks[:20])
    assert tried > 300
    assert queued == set(endpoints)  # every endpoint took bob's calls in (none was skipped at the door unseen)
    # a FileData naming a server file, sent as a raw call (as a remote client could) to every endpoint taking files
    injected = {"path": "/etc/hostname", "meta": {"_type": "gradio.FileData"}}
    with_files = [n for n, spec in endpoints.items() if any(is_file(p) for p in spec["parameters"])]
    assert with_files
    for name in with_files:
        data = [injected if is_file(p) else None for p in endpoints[name]["parameters"]]
        r = bob.http.post(f"gradio_api/call{name}", json={"data": data, "session_hash": bob.session})
        assert r.status_code == 400 and "was not uploaded" in r.text, name
    # nothing of ann's changed; bob's calls queued nothing that names her things, and no server file became his
    after_job = studio.store.get(anns.id)
    assert (after_job.status, after_job.params, after_job.owner) == (before["job"].status, before["job"].params, "ann")
    assert Conversations(studio.config.data_dir / "chat.db").get(cid) == before["conv"]
    assert (studio.config.data_dir / "rag" / "collections" / "anns-notes.json").read_text() == before["manifest"]
    for job in studio.jobs(owner="bob"):
        assert anns.id not in json.dumps(job.params) and "anns-notes" not in json.dumps(job.params)
        studio.cancel(job.id)
    assert not list(studio.config.users_dir.rglob("hostname"))
    assert not list(studio.config.uploads_dir.rglob("hostname"))
    assert studio.config.budget_gb == Config.load(studio.config.data_dir).budget_gb  # settings unchanged
    assert "/save_device_settings" in endpoints and Config.load(studio.config.data_dir).devices == {}
    assert studio.store.paused  # bob could not resume the queue either
