"""Two users on one served studio: as bob, call every API endpoint the app has (enumerated from the app, so a new
endpoint is covered the day it is added) with ann's ids, collection, conversation and run-file paths, server paths
and a FileData that names a server file. Nothing of ann's may come back, and nothing of hers may change."""
import json

import pytest
from conftest import free_port

import app
from studio import Config, Studio
from studio.conversations import Conversations

FILE_COMPONENTS = {"File", "Audio", "Image", "Video", "UploadButton", "Gallery", "Model3D", "Microphone"}
SECRET = "ann-secret-7f3a"  # in her conversation, her collection's manifest and her job's params


@pytest.fixture(scope="module")
def two_users(tmp_path_factory):
    s = Studio(Config.load(tmp_path_factory.mktemp("two-users"))).start()
    s.admin = "ann"
    s.pause("two-user test: nothing runs")
    anns = s.submit("selftest", {"mib": 1}, owner="ann")
    cid = Conversations(s.config.data_dir / "chat.db").create(SECRET, owner="ann")
    Conversations(s.config.data_dir / "chat.db").add(cid, "user", SECRET)
    collections = s.config.data_dir / "rag" / "collections"
    collections.mkdir(parents=True)
    (collections / "anns-notes.json").write_text(json.dumps({"embedder": "x", "root": "/x", "files": {},
                                                             "owner": "ann", "note": SECRET}))
    demo = app.build_ui(s, auth=True)
    port = free_port()
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
        if is_file(p):  # gradio_client would upload a local file as bob's own: injection is tried raw below
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
    from gradio_client import Client

    studio, url, anns, cid = two_users
    before = {"job": studio.store.get(anns.id), "conv": Conversations(studio.config.data_dir / "chat.db").get(cid),
              "manifest": (studio.config.data_dir / "rag" / "collections" / "anns-notes.json").read_text()}
    bob = Client(url, auth=("bob", "pw2"), verbose=False)
    endpoints = bob.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert len(endpoints) > 40  # every tab's endpoints are here
    leaks, tried = [], 0
    for name, spec in sorted(endpoints.items()):
        for probe in probes(anns, cid, studio):
            tried += 1
            job = bob.submit(*args_for(spec["parameters"], probe), api_name=name)
            try:
                result = job.result(timeout=5)
            except Exception as e:  # refused, or still streaming a job of bob's: what came back so far is checked
                result = [str(e), *job.outputs()]
            finally:
                job.cancel()
            shown = json.dumps(result, default=str).replace(probe, "")  # an error quoting what bob sent is no leak
            for secret in (SECRET, anns.id, cid):
                if secret in shown:
                    leaks.append(f"{name} with {probe!r} showed {secret!r}: {shown[:200]}")
    assert not leaks, "\n".join(leaks[:20])
    assert tried > 300
    # a FileData naming a server file, sent as a raw call (as a remote client could) to every endpoint taking files
    import urllib.error
    import urllib.request

    injected = {"path": "/etc/hostname", "meta": {"_type": "gradio.FileData"}}
    with_files = [n for n, spec in endpoints.items() if any(is_file(p) for p in spec["parameters"])]
    assert with_files
    for name in with_files:
        data = [injected if is_file(p) else None for p in endpoints[name]["parameters"]]
        req = urllib.request.Request(f"{url}gradio_api/call{name}", data=json.dumps({"data": data}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        assert e.value.code == 400 and b"was not uploaded" in e.value.read(), name
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
    assert studio.store.paused  # bob could not resume the queue either

