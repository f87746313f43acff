"""Per-GPU peak memory of one training run, from the model's parameter counts and the run's arguments.

The model, in one screen (docs/memory.md has the derivation and every source):

    peak = weights + gradients + optimizer states + CUDA context          (held for the whole run)
         + max over the step's phases of the transient memory x TRANSIENT_OVERHEAD
           (loss: checkpoints + logits; a decoder layer's recompute + backward; the vision
            encoder's backward; the embedding gradient; DeepSpeed's gradient buckets and, under
            ZeRO-3, the gathered parameters)
         + the optimizer step's own transients (ZeRO-1/2 without offload: flat gradient + its fp32
           copy, and the all-gather bucket), which land in fresh allocator blocks.

Weights are replicated under ZeRO-0/1/2 and partitioned (or offloaded) under ZeRO-3; gradients and
optimizer states are partitioned from stage 2 (1 for optimizer states) or offloaded to the host.
Activations come from per-token coefficients measured at the real layer widths (constants.py).

Everything here is arithmetic on a `ModelCounts`; only `count_model` (counts.py) touches torch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal

from . import constants as C
from .counts import ModelCounts, count_model
from .zero import ZeroSettings

Dtype = Literal["fp16", "bf16", "fp32"]
Recipe = Literal["finetune", "reference"]
BREAKDOWN_KEYS = (
    "weights", "gradients", "optimizer_states", "activations", "vision_encoder", "logits", "buffers_and_workspace",
)

# Mirrors finetune/train/args.py (kept literal so this module imports without transformers).
DEFAULT_LORA_TARGETS = r"llm\..*layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"
VISION_LORA_TARGETS = r"vpm\..*(self_attn\.(q_proj|k_proj|v_proj|out_proj)|attn\.(qkv|proj))"
# `--tune_embeddings new_tokens` trains the rows of the special tokens (train/trainable.py
# added_token_ids): image, slice and unk tokens, plus 2.6's image-id tokens; llava has only its image token.
NEW_TOKEN_ROWS = {"2.0": 5, "2.5": 5, "2.6": 7, "llava": 1, "4.6": 7}


@dataclass(frozen=True)
class Tuning:
    """What is trained: the fields of `finetune.train.args.TuningArguments`, with the same defaults."""

    tune_llm: bool = False
    tune_vision: bool = False
    tune_resampler: bool | None = None  # None: not with LoRA, yes otherwise (as TuningArguments)
    tune_embeddings: Literal["none", "new_tokens", "full"] = "none"
    use_lora: bool = False
    lora_r: int = 64
    lora_target_modules: str = DEFAULT_LORA_TARGETS
    lora_on_vision: bool = False

    def __post_init__(self) -> None:
        if self.tune_resampler is None:
            object.__setattr__(self, "tune_resampler", not self.use_lora)

    @classmethod
    def from_any(cls, tuning: Any) -> Tuning:
        """Accepts a Tuning, a TuningArguments (or any dataclass with these fields), a dict or None."""
        if tuning is None:
            return cls()
        if isinstance(tuning, cls):
            return tuning
        values = asdict(tuning) if is_dataclass(tuning) else dict(tuning)
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def lora_targets(self, llm_default: str = DEFAULT_LORA_TARGETS,
                     vision: str = VISION_LORA_TARGETS) -> str | list[str]:
        """The target spec peft receives (same rule as train/trainable.py `_lora_targets`): the flag's
        default stands for the family's `llm_default`, --lora_on_vision adds `vision`."""
        targets = self.lora_target_modules
        if "," in targets or targets.isidentifier():
            return [name.strip() for name in targets.split(",") if name.strip()]
        if targets == DEFAULT_LORA_TARGETS:
            targets = llm_default
        if self.lora_on_vision:
            targets = f"({targets})|({vision})"
        return targets


@dataclass(frozen=True)
class TrainPlan:
    """Which parameters exist and train, and how gradients flow through each part."""

    present: int  # parameters on the GPU model: base + LoRA + modules_to_save copies
    trainable: int
    trainable_parts: dict[str, int]
    copies: dict[str, int]  # peft modules_to_save: a trainable copy beside the frozen original
    llm_mode: Literal["full", "lora", "frozen", "none"]
    vision_mode: Literal["full", "frozen", "no_grad"]
    resampler_mode: Literal["full", "no_grad"]
    lora_inputs_per_layer: tuple[int, ...]  # in_features of each LoRA-wrapped Linear in one LLM layer
    lora_rank: int


