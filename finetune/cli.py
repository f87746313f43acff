"""`finetune <command>`: the one place that turns errors in the user's input into messages and exit codes.

Bad data, bad arguments and unusable model directories end with a message on stderr and exit
status 2, never a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

COMMANDS = {
    "train": "fine-tune a model (arguments: `finetune train --help`)",
    "check-data": "validate a dataset against a model before training",
    "make-tiny": "write a tiny random-weight model for tests and demos",
    "merge": "fold a LoRA adapter into a standalone model directory",
    "chat": "answer a question about images (--interactive: a multi-turn session)",
    "evaluate": "score a model on held-out conversations (exact, BLEU, ROUGE-L, eval loss)",
    "memory": "predict per-GPU and host memory of a training command, before launching it",
}


def _make_tiny(argv: list[str]) -> None:
    from .models.tiny import write_tiny_model

    parser = argparse.ArgumentParser(prog="finetune make-tiny", description=COMMANDS["make-tiny"])
    parser.add_argument("--family", required=True, choices=["2.0", "2.5", "2.6", "llava", "4.6"])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(write_tiny_model(args.family, args.out, seed=args.seed))


def _check_data(argv: list[str]) -> None:
    from .data.check import check_data
    from .data.dataset import DataSettings, load_sample_encoder
    from .data.errors import DataErrors
    from .models.config import detect_family
    from .models.loading import read_config

    parser = argparse.ArgumentParser(prog="finetune check-data", description=COMMANDS["check-data"])
    parser.add_argument("data", help=".json/.jsonl files, comma-separated")
    parser.add_argument("--model", required=True, help="model directory (the family and tokenizer come from it)")
    parser.add_argument("--model_max_length", type=int, default=2048)
    parser.add_argument("--max_slice_nums", type=int, default=9)
    parser.add_argument("--image_root", default=None)
    parser.add_argument("--truncation", choices=["turns", "reject"], default="turns")
    args = parser.parse_args(argv)
    config = read_config(args.model)
    settings = DataSettings(detect_family(config), config.get("query_num", 0), args.max_slice_nums,
                            args.model_max_length, truncate=args.truncation == "turns")
    report = check_data(args.data, load_sample_encoder(args.model, settings), image_root=args.image_root)
    print(report.summary(args.model_max_length, settings.truncate))
    if report.errors:
        raise DataErrors(report.errors)


def _train(argv: list[str]) -> None:
    from .train.recipe import train

    train(argv)


def _merge(argv: list[str]) -> int:
    from .train.merge import merge_main

    return merge_main(argv)


def _chat(argv: list[str]) -> None:
    from .generate import chat_main

    code = chat_main(argv)
    if code:
        raise SystemExit(code)


def _evaluate(argv: list[str]) -> None:
    from .evaluate import evaluate_main

    code = evaluate_main(argv)
    if code:
        raise SystemExit(code)


def _memory(argv: list[str]) -> int:
    from .memory.cli import memory_main

    return memory_main(argv)


def _memory(argv: list[str]) -> int:
    from .memory.cli import memory_main

    return memory_main(argv)


_HANDLERS = {"train": _train, "check-data": _check_data, "make-tiny": _make_tiny, "merge": _merge,
             "chat": _chat, "evaluate": _evaluate, "memory": _memory}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in _HANDLERS:
        print("usage: finetune <command> [args]\n\ncommands:", file=sys.stderr)
        for name, help_text in COMMANDS.items():
            print(f"  {name:<12} {help_text}", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    # Under torchrun every rank runs this; only rank 0 reports progress, all ranks report problems.
    level = logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level)
    from .data.errors import DataErrors
    from .models.config import UnsupportedModelError
    from .models.loading import CheckpointError
    from .models.tokenizer import MissingSpecialTokenError
    from .train.args import ConfigError

    try:
        code = _HANDLERS[argv[0]](argv[1:])
    except DataErrors as errors:
        print(f"error: the data has problems; nothing was trained:\n{errors}", file=sys.stderr)
        return 2
    except (ConfigError, CheckpointError, UnsupportedModelError, MissingSpecialTokenError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return code or 0


__all__ = ["main"]
