"""Who may do what on a shared studio: a remote user names no server path, loads no pickle, touches no one
else's jobs, collections or conversations, and changes nothing that everyone shares. Real studio, real checks."""
import dataclasses
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from studio import Config, JobStatus, Studio, registry
from studio.access import Forbidden, user_dir
from studio.conversations import Conversations

ROOT = Path(__file__).resolve().parents[1]
# a valid value for each required field a kind's Params has, so only the param under test decides
REQUIRED = {"prompt": "hi", "collection": "bobs-notes", "path": "x", "evalset": "x", "audio": "x", "data": "x",
            "checkpoint": "x", "model": "yolov8n.yaml", "source": "x", "session": "s1", "images": "x"}


@pytest.fixture
def shared(tmp_path):
    """A studio served to ann (the admin) and bob; nothing runs (the queue is paused)."""
    s = Studio(Config.load(tmp_path / "d"))
    s.admin = "ann"
    s.store.set_paused(True)
    return s


# fields whose default (empty) is refused before the access check: a kind needs them given
NEEDED = {"prompt", "data", "images"}


def params_for(kind: str, **given) -> dict:
    module = registry.module_for(kind)
    required = {f.name for f in dataclasses.fields(module.Params)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                or f.name in NEEDED and f.default == ""}
    return {**{k: REQUIRED[k] for k in required}, **given}


@pytest.mark.parametrize("kind,param", [(k, p) for k in sorted(registry.WORKERS) if not k.startswith("test_")
                                        for p in getattr(registry.module_for(k), "PATHS", ())])
def test_a_remote_user_names_no_server_path(shared, kind, param):
    for path in ("/etc/hostname", "../../../../etc/hostname", str(shared.config.db_path), "~/.bashrc"):
        with pytest.raises(Forbidden, match="not in your uploads"):
            shared.submit(kind, params_for(kind, **{param: path}), owner="bob")
    assert not shared.jobs()  # nothing was queued, and no file was read to find that out


def test_a_remote_users_own_uploads_and_job_folders_are_hers(shared, corpus):
    mine = user_dir(shared.config.users_dir, "bob") / "up1"
    mine.mkdir(parents=True)
    text = mine / "notes.txt"
    text.write_text(corpus.read_text())
    job = shared.submit("tinylm", {"data": str(text)}, owner="bob")
    assert job.status is JobStatus.QUEUED and job.owner == "bob"
    # a bare name is not a path: the built-in corpus and a YOLO architecture stay usable
    assert shared.submit("tinylm", {}, owner="bob").params["data"] == "python-stdlib"
    assert shared.submit("tinylm", {"data": "tinyshakespeare"}, owner="bob").status is JobStatus.QUEUED
    # her own job's run folder is hers too (a trained model, a checkpoint)
    (shared.run_dir(job.id) / "best.pt").write_bytes(b"x")
    with pytest.raises(ValueError, match="not written by this studio"):  # the pickle guard still applies
        shared.submit("detect_predict", {"model": str(shared.run_dir(job.id) / "best.pt"), "source": str(text)},
                      owner="bob")
    # ann's uploads are not bob's
    hers = user_dir(shared.config.users_dir, "ann") / "up"
    hers.mkdir(parents=True)
    (hers / "notes.txt").write_text("private")
    with pytest.raises(Forbidden):
        shared.submit("tinylm", {"data": str(hers / "notes.txt")}, owner="bob")


def test_trust_and_admin_only_params_are_the_admins(shared):
    with pytest.raises(Forbidden, match="Only the studio's admin"):
        shared.submit("detect_predict", {"model": "yolov8n.yaml", "source": "x", "trust": True}, owner="bob")
    with pytest.raises(Forbidden, match="repo is for the studio's admin"):
        shared.submit("model_download", {"repo": "someone/anything", "file": "x.gguf"}, owner="bob")
    assert shared.submit("model_download", {"preset": "bge-small-en-v1.5"}, owner="bob").status is JobStatus.QUEUED
    # the admin may name server paths (the kind's own checks still apply)
    assert shared.submit("tinylm", {"data": "/etc/hostname"}, owner="ann").status is JobStatus.QUEUED


def test_another_users_jobs_collections_and_conversations_are_out_of_reach(shared):
    anns = shared.submit("tinylm", {}, owner="ann")
    with pytest.raises(Forbidden, match="not one of yours"):
        shared.submit("tinylm_generate", {"checkpoint": anns.id}, owner="bob")
    with pytest.raises(Forbidden, match="not one of yours"):
        shared.submit("tinylm", {"resume_from": anns.id}, owner="bob")
    manifests = shared.config.data_dir / "rag" / "collections"
    manifests.mkdir(parents=True)
    (manifests / "anns-notes.json").write_text('{"embedder": "x", "root": "/x", "files": {}, "owner": "ann"}')
    for kind, extra in (("chat", {"prompt": "hi"}), ("rag_ingest", {"path": "x"}),
                        ("rag_eval", {"evalset": "x"})):
        with pytest.raises(Forbidden, match="belongs to another user"):
            shared.submit(kind, {**extra, "collection": "anns-notes"}, owner="bob")
    cid = Conversations(shared.config.data_dir / "chat.db").create("ann's chat", owner="ann")
    with pytest.raises(Forbidden, match="not one of yours"):
        shared.submit("chat", {"prompt": "hi", "conversation": cid}, owner="bob")
    assert [j.id for j in shared.jobs()] == [anns.id]  # nothing of bob's was queued


def test_data_files_are_the_studio_users_alone(tmp_path):
    data = tmp_path / "data"
    out = subprocess.run([sys.executable, str(ROOT / "app.py"), "run", "selftest", "--data-dir", str(data)],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "STUDIO_NO_BOOTSTRAP": "1"})
    assert out.returncode == 0, out.stdout + out.stderr
    for path in [data, *data.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        if path.is_dir():
            assert mode == 0o700, f"{path} is {oct(mode)}"
        else:
            assert mode & 0o077 == 0, f"{path} is {oct(mode)}"