def plan_training(counts: ModelCounts, tuning: Tuning, recipe: Recipe = "finetune") -> TrainPlan:
    """What `apply_tuning` (recipe "finetune") or the reference recipe trains, counted.

    recipe "reference" is OpenBMB/MiniCPM-V finetune/finetune.py as it was when its memory tables
    were measured (May-June 2024): LoRA freezes everything but the adapters (peft), then re-enables
    the input embedding in place; the vision encoder and resampler stay frozen whatever --tune_vision
    says (OpenBMB/MiniCPM-V#243; modules_to_save copies came in July 2024). Full training trains
    what --tune_llm / --tune_vision select plus, always, the resampler.
    """
    p = dict(counts.parts)
    trainable: dict[str, int] = {}
    copies: dict[str, int] = {}
    lora = 0
    lora_inputs: tuple[int, ...] = ()
    if tuning.use_lora:
        defaults = counts.lora_defaults or ()
        targets = tuning.lora_targets(*defaults) if recipe == "finetune" else tuning.lora_target_modules
        lora = counts.lora_parameters(targets, tuning.lora_r)
        trainable["lora"] = lora
        lora_inputs = _layer0_lora_inputs(counts, targets)
        if recipe == "reference":
            trainable["embed_tokens"] = p["embed_tokens"]
        else:
            for part, on in (("vpm", tuning.tune_vision), ("resampler", tuning.tune_resampler),
                             ("embed_tokens", tuning.tune_embeddings == "full")):
                if on:
                    copies[part] = p[part]
                    trainable[part] = p[part] - (counts.never_trained if part == "resampler" else 0)
            if tuning.tune_embeddings == "new_tokens":
                trainable["new_token_rows"] = NEW_TOKEN_ROWS.get(counts.family, 7) * counts.hidden_size
    else:
        if tuning.tune_llm:
            for part in ("embed_tokens", "llm_layers", "lm_head"):
                trainable[part] = p[part]
        if tuning.tune_vision:
            trainable["vpm"] = p["vpm"]
        if tuning.tune_resampler or recipe == "reference":
            trainable["resampler"] = p["resampler"] - counts.never_trained
        if tuning.tune_embeddings == "full":
            trainable["embed_tokens"] = p["embed_tokens"]
    vision_lora = tuning.use_lora and recipe == "finetune" and tuning.lora_on_vision and isinstance(
        tuning.lora_targets(), str
    )
    vision_mode = "full" if "vpm" in trainable else ("frozen" if vision_lora else "no_grad")
    resampler_mode = "full" if ("resampler" in trainable or vision_mode != "no_grad") else "no_grad"
    below_llm_trains = vision_mode != "no_grad" or resampler_mode == "full" or "embed_tokens" in trainable \
        or "new_token_rows" in trainable
    if "llm_layers" in trainable:
        llm_mode = "full"
    elif lora_inputs:
        llm_mode = "lora"
    else:
        llm_mode = "frozen" if below_llm_trains else "none"
    return TrainPlan(
        present=counts.total + lora + sum(copies.values()) + trainable.get("new_token_rows", 0),
        trainable=sum(trainable.values()),
        trainable_parts=trainable,
        copies=copies,
        llm_mode=llm_mode,
        vision_mode=vision_mode,
        resampler_mode=resampler_mode,
        lora_inputs_per_layer=lora_inputs,
        lora_rank=tuning.lora_r,
    )


def _layer0_lora_inputs(counts: ModelCounts, targets: str | list[str]) -> tuple[int, ...]:
    import re

    layer0 = [s for s in counts.linears if re.search(rf"^{re.escape(counts.llm_prefix)}.*layers\.0\.", s.name)]
    if isinstance(targets, str):
        pattern = re.compile(targets)
        hits = [s for s in layer0 if pattern.fullmatch(s.name)]
    else:
        hits = [s for s in layer0 if any(s.name == t or s.name.endswith("." + t) for t in targets)]
    return tuple(s.in_features for s in hits)


