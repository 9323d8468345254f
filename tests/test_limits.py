"""Shared safely: no code from data (a YOLO model yaml is checked, never evaluated), limits from the machine (archives
against free disk and a compression ratio, one ingested file under the same cap as a folder's, input size in the
estimate), a chat prompt the context cannot hold refused before it is stored, and every seed and C-bound number
checked at submit."""
import dataclasses
import re
import shutil
import zipfile
from pathlib import Path

import pytest
from bad_inputs import declare_sizes

from studio import JobStatus, registry
from studio.conversations import Conversations
from studio.params import build
from workers.rag import chunk

GEMMA = {"model": "gemma-3-270m-packaged", "threads": 2, "n_ctx": 512, "seed": 7, "max_tokens": 8}


# ---- 1. a model yaml is data -----------------------------------------------------------------------------------------
def shipped_yaml(name: str = "yolov8.yaml") -> Path:
    import importlib.util

    root = Path(importlib.util.find_spec("ultralytics").origin).parent / "cfg" / "models"
    return next(root.rglob(name))


@pytest.fixture
def evil(tmp_path):
    """Ultralytics' own yolov8.yaml plus an `activation:` that writes a marker file when evaluated."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    payload = f"(__import__('pathlib').Path({str(marker)!r}).write_text('x'), nn.SiLU())[1]"
    path.write_text(shipped_yaml().read_text() + f'\nactivation: "{payload}"\n')
    return path, marker


@pytest.fixture
def image(tmp_path):
    import numpy as np
    from PIL import Image

    path = tmp_path / "img.jpg"
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(path)
    return path


def test_a_model_yaml_that_runs_code_is_refused_at_submit_for_every_detect_kind(studio, evil, image, tmp_path):
    path, marker = evil
    kinds = {"detect_predict": {"model": str(path), "source": str(image), "imgsz": 64},
             "detect_train": {"data": str(tmp_path), "model": str(path), "imgsz": 64, "epochs": 1},
             "detect_export": {"model": str(path), "imgsz": 64},
             "detect_stream": {"model": str(path), "session": "limits", "imgsz": 64}}
    before = len(studio.jobs(limit=10_000))
    for kind, params in kinds.items():
        with pytest.raises(ValueError, match=r"evil\.yaml: activation must be a plain name") as e:
            studio.submit(kind, params)
        assert "trust" in str(e.value) and len(str(e.value)) < 400
    assert len(studio.jobs(limit=10_000)) == before  # nothing queued
    assert not marker.exists()  # nothing ran


def test_the_run_path_checks_the_yaml_too_and_nothing_executes(studio, evil):
    pytest.importorskip("cv2", reason="OpenCV needs libgl1 and libglib2.0-0")
    from workers.detect import yolo

    path, marker = evil
    with pytest.raises(ValueError, match="activation"):
        yolo.load(str(path), studio.config.data_dir, trust=False)
    assert not marker.exists()
    assert yolo.resolve(str(path), studio.config.data_dir, trust=True) == str(path)  # the admin's call: not checked
    assert not marker.exists()


@pytest.mark.parametrize("change, field", [
    (("Concat", "eval"), "module"),  # a name Ultralytics would look up among its globals
    (('"nearest"', '"__import__"'), "args"),  # a string argument it would look up among its locals
    (("nc: 80", 'nc: "80"'), "nc"),
    (("nc: 80", "nc: 80\ndepth_multiple: [1]"), "depth_multiple"),
    (("nc: 80", "nc: 80\nexec: print"), "`exec`"),
    (("nc: 80", "nc: 80\nactivation: nn.SiLU(inplace=__import__('os'))"), "activation"),
    (("[-1, 1, Conv, [64, 3, 2]]", "[os, 1, Conv, [64, 3, 2]]"), "from"),
    (("[-1, 1, Conv, [64, 3, 2]]", "[-1, 1, Conv, [64, 3, 99999999]]"), "args"),
])
def test_each_field_of_a_model_yaml_is_checked_and_named(tmp_path, change, field):
    from workers.detect import yolo

    text = shipped_yaml().read_text()
    assert change[0] in text
    path = tmp_path / "mine.yaml"
    path.write_text(text.replace(change[0], change[1], 1))
    with pytest.raises(ValueError, match=re.escape(field)):
        yolo.check_model_yaml(path)


def test_every_shipped_yaml_passes_and_plain_activations_are_kept(tmp_path):
    import importlib.util

    from workers.detect import yolo

    root = Path(importlib.util.find_spec("ultralytics").origin).parent / "cfg" / "models"
    for f in root.rglob("*.yaml"):
        yolo.check_model_yaml(f)
    for act in ("nn.SiLU()", "nn.ReLU()", "nn.LeakyReLU(0.1)", "torch.nn.ReLU()"):
        (tmp_path / "act.yaml").write_text(shipped_yaml().read_text() + f"\nactivation: {act}\n")
        assert yolo.check_model_yaml(tmp_path / "act.yaml")["activation"] == act


def test_a_copy_of_a_shipped_yaml_is_still_accepted(studio, image, tmp_path):
    pytest.importorskip("cv2", reason="OpenCV needs libgl1 and libglib2.0-0")
    mine = tmp_path / "mynet.yaml"
    shutil.copy(shipped_yaml(), mine)
    job = studio.wait(studio.submit("detect_predict", {"model": str(mine), "source": str(image), "imgsz": 64}).id,
                      300)
    assert job.status is JobStatus.DONE, job.error
    assert job.result["images"] == 1


# ---- 2. archives: limits from the machine ---------------------------------------------------------------------------
def leftovers(dest: Path) -> list[Path]:
    """What an extraction into `dest` left: the folder itself, or a partial work folder beside it."""
    return [p for p in dest.parent.iterdir() if p.name == dest.name or p.name.startswith(f".{dest.name}.")]


def test_a_zip_bomb_is_refused_before_anything_is_written(studio, tmp_path):
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z, z.open("zeros.txt", "w") as f:
        block = bytes(2**20)
        for _ in range(300):  # 300 MiB of zeros in a zip of about 300 KB
            f.write(block)
    assert bomb.stat().st_size < 2**20
    dest = tmp_path / "out" / "bomb"
    dest.parent.mkdir()
    with pytest.raises(ValueError, match=r"'zeros.txt' expands \d+ times .*the limit is 200 times"):
        chunk.safe_extract(bomb, dest)
    assert leftovers(dest) == []
    for kind, params in (("rag_ingest", {"collection": "bomb", "path": str(bomb)}),
                         ("detect_check", {"data": str(bomb)})):
        with pytest.raises(ValueError, match="like a zip bomb"):
            studio.submit(kind, params)


def test_a_zip_that_declares_more_than_the_free_disk_is_refused(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    per = 0xFFFFFFF0
    n = free // per + 2
    big = tmp_path / "big.zip"
    with zipfile.ZipFile(big, "w") as z:
        for i in range(n):
            z.writestr(f"part{i}.txt", "x")
    declare_sizes(big, per)
    with zipfile.ZipFile(big) as z:
        assert sum(i.file_size for i in z.infolist()) > free
    dest = tmp_path / "out"
    with pytest.raises(ValueError, match=r"GiB free .*free some space.* Nothing was extracted"):
        chunk.safe_extract(big, dest, max_bytes=2**62, max_files=n + 1)
    assert leftovers(dest) == []


def test_a_failure_part_way_keeps_nothing_and_leaves_the_previous_extraction(tmp_path):
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as z:  # stored: the second entry's bytes are easy to find and spoil
        z.writestr("a.txt", "first file")
        z.writestr("b.txt", "second file, spoiled")
    data = bad.read_bytes()
    bad.write_bytes(data.replace(b"second file, spoiled", b"second file, SPOILED"))  # its CRC no longer matches
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "old.txt").write_text("from the last ingest")
    with pytest.raises(ValueError, match="could not be extracted.*nothing was kept"):
        chunk.safe_extract(bad, dest)
    assert sorted(p.name for p in dest.iterdir()) == ["old.txt"]  # the previous extraction is untouched
    assert [p.name for p in leftovers(dest)] == ["out"]  # no partial folder beside it

    good = tmp_path / "good.zip"
    with zipfile.ZipFile(good, "w") as z:
        z.writestr("notes/a.md", "# A\n")
    assert chunk.safe_extract(good, dest) == dest.resolve()
    assert [str(p.relative_to(dest)) for p in sorted(dest.rglob("*.md"))] == ["notes/a.md"]
    assert not (dest / "old.txt").exists()  # replaced whole: files gone from the archive are gone here too


def test_paths_outside_the_folder_and_links_are_still_refused(tmp_path):
    evil = tmp_path / "escape.zip"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("ok.txt", "fine")
        z.writestr("../../escaped.txt", "gotcha")
    with pytest.raises(ValueError, match="unsafe path"):
        chunk.safe_extract(evil, tmp_path / "out")
    link = tmp_path / "link.zip"
    with zipfile.ZipFile(link, "w") as z:
        info = zipfile.ZipInfo("passwd")
        info.external_attr = (0o120777 << 16)
        z.writestr(info, "/etc/passwd")
    with pytest.raises(ValueError, match="symbolic link"):
        chunk.safe_extract(link, tmp_path / "out")
    assert leftovers(tmp_path / "out") == [] and not (tmp_path.parent / "escaped.txt").exists()


# ---- 3. ingest size ------------------------------------------------------------------------------------------------
def sparse(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)  # takes no disk
    return path


def test_a_single_file_gets_the_same_cap_as_a_file_in_a_folder(studio, tmp_path):
    big = sparse(tmp_path / "huge.md", chunk.MAX_FILE_BYTES + 1)
    with pytest.raises(ValueError, match=r"huge\.md is 20 MiB; one file may be at most 20 MiB"):
        studio.submit("rag_ingest", {"collection": "huge-one", "path": str(big)})
    with pytest.raises(ValueError, match="at most 20 MiB"):
        chunk.list_files(big)  # the run refuses it too
    (tmp_path / "note.md").write_text("# Note\nsmall\n")
    skipped: list = []
    assert chunk.list_files(tmp_path, skipped) == [tmp_path / "note.md"]
    assert skipped == [{"file": "huge.md", "reason": chunk.too_big(big, big.stat().st_size)}]


def test_the_ingest_estimate_grows_with_the_input(tmp_path):
    from conftest import FakeNvml

    from studio.device import CpuDevice
    from workers.rag import ingest

    cpu, gpu = CpuDevice("test").read(), FakeNvml().read()
    small = tmp_path / "small.md"
    small.write_text("# Small\n" * 10)
    large = sparse(tmp_path / "large.md", 15 * 2**20)

    def est(path, device):
        return ingest.estimate(build(ingest.Params, {"collection": "sizes", "path": str(path)}), device)

    grown = est(large, cpu).total - est(small, cpu).total
    assert grown == ingest.READ_BYTES_PER_BYTE * (large.stat().st_size - small.stat().st_size)
    assert est(large, cpu).total > est(small, cpu).total + 15 * 2**20 * 10  # text in hand is several times its size
    assert est(large, gpu) == est(small, gpu)  # on CUDA the gate counts device memory; the text stays in RAM
    folder = tmp_path / "folder"
    folder.mkdir()
    shutil.copy(small, folder / "a.md")
    sparse(folder / "b.md", 3 * 2**20)
    assert est(folder, cpu).total == est(small, cpu).total + ingest.READ_BYTES_PER_BYTE * (3 * 2**20 - 80)
    zipped = tmp_path / "notes.zip"
    with zipfile.ZipFile(zipped, "w", zipfile.ZIP_DEFLATED) as z, z.open("long.md", "w") as f:
        f.write(b"# Long\n" + bytes(5 * 2**20))
    assert est(zipped, cpu).total == est(small, cpu).total + ingest.READ_BYTES_PER_BYTE * (5 * 2**20 + 7 - 80)
    huge = sparse(tmp_path / "huge.md", 3 * 2**30)  # refused at submit; its estimate stops at the cap
    assert est(huge, cpu).total == est(small, cpu).total + ingest.READ_BYTES_PER_BYTE * (chunk.MAX_FILE_BYTES - 80)


# ---- 4. a prompt the context cannot hold is never stored -------------------------------------------------------------
def test_a_megabyte_prompt_is_refused_at_submit_and_not_stored(studio):
    convs = Conversations(studio.config.data_dir / "chat.db")
    cid = convs.create("too long")
    prompt = ("The quick brown fox jumps over the lazy dog. " * 25_000)[:1_000_000]
    before = len(studio.jobs(limit=10_000))
    with pytest.raises(ValueError, match=r"prompt \(977 KiB\) does not fit the context window \(n_ctx=512"):
        studio.submit("chat", {**GEMMA, "prompt": prompt, "conversation": cid})
    assert convs.get(cid)["messages"] == [] and len(studio.jobs(limit=10_000)) == before


def test_the_bound_at_submit_does_not_refuse_a_prompt_of_long_runs():
    from workers.chat.chat import prompt_clearly_too_long

    assert not prompt_clearly_too_long("def f():\n" + " " * 8000 + "return 1\n" + "=" * 4000, 512)
    assert prompt_clearly_too_long("a b c d e f " * 1000, 512)


def test_a_prompt_the_model_cannot_take_leaves_the_conversation_usable(studio):
    from workers.chat.chat import prompt_clearly_too_long

    convs = Conversations(studio.config.data_dir / "chat.db")
    cid = convs.create("still usable")
    prompt = "The quick brown fox jumps over the lazy dog. " * 64  # about 640 tokens in 2880 bytes: under the bound
    assert not prompt_clearly_too_long(prompt, 512)
    job = studio.wait(studio.submit("chat", {**GEMMA, "prompt": prompt, "conversation": cid}).id, 300)
    assert job.status is JobStatus.FAILED and "not stored" in job.error and "n_ctx=512" in job.error, job.error
    assert convs.get(cid)["messages"] == []
    n_convs = len(convs.list())
    job = studio.wait(studio.submit("chat", {**GEMMA, "prompt": prompt, "conversation": "new"}).id, 300)
    assert job.status is JobStatus.FAILED and len(convs.list()) == n_convs  # no empty conversation is left

    job = studio.wait(studio.submit("chat", {**GEMMA, "prompt": "Hello!", "conversation": cid}).id, 300)
    assert job.status is JobStatus.DONE, job.error
    assert [m["role"] for m in convs.get(cid)["messages"]] == ["user", "assistant"]
    assert convs.get(cid)["messages"][0]["content"] == "Hello!"
    job = studio.wait(studio.submit("chat", {**GEMMA, "prompt": "Hello again!", "conversation": "new"}).id, 300)
    assert job.status is JobStatus.DONE and len(convs.list()) == n_convs + 1
    assert [m["role"] for m in convs.get(job.result["conversation"])["messages"]] == ["user", "assistant"]


# ---- 5. ranges at submit -------------------------------------------------------------------------------------------
SEEDED = sorted(k for k in registry.WORKERS
                if "seed" in {f.name for f in dataclasses.fields(registry.module_for(k).Params)})


def required(kind: str) -> dict:
    """Plausible values for a kind's fields without a default (names, paths), so only the tested field is bad."""
    fields = dataclasses.fields(registry.module_for(kind).Params)
    return {f.name: "abc" for f in fields if f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
            or f.name in ("prompt", "data", "images") and f.default == ""}  # defaulted, but a job needs them


