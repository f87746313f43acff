"""`finetune evaluate`: answer held-out conversations, score the answers, and measure the eval loss.

    finetune evaluate --model DIR [--adapter DIR] --data EVAL.json [--metrics exact,bleu,rouge]
                      [--output DIR] [--batch_size 8] [--max_new_tokens 128]

Each conversation's last assistant turn is the reference; the prompt is everything before it, built
as `finetune chat` builds prompts (finetune/generate.py), and answered greedily in left-padded batches.
The data is read and validated by the training path (`check_data`), so a file that
`finetune check-data` accepts is a file this command reads, images sliced the same way.

Written to --output (default `eval/<model or adapter dir name>-<data file stem>`):
- predictions.jsonl: one line per conversation, `{"id", "prediction", "reference"}`, in file order;
- scores.json: the metrics (finetune/metrics.py, each in [0, 1]), `eval_loss`, the sample count and
  the settings.

`eval_loss` is the training loss on the eval file: the mean cross-entropy per supervised token
(every assistant answer and its end-of-turn token, as training labels them) over the whole file. It
is token-weighted, so unlike the Trainer's `eval_loss` (a mean of per-batch means) it does not depend
on the batch size.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .data.check import check_data
from .data.errors import DataErrors
from .data.formats import IMAGE_MARKER_RE
from .data.images import open_image
from .generate import Chat
from .metrics import METRICS
from .models.minicpmv import IGNORE_INDEX

PREDICTIONS_FILE = "predictions.jsonl"
SCORES_FILE = "scores.json"


def split_reference(record: dict) -> tuple[dict, str]:
    """A canonical record as (prompt record, reference): the reference is its last assistant turn."""
    messages = record["messages"]
    prompt = messages[:-1]
    used = sum(len(IMAGE_MARKER_RE.findall(m["content"])) for m in prompt)
    return {"messages": prompt, "images": list(record["images"])[:used]}, messages[-1]["content"]


@torch.inference_mode()
def generate_answers(chat: Chat, records: list[dict], *, batch_size: int, max_new_tokens: int,
                     progress: bool = True) -> list[str]:
    """Greedy answers to each record's prompt (`split_reference`), in order."""
    answers: list[str] = []
    batches = range(0, len(records), batch_size)
    for start in tqdm(batches, desc="generating", unit="batch", disable=not progress, file=sys.stderr):
        prompts = [split_reference(record)[0] for record in records[start : start + batch_size]]
        answers += chat.generate_batch(prompts, max_new_tokens=max_new_tokens)
    return answers


@torch.inference_mode()
def eval_loss(chat: Chat, records: list[dict], *, batch_size: int, progress: bool = True) -> tuple[float, int]:
    """(mean loss per supervised token, number of supervised tokens) of `records`, encoded, collated and
    scored exactly as training scores them."""
    total, count = 0.0, 0
    batches = range(0, len(records), batch_size)
    for start in tqdm(batches, desc="eval loss", unit="batch", disable=not progress, file=sys.stderr):
        samples = [chat.encoder.encode(record, [open_image(image["path"]) for image in record["images"]])
                   for record in records[start : start + batch_size]]
        batch = {key: value.to(chat.device) for key, value in chat.collator(samples).items()}
        # llava's and 4.6's processors give float pixels (none for a batch without images); 2.x batches
        # carry uint8, which the model normalises itself.
        if batch.get("pixel_values") is not None and batch["pixel_values"].is_floating_point():
            batch["pixel_values"] = batch["pixel_values"].to(chat.model.dtype)
        # num_items_in_batch=1 turns the model's mean into the sum, so the file's mean is exact.
        total += float(chat.model(**batch, num_items_in_batch=1).loss)
        count += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    return total / max(count, 1), count


