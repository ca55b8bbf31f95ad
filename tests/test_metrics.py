"""BLEU-4 / ROUGE against values computed by hand (the arithmetic is in the comments)."""
from __future__ import annotations

import pytest

from chatglm_ft import metrics
from chatglm_ft.metrics import corpus_bleu4, language, rouge_f1, score_corpus, score_sample, segment, sentence_bleu4

CAT_HYP = "the cat sat on the mat".split()
CAT_REF = "the cat is on the mat".split()


def test_sentence_bleu_by_hand():
    # hyp "the cat sat on the mat" vs ref "the cat is on the mat" (6 words each, brevity penalty 1):
    #   1-grams: the x2, cat, on, mat match (sat does not)   5/6
    #   2-grams: "the cat", "on the", "the mat"              3/5
    #   3-grams: "on the mat"                                1/4
    #   4-grams: none of 3 -> method3 smoothing 1/(2^1 * 3)  1/6
    # BLEU = (5/6 * 3/5 * 1/4 * 1/6) ** (1/4) = (1/48) ** 0.25 = 0.379918 -> 37.9918
    assert sentence_bleu4([CAT_REF], CAT_HYP) == pytest.approx(37.9918, abs=1e-4)


def test_sentence_bleu_chinese_characters_by_hand():
    # hyp 我爱北京 vs ref 我爱上海 as characters: 1-grams 我,爱 match 2/4; 2-grams 我爱 1/3;
    # 3-grams 0/2 -> 1/(2*2); 4-grams 0/1 -> 1/(4*1).  (1/2 * 1/3 * 1/4 * 1/4) ** 0.25 = (1/96) ** 0.25
    hyp = segment("我爱北京", view="char", lang="zh")
    ref = segment("我爱上海", view="char", lang="zh")
    assert hyp == ["我", "爱", "北", "京"]
    assert sentence_bleu4([ref], hyp) == pytest.approx(100 * (1 / 96) ** 0.25, abs=1e-6)  # 31.9472


def test_sentence_bleu_multi_reference_by_hand():
    # hyp "a b c d", refs "a b x y" and "x b c d": n-grams are clipped by the best reference:
    #   1-grams 4/4, 2-grams ab (ref 1), bc, cd (ref 2) 3/3, 3-grams bcd only 1/2,
    #   4-grams 0/1 -> 1/2 (method3). Closest reference length 4 = hyp length: BP 1.
    #   (1 * 1 * 1/2 * 1/2) ** 0.25 = 0.707107
    refs = ["a b x y".split(), "x b c d".split()]
    assert sentence_bleu4(refs, "a b c d".split()) == pytest.approx(70.7107, abs=1e-4)
    # With either reference alone the score is lower: scoring against all of them matters.
    assert all(sentence_bleu4([r], "a b c d".split()) < 70 for r in refs)


def test_corpus_bleu_pools_counts_by_hand():
    # sample 1: "a b c d" vs itself: n-gram matches 4/4, 3/3, 2/2, 1/1
    # sample 2: "a b" vs "a c": 1/2, 0/1, and no 3- or 4-grams (nltk counts a denominator of 1 then: 0/1, 0/1)
    # pooled: 5/6, 3/4, 2/3, 1/2; lengths 6 vs 6, BP 1.  (5/6 * 3/4 * 2/3 * 1/2) ** 0.25 = (5/24) ** 0.25
    value = corpus_bleu4([["a b c d".split()], ["a c".split()]], ["a b c d".split(), "a b".split()])
    assert value == pytest.approx(100 * (5 / 24) ** 0.25, abs=1e-6)  # 67.5600


def test_rouge_by_hand():
    # rouge-chinese counts DISTINCT n-grams (as the official ChatGLM evaluation uses it):
    #   1-grams hyp {the,cat,sat,on,mat} 5, ref {the,cat,is,on,mat} 5, common 4: P = R = F = 0.8
    #   2-grams hyp 5, ref 5, common {the cat, on the, the mat} 3: F = 0.6
    #   L: LCS "the cat on the mat" = 5 of 6 words each side: F = 5/6
    scores = rouge_f1([CAT_REF], CAT_HYP)
    assert scores["rouge-1"] == pytest.approx(80.0, abs=1e-5)
    assert scores["rouge-2"] == pytest.approx(60.0, abs=1e-5)
    assert scores["rouge-l"] == pytest.approx(500 / 6, abs=1e-5)