def test_the_kinds_with_a_seed_are_all_covered():
    assert {"chat", "tinylm", "tinylm_generate", "transcribe", "detect_train", "detect_check"} <= set(SEEDED)


@pytest.mark.parametrize("kind", SEEDED)
def test_a_seed_beyond_what_the_libraries_take_is_refused_at_submit(studio, kind):
    before = len(studio.jobs(limit=10_000))
    with pytest.raises(ValueError, match=r"seed must be (-1 \(random\) or )?between 0 and \d+; "
                                         r"got 99999999999999999999") as e:
        studio.submit(kind, {**required(kind), "seed": 99999999999999999999})
    assert len(studio.jobs(limit=10_000)) == before
    top = int(re.search(r"between 0 and (\d+)", str(e.value)).group(1))
    assert 2**31 - 1 <= top < 2**32  # every library here takes a 32-bit seed
    params = build(registry.module_for(kind).Params, {**required(kind), "seed": top})  # the top itself is fine
    assert params.seed == top
    lowest = -1 if "-1 (random)" in str(e.value) else 0  # Paint takes -1 for a random seed, as A1111 does
    with pytest.raises(ValueError, match="seed must be"):
        build(registry.module_for(kind).Params, {**required(kind), "seed": lowest - 1})


@pytest.mark.parametrize("kind, field, value", [
    ("rag_eval", "threads", 10**20), ("rag_eval", "n_ctx", 10**20), ("rag_eval", "max_tokens", 0),
    ("rag_eval", "n_gpu_layers", -2), ("transcribe", "editor_gpu_layers", 10**20), ("detect_stream", "imgsz", 10**20),
    ("detect_stream", "conf", 2.0), ("chat", "threads", 10**20), ("tinylm", "threads", 10**20),
])
def test_numbers_that_reach_c_code_are_checked_at_submit(studio, kind, field, value):
    params = {**required(kind), field: value}
    if kind == "detect_stream":
        params["session"] = "abc"
    with pytest.raises(ValueError, match=rf"{field} must be between"):
        studio.submit(kind, params)