def evaluate(chat: Chat, records: list[dict], *, metrics: list[str], batch_size: int = 8,
             max_new_tokens: int = 128, progress: bool = True) -> tuple[list[dict], dict]:
    """Predictions (`{"id", "prediction", "reference"}` per record) and scores of `records`.

    Args:
        chat: the model to evaluate.
        records: canonical records (finetune/data/formats.py), each ending with an assistant turn.
        metrics: names in `finetune.metrics.METRICS`.

    Returns:
        (predictions, scores): scores maps each metric to its value, plus `eval_loss`,
        `eval_tokens` and `samples`.
    """
    answers = generate_answers(chat, records, batch_size=batch_size, max_new_tokens=max_new_tokens,
                               progress=progress)
    references = [split_reference(record)[1] for record in records]
    predictions = [{"id": record["id"], "prediction": answer, "reference": reference}
                   for record, answer, reference in zip(records, answers, references)]
    scores: dict = {name: METRICS[name](answers, references) for name in metrics}
    scores["eval_loss"], scores["eval_tokens"] = eval_loss(chat, records, batch_size=batch_size, progress=progress)
    scores["samples"] = len(records)
    return predictions, scores


def format_table(scores: dict) -> str:
    rows = [(key, f"{value:.4f}" if isinstance(value, float) else str(value)) for key, value in scores.items()]
    width = max(len(key) for key, _ in rows)
    return "\n".join([f"{'metric':<{width}}  value", f"{'-' * width}  ------"] +
                     [f"{key:<{width}}  {value}" for key, value in rows])


def evaluate_main(argv: list[str]) -> int:
    """`finetune evaluate`; returns the exit status (2 for unusable data or arguments)."""
    parser = argparse.ArgumentParser(prog="finetune evaluate", description="score a model on held-out conversations")
    parser.add_argument("--model", required=True, help="model directory (base, full fine-tune or merged)")
    parser.add_argument("--adapter", default=None, help="LoRA adapter directory to apply on --model")
    parser.add_argument("--data", required=True, help="held-out .json/.jsonl files, comma-separated")
    parser.add_argument("--metrics", default="exact,bleu,rouge", help=f"comma-separated, of: {', '.join(METRICS)}")
    parser.add_argument("--output", default=None,
                        help="directory for predictions.jsonl and scores.json; default eval/<model>-<data>")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--image_root", default=None, help="directory relative image paths start from")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default: the checkpoint's")
    parser.add_argument("--max_slice_nums", type=int, default=None,
                        help="most slices per image; default: the training run's, else 9")
    args = parser.parse_args(argv)
    metrics = [name.strip() for name in args.metrics.split(",") if name.strip()]
    unknown = [name for name in metrics if name not in METRICS]
    if unknown or not metrics:
        parser.error(f"--metrics {args.metrics!r}: unknown {unknown}; choose from {', '.join(METRICS)}")
    if args.batch_size < 1 or args.max_new_tokens < 1:
        parser.error("--batch_size and --max_new_tokens must be at least 1")
    output = Path(args.output) if args.output else (
        Path("eval") / f"{Path(args.adapter or args.model).resolve().name}-{Path(args.data.split(',')[0]).stem}")

    chat = Chat(args.model, args.adapter, args.dtype, max_slice_nums=args.max_slice_nums)
    report = check_data(args.data, chat.encoder, image_root=args.image_root)
    if report.errors:
        print(f"error: the eval data has problems; nothing was evaluated:\n{DataErrors(report.errors)}",
              file=sys.stderr)
        return 2
    records = list(report.records)
    predictions, scores = evaluate(chat, records, metrics=metrics, batch_size=args.batch_size,
                                   max_new_tokens=args.max_new_tokens)

    output.mkdir(parents=True, exist_ok=True)
    with open(output / PREDICTIONS_FILE, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in predictions)
    summary = {
        "scores": scores,
        "model": str(Path(args.model).resolve()),
        "adapter": str(Path(args.adapter).resolve()) if args.adapter else None,
        "data": args.data,
        "settings": {"max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "decoding": "greedy",
                     "max_slice_nums": chat.encoder.settings.max_slice_nums},
    }
    (output / SCORES_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    print(format_table(scores))
    print(f"\npredictions: {output / PREDICTIONS_FILE}\nscores: {output / SCORES_FILE}")
    return 0


__all__ = ["eval_loss", "evaluate", "evaluate_main", "format_table", "generate_answers", "split_reference"]
