import pytest

from phi3.data.filters import FilterConfig, quality_filter, quality_reason
from phi3.data.io import list_shards, read_records, write_records
from phi3.errors import Phi3Error

GOOD = ("The heap queue algorithm keeps the smallest element at the root of a binary tree. "
        "Each parent is less than or equal to any of its children, and that invariant lets a program "
        "pop the smallest item in logarithmic time. To build a heap, start with a list and apply the "
        "transformation in linear time; then push and pop items while the property holds. ") * 1


PASSAGE = ("A priority queue can also be built on a sorted list, but inserting into a sorted list costs linear "
           "time while a binary heap needs only logarithmic work for every push.")


@pytest.mark.parametrize("text,reason", [
    ("Too short to be a document.", "min_words"),
    (GOOD + " #tag" * 20, "max_symbol_word_ratio"),
    ("\n".join(f"- point {i} about the list and the heap" for i in range(60)), "max_bullet_lines"),
    ("\n".join(f"and then the story of item {i} went on and on for a long while..." for i in range(40)), "max_ellipsis_lines"),
    (GOOD + " 12 34 56 78 90 11 22 33 44 55 66 77 88 99 10 20 30 40 50 60" * 2, "min_alpha_words"),
    (" ".join(["lorem ipsum dolor sit amet consectetur"] * 20), "min_stop_words"),
    (GOOD + "\n" + "\n".join(["the same line of the text with words"] * 30), "max_duplicate_lines"),
    (GOOD + " " + "the heap " * 40, "max_top_2gram"),
    (GOOD + " supercalifragilisticexpialidocious" * 60, "max_mean_word_length"),
    (GOOD + " " + PASSAGE + " " + PASSAGE, "max_duplicate_5grams"),
])
def test_each_rule_catches_its_case(text, reason):
    assert quality_reason(GOOD, FilterConfig()) is None
    assert quality_reason(text, FilterConfig()) == reason


def test_rules_can_be_switched_off_and_tuned():
    short = "Too short to be a document but has the and of."
    assert quality_reason(short, FilterConfig()) == "min_words"
    assert quality_reason(short, FilterConfig(min_words=5, min_stop_words=None)) is None
    with pytest.raises(Phi3Error, match="unknown filter setting.*min_wrods"):
        FilterConfig.from_dict({"min_wrods": 3})


def test_filter_stage_counts_reasons_and_keeps_skipped_sources(corpus_shards, tmp_path):
    report = quality_filter(corpus_shards, tmp_path / "f", FilterConfig(), skip_sources=["code"], workers=2)
    kept = [r for s in list_shards(tmp_path / "f") for r in read_records(s)]
    assert report["out"] == len(kept) and report["in"] - report["out"] == sum(report["reasons"].values())
    assert sum(r["source"] == "code" for r in kept) == 4  # code passes untouched
    assert all(quality_reason(r["text"], FilterConfig()) is None for r in kept if r["source"] != "code")
    assert report["removed"] > 0 and report["stage"] == "filter"


def test_filter_stage_resumes_shard_by_shard(tmp_path):
    src = tmp_path / "in"
    for i in range(3):
        write_records(src / f"s{i}.jsonl", [{"id": f"{i}", "text": GOOD}, {"id": f"{i}b", "text": "short"}])
    out = tmp_path / "out"
    first = quality_filter(src, out, workers=1)
    (out / "s1.jsonl").unlink()
    second = quality_filter(src, out, workers=1)
    assert (first["in"], first["out"]) == (second["in"], second["out"]) == (6, 3)
    assert second["resumed_shards"] == 2 and second["reasons"] == {"min_words": 3}
