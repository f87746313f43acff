"""Trainer callbacks for what a user watches: throughput, non-finite steps, the run's record."""

from __future__ import annotations

import json
import logging
import math
import time
from importlib.metadata import version
from pathlib import Path

from transformers import TrainerCallback

logger = logging.getLogger("finetune")


class ThroughputCallback(TrainerCallback):
    """Adds tokens/s and samples/s (whole job, all ranks) to every log line since the previous one."""

    def __init__(self) -> None:
        self._last = None  # (time, step, tokens seen)

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = (time.perf_counter(), state.global_step, state.num_input_tokens_seen)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or self._last is None or "loss" not in logs:
            return
        now = time.perf_counter()
        then, step, tokens = self._last
        elapsed = max(now - then, 1e-9)
        steps = state.global_step - step
        global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        logs["samples_per_second"] = round(steps * global_batch / elapsed, 3)
        logs["tokens_per_second"] = round((state.num_input_tokens_seen - tokens) / elapsed, 1)
        self._last = (now, state.global_step, state.num_input_tokens_seen)


class NonFiniteCallback(TrainerCallback):
    """Reports steps whose loss or gradient norm is not finite.

    Under fp16 the loss scaler (DeepSpeed's or torch's) skips such steps and lowers the scale; this
    makes them visible with their step number instead of a silent gap or a NaN curve.
    """

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs:
            return
        bad = {key: logs[key] for key in ("loss", "grad_norm") if key in logs and not math.isfinite(float(logs[key]))}
        if bad:
            logger.warning("step %d: non-finite %s; under fp16 the loss scaler skips this step", state.global_step,
                           ", ".join(f"{k}={v}" for k, v in bad.items()))


def write_run_record(output_dir: str, arguments: dict) -> None:
    """Writes the resolved configuration and the library versions to output_dir/run_config.json."""
    packages = ("finetune", "torch", "transformers", "peft", "deepspeed", "accelerate", "datasets")
    record = {"versions": {name: _version(name) for name in packages}, "arguments": arguments}
    path = Path(output_dir)
    path.mkdir(parents=True, exist_ok=True)
    (path / "run_config.json").write_text(json.dumps(record, indent=2, default=str) + "\n")


def _version(package: str) -> str | None:
    try:
        return version(package)
    except Exception:
        return None


class SampleGenerationCallback(TrainerCallback):
    """At every evaluation, answers the first few held-out conversations with the model being trained
    and appends them to <output_dir>/eval_generations.jsonl (step, id, prediction, reference).

    Every rank generates (under ZeRO-3 each forward needs all ranks); rank 0 writes.
    """

    def __init__(self, records: list[dict], encoder, collator, max_new_tokens: int = 64) -> None:
        from ..evaluate import split_reference

        self.examples = [split_reference(record) for record in records]
        self.records = records
        self.encoder = encoder
        self.collator = collator
        self.max_new_tokens = max_new_tokens

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        from ..data.images import open_image
        from ..generate import generate_ids

        prompts = [self.encoder.encode_prompt(prompt, [open_image(i["path"]) for i in prompt["images"]])
                   for prompt, _ in self.examples]
        was_training = model.training
        model.eval()
        answers = generate_ids(model, self.collator, self.encoder.tokens, prompts,
                               max_new_tokens=self.max_new_tokens)
        model.train(was_training)
        if state.is_world_process_zero:
            with open(Path(args.output_dir) / "eval_generations.jsonl", "a") as out:
                for record, (_, reference), ids in zip(self.records, self.examples, answers):
                    text = self.encoder.tokenizer.decode(ids, skip_special_tokens=False).strip()
                    out.write(json.dumps({"step": state.global_step, "id": record["id"],
                                          "prediction": text, "reference": reference}) + "\n")

__all__ = ["NonFiniteCallback", "SampleGenerationCallback", "ThroughputCallback", "write_run_record"]