@dataclass
class MemoryEstimate:
    """The prediction for one run. Sizes are GiB per GPU unless named host_*.

    `breakdown` sums to `per_gpu_peak_gib`. Terms held for the whole run (weights, gradients,
    optimizer states) are as allocated; the transient terms (activations, vision_encoder, logits)
    are those of the phase that sets the peak, with the allocator overhead included, and
    buffers_and_workspace holds DeepSpeed's buckets, gathered ZeRO-3 parameters and the CUDA context.
    """

    per_gpu_peak_gib: float
    fits: bool
    host_memory_gib: float
    host_fits: bool | None
    breakdown: dict[str, float]
    inputs: dict[str, Any]
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "per_gpu_peak_gib": round(self.per_gpu_peak_gib, 2),
            "fits": self.fits,
            "host_memory_gib": round(self.host_memory_gib, 1),
            "host_fits": self.host_fits,
            "breakdown": {k: round(v, 2) for k, v in self.breakdown.items()},
            "inputs": self.inputs,
            "details": self.details,
        }


def image_tokens(counts: ModelCounts, max_slice_nums: int, images_per_sample: int) -> tuple[int, int]:
    """(slices, placeholder tokens) of `images_per_sample` images sliced to the most slices (or, for a
    model without slicing, each image whole: query_num tokens, no tags)."""
    if not counts.slicing:
        return images_per_sample, images_per_sample * counts.query_num
    slices = images_per_sample * (1 + max_slice_nums)
    return slices, slices * (counts.query_num + C.TAG_TOKENS_PER_SLICE)