def test_rouge_on_jieba_words_and_best_reference_by_hand():
    hyp = segment("我爱北京天安门", view="word", lang="zh")
    assert hyp == ["我", "爱", "北京", "天安门"]
    # vs 我/爱/上海: common {我, 爱}: P = 2/4, R = 2/3, F = 2PR/(P+R) = 4/7
    one = rouge_f1([segment("我爱上海", view="word", lang="zh")], hyp)
    assert one["rouge-1"] == pytest.approx(400 / 7, abs=1e-5)
    # adding reference 我/爱/北京: 1-grams P = 3/4, R = 1 -> F = 6/7; 2-grams {我爱, 爱北京} of 3 -> P 2/3, R 1, F 0.8
    both = rouge_f1([segment("我爱上海", view="word", lang="zh"), segment("我爱北京", view="word", lang="zh")], hyp)
    assert both["rouge-1"] == pytest.approx(600 / 7, abs=1e-5)
    assert both["rouge-2"] == pytest.approx(80.0, abs=1e-5)


def test_language_and_views():
    assert language("我是个自卑的孩子") == "zh"
    assert language("The capital of China is 北京.") == "en"
    assert language("") == "en"
    assert segment("the  cat\nsat", view="char", lang="en") == ["the", "cat", "sat"]  # English: whitespace words
    assert segment("你 好", view="char", lang="zh") == ["你", "好"]
    with pytest.raises(ValueError):
        segment("x", view="bpe", lang="en")


def test_empty_prediction_scores_zero_and_language_comes_from_references():
    scores = score_sample("", ["我爱北京"])
    assert scores["lang"] == "zh"
    assert all(v == 0.0 for view in ("word", "char") for v in scores[view].values())
    assert score_sample("the cat sat on the mat", ["the cat is on the mat"])["word"]["bleu-4"] == pytest.approx(37.9918, abs=1e-4)


def test_score_corpus_summary_and_parallel_equal_serial(monkeypatch):
    predictions = ["the cat sat on the mat", "我爱北京天安门", "", "a b c d"]
    references = [["the cat is on the mat"], ["我爱上海", "我爱北京"], ["hello"], ["a b x y", "x b c d"]]
    serial, summary = score_corpus(predictions, references, workers=1)
    assert summary["samples"] == 4
    assert summary["word"]["bleu-4"] == pytest.approx(sum(s["word"]["bleu-4"] for s in serial) / 4)
    assert summary["word"]["rouge-1"] == pytest.approx((80.0 + 600 / 7 + 0.0 + serial[3]["word"]["rouge-1"]) / 4, abs=1e-5)
    monkeypatch.setattr(metrics, "PARALLEL_MIN_SAMPLES", 1)
    parallel, parallel_summary = score_corpus(predictions, references, workers=2)
    assert parallel == serial and parallel_summary == summary
    with pytest.raises(ValueError):
        score_corpus(["x"], [])


def test_exact_match_beside_bleu_for_exact_tasks():
    # the demo's task: short exact answers, where BLEU-4 stays far below 100 even when every answer is right
    predictions = ["三个红苹果", "two blue cats ", "五本黄书"]
    references = [["三个红苹果"], ["two blue cats"], ["五本绿书", "五本黄书"]]
    per_sample, summary = score_corpus(predictions, references, workers=1)
    assert [s["exact-match"] for s in per_sample] == [100.0, 100.0, 100.0] and summary["exact-match"] == 100.0
    assert summary["word"]["bleu-4"] < 100  # why BLEU alone misleads here
    _, summary = score_corpus(["三个红苹果", "two blue cat"], [["三个红苹果"], ["two blue cats"]], workers=1)
    assert summary["exact-match"] == 50.0
    assert score_sample("x", ["x"])["exact-match"] == 100.0
