"""The embedded text: a deterministic, disjoint split by document, big enough for evaluation."""
from __future__ import annotations

import importlib.util

import pytest

from core.texts import embedded_articles, load_text, split_of


def test_split_is_by_document_deterministic_and_disjoint():
    articles = embedded_articles()
    assert len(articles) > 9000
    calib = {t for t, _ in articles if split_of(t) == "calib"}
    evals = {t for t, _ in articles if split_of(t) == "eval"}
    assert calib and evals and not calib & evals and len(calib | evals) == len(articles)
    assert 0.25 < len(evals) / len(articles) < 0.35
    # the split is a function of the title alone, not of the order or the process
    assert [split_of(t) for t, _ in articles[:50]] == [split_of(t) for t, _ in reversed(articles[:50])][::-1]
    eval_text, calib_text = load_text("wiki", split="eval"), load_text(split="calib")
    first_eval = next(x for t, x in articles if t in evals)
    assert first_eval in eval_text and first_eval not in calib_text


@pytest.mark.slow
def test_evaluation_part_holds_at_least_250k_demo_tokens(demo):
    n = len(demo.tokenizer(load_text("wiki", split="eval"))["input_ids"])
    assert n >= 250_000


def test_other_texts_and_bad_names(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("a small text\n\nin two paragraphs", encoding="utf-8")
    assert load_text(str(f)) == load_text(str(f), split="calib") == "a small text\n\nin two paragraphs"
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        load_text(str(tmp_path / "empty.txt"))
    with pytest.raises(FileNotFoundError, match="neither a known dataset"):
        load_text("no-such-corpus")
    with pytest.raises(ValueError, match="split="):
        load_text(split="test")
    if importlib.util.find_spec("datasets") is None:
        with pytest.raises(ValueError, match="needs the 'datasets' library.*embedded text 'wiki' works offline"):
            load_text("wikitext2")