def estimate(
    model_config_or_dir: str | Path | dict | ModelCounts,
    *,
    num_gpus: int,
    gpu_memory_gib: float,
    cpu_memory_gib: float | None = None,
    tuning: Any = None,
    model_max_length: int = 2048,
    max_slice_nums: int = 9,
    batch_size: int = 1,
    dtype: Dtype = "bf16",
    zero_stage: int | None = None,
    offload_optimizer: bool | None = None,
    offload_param: bool | None = None,
    gradient_checkpointing: bool = True,
    zero: ZeroSettings | str | Path | dict | None = None,
    recipe: Recipe = "finetune",
    logits: Literal["selective", "full"] | None = None,
    vision_attention: Literal["sdpa", "eager", "flash_attention_2"] | None = None,
    images_per_sample: int = 1,
    supervised_fraction: float = C.SUPERVISED_FRACTION,
    checkpoint_every_n_layers: int = 1,
    checkpoint_offload: bool = False,
) -> MemoryEstimate:
    """Predicts per-GPU peak memory and host memory of one training run.

    Args:
        model_config_or_dir: a model directory (config.json), a config dict or `count_model`'s result.
        num_gpus: data-parallel world size (ZeRO partitions over it).
        gpu_memory_gib / cpu_memory_gib: memory of one GPU, and of the host (all ranks), to judge fit.
        tuning: TuningArguments (or a dict / `Tuning`) - what is trained.
        model_max_length, max_slice_nums, batch_size: the data arguments; the estimate is for the
            worst case, a batch of samples `model_max_length` long whose images all have the most slices.
        dtype: compute dtype ("fp16", "bf16", "fp32").
        zero_stage / offload_optimizer / offload_param: ZeRO settings; or `zero`, a DeepSpeed profile
            (path, shipped profile name, dict or ZeroSettings) whose buckets are also used.
            `zero_stage=0` without a profile is DeepSpeed's stage 0; `zero="none"` is plain DDP.
        gradient_checkpointing: recompute activations in the backward (language model and vision).
        checkpoint_every_n_layers / checkpoint_offload: `activation_checkpointing_kwargs`'s
            every_n_layers (only every n-th layer is checkpointed, the rest keep their activations)
            and offload (checkpointed layer inputs are held in host memory).
        recipe: "finetune" (this toolkit) or "reference" (OpenBMB's finetune.py, for calibration):
            sets what trains (see `plan_training`), the logits (selective / full) and the vision
            attention kernel (sdpa / eager) unless `logits` / `vision_attention` say otherwise.
        images_per_sample: images in the longest sample (the reference data has one).
        supervised_fraction: share of text tokens with labels (selective logits only).

    Returns:
        MemoryEstimate.

    Raises:
        ValueError: for impossible settings (names the argument).
    """
    counts = count_model(model_config_or_dir)
    settings = _zero_settings(zero, zero_stage, offload_optimizer, offload_param)
    tune = Tuning.from_any(tuning)
    problems = []
    if num_gpus < 1:
        problems.append(f"num_gpus must be at least 1, got {num_gpus}")
    if dtype not in C.BYTES_PER_DTYPE:
        problems.append(f"dtype must be one of {', '.join(C.BYTES_PER_DTYPE)}, got {dtype!r}")
    if batch_size < 1 or model_max_length < 1 or max_slice_nums < 0:
        problems.append("batch_size, model_max_length must be positive and max_slice_nums non-negative")
    if problems:
        raise ValueError("; ".join(problems))
    logits = logits or ("full" if recipe == "reference" else "selective")
    vision_attention = vision_attention or ("eager" if recipe == "reference" else "sdpa")
    plan = plan_training(counts, tune, recipe)
    n = num_gpus
    bpe = C.BYTES_PER_DTYPE[dtype]
    act_scale = bpe / 2  # activation coefficients are measured in bf16
    mixed = dtype != "fp32"
    h = counts.hidden_size
    notes: list[str] = []

    # -- tokens --------------------------------------------------------------------------------
    slices, img_tokens = image_tokens(counts, max_slice_nums, images_per_sample)
    seq = model_max_length
    if img_tokens >= seq:
        notes.append(
            f"{images_per_sample} image(s) at max_slice_nums={max_slice_nums} take {img_tokens} tokens, "
            f"not less than model_max_length={seq}: such samples are cut or refused"
        )
    text_tokens = max(seq - img_tokens, 1)
    supervised = max(1, math.ceil(supervised_fraction * text_tokens))
    patches = (counts.scale_resolution // counts.patch_size) ** 2

    # -- held for the whole run ----------------------------------------------------------------
    if settings.deepspeed:
        w_bytes = bpe  # the DeepSpeed engine casts the module to fp16/bf16
        if settings.stage == 3:
            small = counts.params_at_most(int(settings.persistence_threshold(h)))
            weights = small * w_bytes + (0 if settings.offload_param else (plan.present - small) * w_bytes / n)
        else:
            weights = plan.present * w_bytes
        grad_div = n if settings.stage >= 2 else 1
        gradients = 0.0 if (settings.offload_optimizer and settings.stage >= 2) else plan.trainable * bpe / grad_div
        opt_div = n if settings.stage >= 1 else 1
        adam = C.ADAM_BYTES_MIXED if mixed else C.ADAM_BYTES_FP32
        optimizer = 0.0 if settings.offload_optimizer else plan.trainable * adam / opt_div
    else:
        # torch AMP: fp16 autocast keeps fp32 weights (GradScaler needs them); bf16 trains in bf16.
        w_bytes = 4 if dtype in ("fp16", "fp32") else 2
        weights = plan.present * w_bytes
        gradients = plan.trainable * w_bytes
        optimizer = plan.trainable * 2 * w_bytes  # AdamW exp_avg and exp_avg_sq in the weights' dtype

    # -- transients of the step's phases (allocated bytes) --------------------------------------
    ckpt = _Checkpointing(gradient_checkpointing, max(1, checkpoint_every_n_layers), checkpoint_offload)
    act = _activations(counts, plan, seq, batch_size, act_scale, bpe, ckpt)
    # The reference recipe's resampler (trained in its full fine-tuning) was not checkpointed.
    vis = _vision(counts, plan, slices * batch_size, patches, act_scale, bpe, ckpt, vision_attention,
                  checkpoint_resampler=gradient_checkpointing and recipe == "finetune")
    if logits == "selective":
        logits_peak = C.CHUNK_LOGITS_COPIES * math.ceil(batch_size * supervised / C.LOSS_CHUNKS) * counts.vocab_size * 4
        if counts.forward_logits:  # the class's own logits at every position, gone before the chunks
            logits_peak = max(logits_peak, batch_size * seq * counts.vocab_size * bpe)
    else:
        logits_peak = C.LOGITS_COPIES * batch_size * seq * counts.vocab_size * 4
    lm_head_grad = counts.parts["lm_head"] * bpe if "lm_head" in plan.trainable_parts else 0
    embed_trained = "embed_tokens" in plan.trainable_parts
    embed_grad = counts.parts["embed_tokens"] * bpe if embed_trained else 0
    buckets, gathered = _deepspeed_buffers(counts, plan, settings, bpe, n)

    phases = {
        "vision forward": {"vision_encoder": vis["stored"] + vis["forward"]},
        "loss": {"activations": act["stored"], "vision_encoder": vis["stored"] + vis["resampler_saved"],
                 "logits": logits_peak + lm_head_grad},
        "decoder layer backward": {"activations": act["stored"] + act["layer"],
                                   "vision_encoder": vis["stored"] + vis["resampler_saved"]},
        "resampler backward": {"vision_encoder": vis["stored"] + vis["resampler_peak"]},
        "vision backward": {"vision_encoder": vis["stored"] + vis["layer"]},
        "embedding gradient": {"activations": embed_grad + batch_size * seq * h * bpe},
    }
    backward_phases = set(phases) - {"vision forward"}
    totals = {
        name: sum(parts.values()) + (buckets if name in backward_phases else 0) + gathered
        for name, parts in phases.items()
    }
    peak_phase = max(totals, key=totals.get)
    overhead = C.TRANSIENT_OVERHEAD

    # -- the optimizer step (after the backward; activations are gone) --------------------------
    # Its tensors are the size of the whole gradient partition and land in fresh allocator blocks:
    # the blocks the backward freed are smaller and stay reserved (constants.TRANSIENT_OVERHEAD).
    step_grads = step_buffers = 0.0
    if settings.deepspeed and not settings.offload_optimizer:
        per_rank = plan.trainable / (n if settings.stage >= 1 else 1)
        if settings.stage in (0, 1, 2):
            step_grads = per_rank * (bpe + C.STEP_FP32_GRAD_BYTES)
            if settings.stage >= 1:
                step_buffers = settings.allgather_bucket(h) * bpe
        else:
            step_grads = min(settings.sub_group_size, per_rank) * C.STEP_FP32_GRAD_BYTES

    context = C.CUDA_CONTEXT_GIB * C.GIB
    transient = totals[peak_phase] * overhead
    peak = weights + gradients + optimizer + context + transient + step_grads + step_buffers
    chosen = phases[peak_phase]
    breakdown = {
        "weights": weights,
        "gradients": gradients + step_grads,
        "optimizer_states": optimizer,
        "activations": chosen.get("activations", 0) * overhead,
        "vision_encoder": chosen.get("vision_encoder", 0) * overhead,
        "logits": chosen.get("logits", 0) * overhead,
    }
    # DeepSpeed's buckets and gathered parameters (with their share of the overhead) and the context.
    breakdown["buffers_and_workspace"] = peak - sum(breakdown.values())
    breakdown = {k: v / C.GIB for k, v in breakdown.items()}

    # -- host ------------------------------------------------------------------------------------
    host = n * C.HOST_PROCESS_GIB * C.GIB
    if settings.offload_optimizer:
        host += plan.trainable * C.HOST_OPTIMIZER_BYTES
    if settings.offload_param:
        host += plan.present * w_bytes
    # Loading: every rank reads the whole model into host memory before the engine moves or
    # partitions it; under ZeRO-3 transformers loads through zero.Init, one partition per rank.
    load_peak = n * C.HOST_PROCESS_GIB * C.GIB + (
        counts.total * w_bytes if settings.stage == 3 and settings.deepspeed else n * counts.total * w_bytes
    )
    host_gib = host / C.GIB
    host_fits = None if cpu_memory_gib is None else max(host, load_peak) / C.GIB <= cpu_memory_gib
    peak_gib = peak / C.GIB
    return MemoryEstimate(
        per_gpu_peak_gib=peak_gib,
        fits=peak_gib <= gpu_memory_gib and host_fits is not False,
        host_memory_gib=host_gib,
        host_fits=host_fits,
        breakdown=breakdown,
        inputs={
            "family": counts.family, "num_gpus": n, "gpu_memory_gib": gpu_memory_gib, "cpu_memory_gib": cpu_memory_gib,
            "tuning": asdict(tune), "recipe": recipe, "model_max_length": model_max_length,
            "max_slice_nums": max_slice_nums, "batch_size": batch_size, "images_per_sample": images_per_sample,
            "checkpoint_every_n_layers": checkpoint_every_n_layers, "checkpoint_offload": checkpoint_offload,
            "dtype": dtype, "zero_stage": settings.stage if settings.deepspeed else None,
            "offload_optimizer": settings.offload_optimizer, "offload_param": settings.offload_param,
            "deepspeed_profile": settings.name, "gradient_checkpointing": gradient_checkpointing,
            "logits": logits, "vision_attention": vision_attention, "supervised_fraction": supervised_fraction,
        },
        details={
            "parameters": {"total": counts.total, **counts.parts, "present_on_gpu_model": plan.present,
                           "trainable": plan.trainable, "trainable_parts": plan.trainable_parts,
                           "modules_to_save_copies": plan.copies},
            "modes": {"llm": plan.llm_mode, "vision": plan.vision_mode, "resampler": plan.resampler_mode},
            "tokens": {"sequence": seq, "image": img_tokens, "text": text_tokens, "supervised": supervised,
                       "slices": slices * batch_size, "patches_per_slice": patches},
            "peak_phase": peak_phase,
            "phases_gib": {k: round(v / C.GIB, 2) for k, v in totals.items()},
            "step_transient_gib": round((step_grads + step_buffers) / C.GIB, 2),
            "transient_overhead": overhead,
            "host_load_peak_gib": round(load_peak / C.GIB, 1),
            "notes": notes,
        },
    )


def _zero_settings(zero, stage, offload_optimizer, offload_param) -> ZeroSettings:
    """The profile to estimate: `zero` as given, else the shipped profile matching stage and offload."""
    if isinstance(zero, ZeroSettings):
        settings = zero
    elif zero == "none":
        settings = ZeroSettings.plain()
    elif zero is not None:
        settings = ZeroSettings.from_profile(zero)
    else:
        stage = 2 if stage is None else stage
        shipped = {(2, False): "zero2", (2, True): "zero2_offload", (3, False): "zero3", (3, True): "zero3_offload"}
        name = shipped.get((stage, bool(offload_optimizer or offload_param)))
        settings = ZeroSettings.from_profile(name) if name else ZeroSettings(stage=stage, overlap_comm=False)
    overrides = {}
    if stage is not None and stage != settings.stage:
        overrides["stage"] = stage
    if offload_optimizer is not None:
        overrides["offload_optimizer"] = offload_optimizer
    if offload_param is not None:
        overrides["offload_param"] = offload_param
    if overrides:
        values = {f.name: getattr(settings, f.name) for f in fields(settings)}
        values.update(overrides)
        settings = ZeroSettings(**values)
    return settings


def _llm_bytes_per_token(counts: ModelCounts, mode: str, kind: str) -> float:
    c = C.LLM_LAYER[(mode, kind)]
    kv_width = counts.num_kv_heads * (counts.hidden_size // counts.num_heads)
    return c["h"] * counts.hidden_size + c["ffn"] * counts.intermediate_size + c["kv"] * kv_width + c["const"]


@dataclass(frozen=True)
class _Checkpointing:
    on: bool
    every: int = 1  # every n-th layer is checkpointed; the others keep their activations
    offload: bool = False  # checkpointed inputs wait in host memory

    def stored(self, layers: int, checkpoint: float, saved: float) -> float:
        """What a stack of `layers` layers leaves on the GPU after its forward."""
        if not self.on:
            return layers * (saved + checkpoint)
        checkpointed = math.ceil(layers / self.every)
        return (0.0 if self.offload else checkpointed * checkpoint) + (layers - checkpointed) * (saved + checkpoint)


def _activations(counts: ModelCounts, plan: TrainPlan, seq: int, batch: int, scale: float, bpe: int,
                 ckpt: _Checkpointing) -> dict[str, float]:
    """Language-model activations: what the forward leaves stored, and one layer's backward peak."""
    tokens = seq * batch
    checkpoint = tokens * counts.hidden_size * bpe  # a layer's input, all a checkpointed layer keeps
    if plan.llm_mode == "none":
        return {"stored": checkpoint, "layer": 0.0}
    base = "full" if plan.llm_mode == "full" else "frozen"
    lora = sum(C.LORA_EXTRA_PER_INPUT * i + C.LORA_EXTRA_PER_RANK * plan.lora_rank for i in plan.lora_inputs_per_layer)
    saved = tokens * (_llm_bytes_per_token(counts, base, "saved") + lora) * scale
    layer_peak = tokens * (_llm_bytes_per_token(counts, base, "peak") + lora) * scale
    if plan.llm_mode == "full":
        layer_peak += counts.hidden_size * counts.intermediate_size * bpe  # one weight gradient, whole
    stored = ckpt.stored(counts.num_layers, checkpoint, saved) + checkpoint  # + the embeddings' output
    # The layer being differentiated: recomputed (checkpointed) or already stored (not).
    return {"stored": stored, "layer": layer_peak if ckpt.on else layer_peak - saved}


def _vision(counts: ModelCounts, plan: TrainPlan, slices: int, patches: int, scale: float, bpe: int,
            ckpt: _Checkpointing, attention: str, checkpoint_resampler: bool) -> dict[str, float]:
    """Vision encoder and resampler over every slice of the batch."""
    width = counts.vision_hidden_size / C.VISION_MEASURED_WIDTH
    tokens = slices * patches
    scores = slices * counts.vision_heads * patches * patches
    kernel = "eager" if attention == "eager" else "sdpa"

    def layer(mode: str, kind: str) -> float:
        per_patch, per_score = C.VISION_LAYER[(kernel, mode, kind)]
        return (tokens * per_patch * width + scores * per_score) * scale

    d = counts.hidden_size
    resampler_tokens = tokens * d
    features = tokens * counts.vision_hidden_size * bpe
    if plan.resampler_mode == "full":
        # Checkpointed (models/resampler.py): only its input waits for the backward, which recomputes.
        r_saved = features if checkpoint_resampler else resampler_tokens * C.RESAMPLER[("full", "saved")] * scale
        r_peak = resampler_tokens * C.RESAMPLER[("full", "peak")] * scale
        if "resampler" in plan.trainable_parts:
            r_peak += counts.largest["resampler"] * bpe
    else:
        r_saved = 0.0
        r_peak = resampler_tokens * C.RESAMPLER[("no_grad", "peak")] * scale
    if plan.vision_mode == "no_grad":
        return {"stored": 0.0, "forward": layer("no_grad", "peak") + features, "layer": 0.0,
                "resampler_saved": r_saved, "resampler_peak": r_peak + features}
    checkpoint = tokens * counts.vision_hidden_size * bpe
    saved = layer(plan.vision_mode, "saved")
    peak = layer(plan.vision_mode, "peak")
    if plan.vision_mode == "full":
        peak += counts.vision_hidden_size * counts.vision_intermediate_size * bpe  # fc1's gradient, whole
    stored = ckpt.stored(counts.vision_layers, checkpoint, saved) + checkpoint
    layer_phase = peak if ckpt.on else peak - saved
    return {"stored": stored, "forward": peak, "layer": layer_phase,
            "resampler_saved": r_saved, "resampler_peak": r_peak}


def _deepspeed_buffers(counts: ModelCounts, plan: TrainPlan, zero: ZeroSettings, bpe: int, n: int) -> tuple[float, float]:
    """(gradient buckets during the backward, gathered ZeRO-3 parameters throughout the step)."""
    h = counts.hidden_size
    if not zero.deepspeed:
        return 2 * 25 * 1024**2, 0.0  # DDP: bucket_cap_mb=25, double-buffered
    if zero.stage in (1, 2):
        return (2 if zero.overlap_comm else 1) * zero.reduce_bucket(h) * bpe, 0.0
    if zero.stage == 3:
        buckets = zero.reduce_bucket(h) * bpe
        gathered = min(zero.max_live_parameters, plan.present) * bpe + zero.prefetch_bucket(h) * bpe
        return buckets, gathered
    return 0.0, 0.0


__all__ = ["BREAKDOWN_KEYS", "MemoryEstimate", "TrainPlan", "Tuning", "estimate", "image_tokens", "plan_training"]
