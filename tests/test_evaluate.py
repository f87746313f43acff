"""Metrics on hand-made sets with scores worked out by hand, and `finetune evaluate` on the bundled eval file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from finetune.cli import main
from finetune.data.check import check_data
from finetune.data.images import open_image
from finetune.evaluate import PREDICTIONS_FILE, SCORES_FILE, eval_loss, split_reference
from finetune.generate import Chat
from finetune.metrics import bleu, exact_match, normalise, rouge_l, tokenize

SAMPLE_EVAL = Path(__file__).resolve().parents[1] / "finetune" / "data" / "sample" / "eval.json"


def test_tokenize_splits_words_punctuation_and_cjk_characters():
    assert tokenize("A cat, sitting.") == ["a", "cat", ",", "sitting", "."]
    assert tokenize("一只猫 in 2 boxes") == ["一", "只", "猫", "in", "2", "boxes"]


def test_exact_match_normalises_case_and_surrounding_space():
    assert normalise("  A Cat.\n") == "a cat."
    assert exact_match([" A cat. ", "a dog"], ["a CAT.", "a cat"]) == 0.5
    assert exact_match(["a  cat"], ["a cat"]) == 0.0  # inner whitespace is compared as is


def test_identical_texts_score_one_and_disjoint_texts_zero():
    texts = ["the cat sat on the mat", "a red rocket on a launch pad"]
    assert exact_match(texts, texts) == bleu(texts, texts) == rouge_l(texts, texts) == 1.0
    others = ["dogs bark loudly", "green tea"]
    assert exact_match(texts, others) == bleu(texts, others) == rouge_l(texts, others) == 0.0


def test_bleu_worked_example():
    # prediction "the cat sat on the mat" (6 tokens), reference "the cat sat on a mat" (6 tokens)
    # 1-grams: the x2 (clipped to 1), cat, sat, on, mat all match          -> p1 = 5/6
    # 2-grams: the-cat, cat-sat, sat-on match; on-the, the-mat do not     -> p2 = 3/5
    # 3-grams: the-cat-sat, cat-sat-on match; sat-on-the, on-the-mat not  -> p3 = 2/4
    # 4-grams: the-cat-sat-on matches; cat-sat-on-the, sat-on-the-mat not -> p4 = 1/3
    # c = r = 6, so BP = 1; BLEU = (5/6 * 3/5 * 2/4 * 1/3) ** (1/4) = (1/12) ** (1/4) ~ 0.5373
    assert bleu(["the cat sat on the mat"], ["the cat sat on a mat"]) == pytest.approx((1 / 12) ** 0.25)


def test_bleu_brevity_penalty_and_corpus_counts():
    # A prefix of the reference: every n-gram matches (p_n = 1), but c = 4 < r = 6:
    # BP = exp(1 - 6/4) = exp(-0.5).
    assert bleu(["the cat sat on"], ["the cat sat on the mat"]) == pytest.approx(math.exp(-0.5))
    # Corpus BLEU adds counts over sentences before dividing (it is not a mean of sentence BLEUs):
    #   "the cat sat on the mat" / "the cat sat on a mat":  matches (5,3,2,1) of (6,5,4,3)
    #   "a dog runs fast" / "a dog runs fast today":       matches (4,3,2,1) of (4,3,2,1)
    #   totals (9,6,4,2) of (10,8,6,4); c = 10, r = 11, BP = exp(1 - 11/10)
    expected = math.exp(-0.1) * (9 / 10 * 6 / 8 * 4 / 6 * 2 / 4) ** 0.25
    predictions = ["the cat sat on the mat", "a dog runs fast"]
    assert bleu(predictions, ["the cat sat on a mat", "a dog runs fast today"]) == pytest.approx(expected)
    # No matching 4-gram anywhere: 0, unsmoothed, as in the paper.
    assert bleu(["the cat sat"], ["the cat sat"]) == 0.0


def test_rouge_l_worked_example():
    # LCS("the cat sat on the mat", "the cat sat on a mat") = "the cat sat on mat" = 5 tokens;
    # P = 5/6, R = 5/6, F1 = 5/6.
    assert rouge_l(["the cat sat on the mat"], ["the cat sat on a mat"]) == pytest.approx(5 / 6)
    # LCS("a b c d", "a c") = 2: P = 2/4, R = 2/2, F1 = 2 * 0.5 * 1 / 1.5 = 2/3; mean with 1.0 and 0.0.
    score = rouge_l(["a b c d", "same", "x"], ["a c", "same", "y"])
    assert score == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert rouge_l([""], [""]) == 1.0 and rouge_l([""], ["a"]) == 0.0


def test_metrics_refuse_mismatched_lists():
    with pytest.raises(ValueError, match="as many predictions as references"):
        bleu(["a"], ["a", "b"])


def test_split_reference_takes_the_last_answer():
    record = {"id": "x", "images": [{"path": "a.jpg"}, {"path": "b.jpg"}], "messages": [
        {"role": "user", "content": "<image_00>\nWhat is it?"}, {"role": "assistant", "content": "A cat."},
        {"role": "user", "content": "<image_01>\nAnd this?"}, {"role": "assistant", "content": "A dog."}]}
    prompt, reference = split_reference(record)
    assert reference == "A dog."
    assert [m["role"] for m in prompt["messages"]] == ["user", "assistant", "user"]
    assert prompt["images"] == record["images"]


@pytest.mark.parametrize("family", ["2.5", "llava", "4.6"])
def test_eval_loss_is_the_training_loss_per_token_whatever_the_batch_size(family, tiny_model_dir):
    chat = Chat(tiny_model_dir(family), max_slice_nums=1)
    records = list(check_data(str(SAMPLE_EVAL), chat.encoder).records)
    samples = [chat.encoder.encode(r, [open_image(i["path"]) for i in r["images"]]) for r in records]
    with torch.no_grad():  # the training path on one batch of everything: the mean over supervised tokens
        reference = float(chat.model(**chat.collator(samples)).loss)
    loss_1, tokens_1 = eval_loss(chat, records, batch_size=1, progress=False)
    loss_3, tokens_3 = eval_loss(chat, records, batch_size=3, progress=False)
    assert tokens_1 == tokens_3 == sum(int((s["labels"][1:] != -100).sum()) for s in samples)
    # Padding changes float32 summation order only (a mean of per-batch means is 5e-2 off here).
    assert loss_1 == pytest.approx(reference, abs=1e-3) and loss_3 == pytest.approx(reference, abs=1e-3)


def test_evaluate_cli_on_the_bundled_eval_file(tiny_v2_5_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(["evaluate", "--model", str(tiny_v2_5_dir), "--data", str(SAMPLE_EVAL), "--output", str(out),
                 "--batch_size", "4", "--max_new_tokens", "3", "--max_slice_nums", "1"])
    assert code == 0
    expected = json.loads(SAMPLE_EVAL.read_text())
    rows = [json.loads(line) for line in (out / PREDICTIONS_FILE).read_text().splitlines()]
    assert [row["id"] for row in rows] == [sample["id"] for sample in expected]
    assert [row["reference"] for row in rows] == [sample["conversations"][-1]["content"] for sample in expected]
    assert all(isinstance(row["prediction"], str) for row in rows)
    summary = json.loads((out / SCORES_FILE).read_text())
    scores = summary["scores"]
    assert set(scores) == {"exact", "bleu", "rouge", "eval_loss", "eval_tokens", "samples"}
    assert scores["samples"] == len(expected) and scores["eval_tokens"] > 0
    assert all(0.0 <= scores[name] <= 1.0 for name in ("exact", "bleu", "rouge"))
    # A random model is about as good as uniform guessing: loss near log(vocabulary size), 658 tokens.
    assert 0.5 * math.log(658) < scores["eval_loss"] < 2 * math.log(658)
    printed = capsys.readouterr().out
    assert "eval_loss" in printed and str(out / SCORES_FILE) in printed


def test_evaluate_cli_refuses_unknown_metrics(tiny_v2_5_dir):
    with pytest.raises(SystemExit):
        main(["evaluate", "--model", str(tiny_v2_5_dir), "--data", str(SAMPLE_EVAL), "--metrics", "exact,meteor"])
