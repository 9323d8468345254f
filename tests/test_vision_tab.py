"""The Vision chat tab's Chat sub-tab through gradio_client: Send with an uploaded image streams the answer under the
image, keeps the conversation (listed, reopened with its image), a follow-up continues it, a bad upload is a plain
error, and Caption all turns uploads into a table and CSV/JSONL downloads. A tiny LLaVA (tests/vision_fixtures.py);
CPU, offline."""
import csv
import re

import pytest
from vision_fixtures import QUESTION, make_tiny_llava, write_images

from studio import JobStatus

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def served(studio):
    from conftest import serve

    url, demo = serve(studio, show_error=True)
    yield url
    demo.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("vision-tab")
    return make_tiny_llava(d / "tiny-llava"), write_images(d / "images", size=(72, 64))


def _send(client, tiny_model, image, prompt, conversation=None, **over):
    from gradio_client import handle_file

    form = dict(prompt=prompt, image=handle_file(str(image)) if image else None, more_images=[],
                conversation=conversation, model=str(tiny_model), adapter="", system="", max_tokens=16,
                temperature=0.0, top_p=1.0, n_ctx=2048, load_in_4bit=False)
    form.update(over)
    return client.predict(**form, api_name="/vision_chat")


def test_send_streams_the_answer_under_the_image_and_keeps_the_conversation(served, studio, tiny):
    from gradio_client import Client

    model, images = tiny
    client = Client(served, verbose=False)
    chatbot, box, stats, conversation, shown = _send(client, model, images["red"], QUESTION)  # (the job id: State)
    job = studio.job(re.search(r"job `(\w+)`", stats).group(1))
    assert job.status is JobStatus.DONE, job.error
    assert box == "" and "tok/s" in stats and "hf" in stats
    kinds = [(m["role"], m["content"][0]["type"]) for m in chatbot]
    assert kinds == [("user", "file"), ("user", "text"), ("assistant", "text")]
    assert chatbot[-1]["content"][0]["text"] == job.result["answer"]
    assert shown and str(shown).endswith(".png")  # the image beside the answer (the run's own copy)
    cid = job.params["conversation"]  # Send made it; the list offers it
    assert cid in [c[1] for c in conversation["choices"]] and job.result["conversation"] == cid
    # a follow-up without a new image continues the same conversation; reopening it shows the image again
    chatbot, _, _, conversation2, _ = _send(client, model, None, "And the colour?", conversation=cid)
    assert [m["role"] for m in chatbot].count("assistant") == 2
    reopened, image = client.predict(cid=cid, api_name="/vision_open")
    assert len(reopened) == len(chatbot) and str(image).endswith(".png")


def test_a_bad_upload_is_a_plain_error_and_nothing_is_kept(served, studio, tiny, tmp_path):
    from gradio_client import Client

    model, images = tiny
    client = Client(served, verbose=False)
    fake = tmp_path / "fake.png"
    fake.write_bytes(b"definitely not a png")
    before = len(studio.jobs(kind="vision_chat"))
    from gradio_client import handle_file

    with pytest.raises(Exception, match="fake.png is not a readable image"):  # the Image box itself reads only images
        _send(client, model, images["red"], QUESTION, more_images=[handle_file(str(fake))])
    assert len(studio.jobs(kind="vision_chat")) == before


def test_caption_all_fills_the_table_and_offers_csv_and_jsonl(served, studio, tiny):
    from gradio_client import Client, handle_file

    model, images = tiny
    client = Client(served, verbose=False)
    status, table, files = client.predict(
        b_files=[handle_file(str(images[c])) for c in ("red", "green", "blue")], b_folder="",
        b_prompt="Caption it.", model=str(model), adapter="", max_tokens=16, temperature=0.0, load_in_4bit=False,
        api_name="/vision_caption")
    job = studio.jobs(kind="vision_chat")[0]
    assert job.status is JobStatus.DONE and job.result["batch"], job.error
    assert "3 images captioned" in status
    assert [r[0] for r in table["data"]] == ["blue.png", "green.png", "red.png"]
    paths = sorted(f["path"] if isinstance(f, dict) else f for f in files)
    assert paths[0].endswith("answers.csv") and paths[1].endswith("answers.jsonl")
    with open(paths[0], newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["answer"] for r in rows] == [r[1] for r in table["data"]]
