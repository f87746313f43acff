"""`finetune memory`: will this exact training command fit, and if not, what would.

Put it in front of the training arguments::

    finetune memory --num_gpus 2 --gpu_memory 32 \\
        --model_name_or_path openbmb/MiniCPM-Llama3-V-2_5 --use_lora true --fp16 true \\
        --deepspeed ds_configs/zero2.json --model_max_length 2048 --max_slice_nums 9
    finetune memory --num_gpus 2 --gpu_memory 32 --json ...          # machine-readable
    finetune memory --num_gpus 2 --gpu_memory 32 --pick-profile ...  # prints the cheapest profile that fits

The training arguments are parsed by the same dataclasses as `finetune train` (finetune/train/args.py);
--data_path may be left out. The ZeRO stage and offload come from the --deepspeed profile, the
dtype from --fp16 / --bf16, the batch from --per_device_train_batch_size.

Exit status: 0 when the run fits (or a profile was picked), 1 when it does not, 2 for bad arguments
(raised as ConfigError for `finetune.cli` to report).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from .estimate import MemoryEstimate, Tuning, estimate
from .zero import PROFILE_NAMES, ZeroSettings, profile_path

# Training fields the estimate reads; everything else a training command carries is accepted and ignored.
_TRAINING_FIELDS = ("fp16", "bf16", "deepspeed", "activation_checkpointing", "activation_checkpointing_kwargs",
                    "gradient_checkpointing", "gradient_checkpointing_kwargs", "per_device_train_batch_size")


def _memory_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finetune memory", add_help=False,
        description="Predict per-GPU and host memory of a training command before launching it.",
    )
    parser.add_argument("--num_gpus", type=int, required=True, help="GPUs in the job (data-parallel ranks)")
    parser.add_argument("--gpu_memory", type=float, required=True, help="memory of one GPU in GiB (e.g. 32)")
    parser.add_argument("--cpu_memory", type=float, default=None, help="host memory in GiB (checks offload)")
    parser.add_argument("--json", action="store_true", help="print a JSON object instead of a table")
    parser.add_argument("--pick-profile", "--pick_profile", dest="pick_profile", action="store_true",
                        help="print the path of the cheapest ds_configs profile predicted to fit")
    parser.add_argument("--images_per_sample", type=int, default=1, help="images in the longest sample")
    parser.add_argument("--recipe", choices=["finetune", "reference"], default="finetune",
                        help="'reference': OpenBMB's finetune.py (full logits, eager vision attention)")
    parser.add_argument("-h", "--help", action="store_true")
    return parser


@dataclasses.dataclass
class RunSpec:
    """One training command, reduced to what the estimate needs."""

    model: str
    tuning: Tuning
    model_max_length: int
    max_slice_nums: int
    batch_size: int
    dtype: str
    gradient_checkpointing: bool
    deepspeed: str | dict | None
    vision_attention: str
    checkpoint_every_n_layers: int = 1
    checkpoint_offload: bool = False
    images_per_sample: int = 1

    def estimate(self, num_gpus: int, gpu_memory: float, cpu_memory: float | None, **extra: Any) -> MemoryEstimate:
        kwargs = dict(
            num_gpus=num_gpus, gpu_memory_gib=gpu_memory, cpu_memory_gib=cpu_memory, tuning=self.tuning,
            model_max_length=self.model_max_length, max_slice_nums=self.max_slice_nums,
            batch_size=self.batch_size, dtype=self.dtype, gradient_checkpointing=self.gradient_checkpointing,
            zero=self.deepspeed or "none", vision_attention=self.vision_attention,
            checkpoint_every_n_layers=self.checkpoint_every_n_layers, checkpoint_offload=self.checkpoint_offload,
            images_per_sample=self.images_per_sample,
        )
        kwargs.update(extra)
        return estimate(self.model, **kwargs)


def parse_training_args(argv: list[str]) -> RunSpec:
    """Parses training arguments with finetune.train.args' dataclasses, without building TrainingArguments.

    TrainingArguments would set up devices and the distributed state (and refuse --fp16 without a
    GPU); the memory command only reads a handful of its fields, from the parsed namespace.

    Raises:
        ConfigError: unknown or invalid arguments, listed together as `finetune train` lists them.
    """
    from transformers import HfArgumentParser

    from ..train import args as train_args

    parser = HfArgumentParser(train_args.ARGUMENT_CLASSES)
    parser.add_argument("--config", default=None)
    file_values: dict = {}
    if "--config" in argv:
        at = argv.index("--config")
        file_values = train_args._read_config_file(argv[at + 1])
        argv = argv[:at] + argv[at + 2:]
    parser.set_defaults(output_dir="output/run", **file_values)
    namespace, extra = parser.parse_known_args(argv)
    if extra:
        raise train_args.ConfigError(f"unknown arguments: {' '.join(extra)}")
    values = vars(namespace)

    def build(cls):
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.init and f.name in values})

    model_args = build(train_args.ModelArguments)
    data_args = build(train_args.DataArguments)
    tuning_args = build(train_args.TuningArguments)
    training = SimpleNamespace(**{name: values.get(name) for name in _TRAINING_FIELDS})
    if not data_args.data_path:
        data_args.data_path = "-"  # not read: the estimate needs no data
    train_args.validate_args(model_args, data_args, tuning_args, training)
    return run_spec(model_args, data_args, tuning_args, training)


def run_spec(model_args, data_args, tuning_args, training) -> RunSpec:
    """A RunSpec from parsed training arguments (`training`: TrainingArguments or a namespace of its fields)."""
    dtype = "fp16" if training.fp16 else "bf16" if training.bf16 else "fp32"
    # FinetuneTrainingArguments: checkpointing is on unless turned off under either name; the new
    # name wins (transformers' TrainingArguments.__post_init__).
    checkpointing = getattr(training, "activation_checkpointing", None)
    if checkpointing is None:
        old = getattr(training, "gradient_checkpointing", None)
        checkpointing = True if old is None else old
    ckpt_kwargs = (getattr(training, "activation_checkpointing_kwargs", None)
                   or getattr(training, "gradient_checkpointing_kwargs", None) or {})
    if isinstance(ckpt_kwargs, str):
        ckpt_kwargs = json.loads(ckpt_kwargs)
    deepspeed = training.deepspeed
    if isinstance(deepspeed, str) and not Path(deepspeed).exists():
        if deepspeed not in PROFILE_NAMES:
            from ..train.args import ConfigError

            raise ConfigError(f"--deepspeed {deepspeed}: no such file (shipped profiles: ds_configs/*.json)")
        deepspeed = str(profile_path(deepspeed))
    return RunSpec(
        model=model_args.model_name_or_path,
        tuning=Tuning.from_any(tuning_args),
        model_max_length=data_args.model_max_length,
        max_slice_nums=data_args.max_slice_nums,
        batch_size=int(training.per_device_train_batch_size or 1),
        dtype=dtype,
        gradient_checkpointing=bool(checkpointing),
        deepspeed=deepspeed,
        vision_attention=model_args.attn_implementation,
        checkpoint_every_n_layers=int(ckpt_kwargs.get("every_n_layers", 1) or 1),
        checkpoint_offload=bool(ckpt_kwargs.get("offload", False)),
    )


def pick_profile(run: RunSpec, num_gpus: int, gpu_memory: float, cpu_memory: float | None = None,
                 **extra: Any) -> tuple[Path, MemoryEstimate] | None:
    """The cheapest shipped profile predicted to fit, with its estimate; None when none fits.

    Cheapest = fastest: ZeRO-2 > ZeRO-2 + offload > ZeRO-3 > ZeRO-3 + offload (the order in the
    transformers DeepSpeed guide, "How to choose which ZeRO stage and offloads to use").
    """
    for name in PROFILE_NAMES:
        path = profile_path(name)
        result = run.estimate(num_gpus, gpu_memory, cpu_memory, zero=path, **extra)
        if result.fits:
            return path, result
    return None


def suggestions(run: RunSpec, num_gpus: int, gpu_memory: float, cpu_memory: float | None,
                recipe: str = "finetune") -> list[dict[str, Any]]:
    """Single changes that make a run fit, cheapest first, each re-estimated."""
    options: list[tuple[str, dict[str, Any], dict[str, Any]]] = []  # (flag text, RunSpec changes, estimate kwargs)
    if not run.gradient_checkpointing:
        options.append(("--gradient_checkpointing true", {"gradient_checkpointing": True}, {}))
    if run.batch_size > 1:
        options.append(("--per_device_train_batch_size 1 (raise --gradient_accumulation_steps)",
                        {"batch_size": 1}, {}))
    current = Path(run.deepspeed).stem if run.deepspeed else None
    order = list(PROFILE_NAMES)
    start = order.index(current) + 1 if current in order else 0
    for name in order[start:]:
        options.append((f"--deepspeed {_relative(profile_path(name))}", {"deepspeed": str(profile_path(name))}, {}))
    if run.tuning.tune_llm and not run.tuning.use_lora:
        lora = dataclasses.replace(run.tuning, tune_llm=False, use_lora=True)
        options.append(("--use_lora true --tune_llm false (LoRA instead of full)", {"tuning": lora}, {}))
    for slices in (4, 2, 1):
        if slices < run.max_slice_nums:
            options.append((f"--max_slice_nums {slices}", {"max_slice_nums": slices}, {}))
    for length in (1536, 1024, 768, 512):
        if length < run.model_max_length:
            options.append((f"--model_max_length {length}", {"model_max_length": length}, {}))
    found = []
    seen_kinds = set()
    for text, changes, extra in options:
        kind = text.split()[0]
        if kind in seen_kinds:  # one per kind: the cheapest profile, the largest length / slice count
            continue
        result = dataclasses.replace(run, **changes).estimate(num_gpus, gpu_memory, cpu_memory, recipe=recipe, **extra)
        if result.fits:
            seen_kinds.add(kind)
            found.append({"change": text, "per_gpu_peak_gib": round(result.per_gpu_peak_gib, 2),
                          "host_memory_gib": round(result.host_memory_gib, 1)})
    return found


# How the table names a family ("2.5" reads "MiniCPM-V 2.5").
_MODEL_NAMES = {"llava": "LLaVA"}


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def _relative(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def format_table(result: MemoryEstimate, run: RunSpec, fixes: list[dict[str, Any]] | None) -> str:
    d, i = result.details, result.inputs
    params, tokens = d["parameters"], d["tokens"]
    t = run.tuning
    if t.use_lora:
        what = f"LoRA r={t.lora_r}" + "".join(
            f", {part} trained" for part in ("vpm", "resampler", "embed_tokens") if part in params["trainable_parts"]
        )
    else:
        what = "full: " + ", ".join(p for p in params["trainable_parts"]) if params["trainable_parts"] else "nothing"
    profile = i["deepspeed_profile"]
    lines = [
        f"{_MODEL_NAMES.get(i['family'], 'MiniCPM-V ' + i['family'])} ({run.model}): {what}",
        f"{ZeroSettings.from_profile(run.deepspeed).describe() if run.deepspeed else 'no DeepSpeed (DDP)'}"
        f"{f' ({profile})' if run.deepspeed else ''}, {i['dtype']}, {i['num_gpus']} GPU(s), batch {i['batch_size']}, "
        f"checkpointing {'on' if i['gradient_checkpointing'] else 'off'}",
        f"sequence {tokens['sequence']} tokens ({tokens['image']} image, {tokens['text']} text, "
        f"{tokens['supervised'] if i['logits'] == 'selective' else tokens['sequence']} with logits); "
        f"{tokens['slices']} slices x {tokens['patches_per_slice']} patches",
        f"parameters {params['total'] / 1e9:.2f} B ({params['present_on_gpu_model'] / 1e9:.2f} B with adapters and "
        f"modules_to_save copies), trained {_count(params['trainable'])}",
        "",
        f"{'per GPU':<28}{'GiB':>8}",
    ]
    for key, value in result.breakdown.items():
        lines.append(f"  {key.replace('_', ' '):<26}{value:>8.2f}")
    lines.append(f"  {'-' * 34}")
    verdict = "fits" if result.per_gpu_peak_gib <= i["gpu_memory_gib"] else "does NOT fit"
    spare = i["gpu_memory_gib"] - result.per_gpu_peak_gib
    lines.append(f"  {'peak':<26}{result.per_gpu_peak_gib:>8.2f}   of {i['gpu_memory_gib']:g} GiB: {verdict} "
                 f"({'%.1f GiB spare' % spare if spare >= 0 else '%.1f GiB short' % -spare})")
    host = f"host memory {result.host_memory_gib:.1f} GiB (all ranks; loading peaks at {d['host_load_peak_gib']} GiB)"
    if result.host_fits is not None:
        host += f" of {i['cpu_memory_gib']:g} GiB: {'fits' if result.host_fits else 'does NOT fit'}"
    lines += [host, f"peak phase: {d['peak_phase']}"]
    lines += [f"note: {note}" for note in d["notes"]]
    if fixes is not None:
        if fixes:
            lines.append("changes that make it fit (cheapest first):")
            lines += [f"  {f['change']:<60} {f['per_gpu_peak_gib']:>6.2f} GiB" for f in fixes]
        else:
            lines.append("no single change makes it fit; try --deepspeed ds_configs/zero3_offload.json with LoRA")
    return "\n".join(lines)


def memory_main(argv: list[str]) -> int:
    """`finetune memory [--num_gpus N --gpu_memory GiB ...] <training arguments>`; returns the exit status.

    Raises:
        ConfigError: invalid training arguments (finetune.cli prints it and exits 2).
    """
    own, rest = _memory_parser().parse_known_args(argv)
    if own.help:
        print(__doc__)
        return 0
    if own.num_gpus < 1 or own.gpu_memory <= 0 or own.images_per_sample < 1:
        from ..train.args import ConfigError

        raise ConfigError("--num_gpus and --images_per_sample must be at least 1 and --gpu_memory positive, got "
                          f"{own.num_gpus}, {own.images_per_sample} and {own.gpu_memory:g}")
    run = dataclasses.replace(parse_training_args(rest), images_per_sample=own.images_per_sample)
    if own.pick_profile:
        picked = pick_profile(run, own.num_gpus, own.gpu_memory, own.cpu_memory, recipe=own.recipe)
        if picked is None:
            print(f"no profile in ds_configs fits {own.num_gpus} x {own.gpu_memory:g} GiB; "
                  "run `finetune memory` without --pick-profile for what would", file=sys.stderr)
            return 1
        print(picked[0])
        return 0
    result = run.estimate(own.num_gpus, own.gpu_memory, own.cpu_memory, recipe=own.recipe)
    fixes = None if result.fits else suggestions(run, own.num_gpus, own.gpu_memory, own.cpu_memory, own.recipe)
    if own.json:
        payload = result.to_json()
        if fixes is not None:
            payload["suggestions"] = fixes
        print(json.dumps(payload, indent=2, default=str))
    else:
        print(format_table(result, run, fixes))
    return 0 if result.fits else 1


def main() -> int:  # python -m finetune.memory.cli (finetune.cli does the same for `finetune memory`)
    from ..models.loading import CheckpointError
    from ..train.args import ConfigError

    try:
        return memory_main(sys.argv[1:])
    except (ConfigError, CheckpointError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["RunSpec", "memory_main", "parse_training_args", "pick_profile", "run_spec", "suggestions"]
