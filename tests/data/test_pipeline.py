"""The whole chain on real offline text: raw files -> phase-1 and phase-2 mixture shards + manifests.

The teacher is a real LLM: `phi3 serve` with the default model (SmolLM2-135M-Instruct) on loopback.
"""

import json
import subprocess
import sys

from phi3.data.decontam import ngram_hashes, words
from phi3.data.io import list_shards, read_records, write_records
from phi3.data.pipeline import run_pipeline
from tests.data.test_annotate import SHORT_PROMPT


def records(path):
    return [r for s in list_shards(path) for r in read_records(s)]


def test_raw_files_to_phase_mixtures(raw_corpus, teacher, tmp_path):
    heapq_text = (raw_corpus / "pydoc" / "heapq.html").read_text()
    from phi3.data.ingest import html_to_text
    quote = " ".join(words(html_to_text(heapq_text))[300:320])
    write_records(tmp_path / "evals" / "qa.jsonl", [{"id": "q", "text": f"Q: {quote}?"}])
    (tmp_path / "prompt.txt").write_text(SHORT_PROMPT)
    t = f'base_url = "{teacher.base_url}"\nmodel = "{teacher.model}"\nconcurrency = 4\n'
    cfg = tmp_path / "pipeline.toml"
    cfg.write_text(f'''
out = "out"
workers = 1
[[ingest]]
source = "pydoc"
paths = ["{raw_corpus}/pydoc"]
kind = "html"
[[ingest]]
source = "sklearn"
paths = ["{raw_corpus}/sklearn"]
[[ingest]]
source = "django"
paths = ["{raw_corpus}/django"]
[[ingest]]
source = "fortunes"
paths = ["{raw_corpus}/fortunes"]
kind = "fortune"
group = 8
limit = 8
[[ingest]]
source = "code"
paths = ["{raw_corpus}/code"]
[dedup]
threshold = 0.8
[filter]
skip_sources = ["code"]
[decontam]
eval = {{ qa = ["evals/qa.jsonl"] }}
[annotate]
{t}sample = 12
max_chars = 300
max_tokens = 20
prompt_path = "prompt.txt"
[classify]
threshold = 1.5
skip_sources = ["code"]
[synth]
{t}n = 2
max_tokens = 48
min_words = 10
seed_from = "decontam"
seed_glob = "[!c]*.jsonl"
[mix]
seed = 1
[[mix.phase]]
name = "phase1"
tokens = 30000
[[mix.phase.source]]
name = "web"
path = "decontam/[!c]*.jsonl"
weight = 3
[[mix.phase.source]]
name = "code"
path = "decontam/code-*.jsonl"
weight = 1
[[mix.phase]]
name = "phase2"
tokens = 6000
[[mix.phase.source]]
name = "edu-web"
path = "classify/[!c]*.jsonl"
weight = 2
[[mix.phase.source]]
name = "synthetic"
path = "synth_decontam"
weight = 1
max_epochs = 20
[[mix.phase.source]]
name = "code"
path = "classify/code-*.jsonl"
weight = 1
''')
    run = subprocess.run([sys.executable, "-m", "phi3.cli", "data", "run", str(cfg)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout)
    out = tmp_path / "out"

    # dedup: the injected duplicates are gone, their originals stay
    dedup_ids = {r["id"] for r in records(out / "dedup")}
    assert "pydoc/zz_json_copy.html#0" not in dedup_ids and "pydoc/zz_csv_near.html#0" not in dedup_ids
    assert {"pydoc/json.html#0", "pydoc/csv.html#0"} <= dedup_ids
    assert report["dedup"]["exact_duplicates"] == 1 and report["dedup"]["near_duplicates"] == 1
    # filter and decontamination
    assert report["filter"]["removed"] > 0
    assert report["decontam"]["reasons"] == {"contaminated:qa": 1}
    # annotation by the teacher, classifier trained on its labels, every document scored
    ann = report["annotate"]
    assert ann["in"] == 12 and sum(ann["scores"].values()) == 12
    held = report["classify_train"]["heldout"]
    assert report["classify_train"]["labels"] == 12 - ann["scores"].get("unparseable", 0)
    assert 0 <= held["f1"] <= 1 and held["n"] == report["classify_train"]["test"]
    kept = records(out / "classify")
    assert all(r["edu_score"] >= 1.5 for r in kept if r["source"] != "code")
    # synthetic textbooks with diversity measured
    syn = report["synth"]
    assert syn["in"] == 2 and 0 < syn["diversity"]["distinct_1"] <= 1
    # mixtures
    for phase, budget in (("phase1", 30000), ("phase2", 6000)):
        m = json.loads((out / "mix" / phase / "manifest.json").read_text())
        rows = [r for n in m["shards"] for r in read_records(out / "mix" / phase / n)]
        assert len(rows) == m["documents"] > 0 and m["target_tokens"] == budget
        assert all(set(r) == {"id", "text", "source"} for r in rows)
        assert not any(ngram_hashes(quote, 13) & ngram_hashes(r["text"], 13) for r in rows)  # decontaminated
        assert {r["source"] for r in rows} <= {s["name"] for s in m["sources"]}
    m1 = json.loads((out / "mix" / "phase1" / "manifest.json").read_text())
    assert {s["name"]: s["weight"] for s in m1["sources"]} == {"web": 3, "code": 1}
    assert all(not s["short"] for s in m1["sources"])

    # a rerun finds every stage done: no teacher call, the same mixtures
    calls = teacher.answered()
    before = (out / "mix" / "phase2" / "manifest.json").read_text()
    again = run_pipeline(cfg)
    assert teacher.answered() == calls and again["annotate"]["cached"] == 12
    assert (out / "mix" / "phase2" / "manifest.json").read_text() == before

    # ... and on to phase-1 / phase-2 token shards for `phi3 train pretrain`, with `phi3 data tokenize`
    from phi3.cli import main
    from phi3.data.tokenize import TokenShards
    for phase in ("phase1", "phase2"):
        m = json.loads((out / "mix" / phase / "manifest.json").read_text())
        assert main(["data", "tokenize", *(str(out / "mix" / phase / n) for n in m["shards"]),
                     "--out", str(out / "tokens" / phase), "--no-progress"]) == 0
        index = json.loads((out / "tokens" / phase / "index.json").read_text())
        shards = TokenShards(out / "tokens" / phase)
        # the mixer counted tokens with the same (default) tokenizer; tokenize adds one EOS per document
        assert shards.tokens == index["tokens"] == m["tokens"] + m["documents"]
        assert sum(s["documents"] for s in index["shards"]) == m["documents"]
