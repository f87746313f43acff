"""Every constant of the memory estimator, with where it came from.

Three kinds of source:

* [code]: read off the code that allocates the memory (DeepSpeed 0.19 `runtime/zero/`, transformers 5.x
  `integrations/deepspeed.py`, this toolkit's `models/`), cited by file and function.
* [measured]: `python -m finetune.memory.measure` (torch 2.13, CPU, bf16, the real layer widths); the
  report lists every raw number and `derive()` turns them into the per-token coefficients below.
  Tensor bytes are counted as the model creates them (a dispatch-mode counter), so kernel-private
  workspace is not included; PyTorch's CPU SDPA is the flash algorithm and saves what the GPU's
  flash / memory-efficient kernels save.
* [fitted]: fitted once, by least squares over the twelve published A100 figures of the reference
  recipe (docs/memory.md, "Calibration"), and used unchanged for every prediction.

Bytes are per sample (batch 1) in bf16/fp16; fp32 activations are twice these.
"""

from __future__ import annotations

GIB = 1024**3

# -- bytes per parameter -----------------------------------------------------------------------------

BYTES_PER_DTYPE = {"fp16": 2, "bf16": 2, "fp32": 4}
# Mixed-precision Adam keeps an fp32 master copy and the two fp32 moments: 4 + 4 + 4 bytes per
# trained parameter [code: DeepSpeed stage_1_and_2.py `single_partition_of_fp32_groups` and
# FusedAdam's exp_avg / exp_avg_sq; stage3.py `fp32_partitioned_groups_flat`]. In fp32 training the
# weights are their own master copy: 8 bytes.
ADAM_BYTES_MIXED = 12
ADAM_BYTES_FP32 = 8
# Optimizer step of ZeRO-1/2 without offload: the gradient partition is flattened (a low-precision
# copy) and cast to fp32 before Adam runs [code: stage_1_and_2.py `step`: flatten_dense_tensors_aligned
# then `.to(fp32)`]; both exist at once for a moment.
STEP_FP32_GRAD_BYTES = 4
# Offloaded optimizer on the host: fp32 master + Adam moments + the fp32 gradient partition
# [code: stage_1_and_2.py / stage3.py with offload_optimizer: pinned `single_partition_of_fp32_groups`
# with its `.grad`, CPUAdam states].
HOST_OPTIMIZER_BYTES = 16

# -- DeepSpeed defaults, used when a profile leaves a key out [code: deepspeed/runtime/zero/config.py] --

DS_DEFAULTS = {
    "reduce_bucket_size": 5e8,
    "allgather_bucket_size": 5e8,
    "stage3_prefetch_bucket_size": 5e7,
    "stage3_param_persistence_threshold": 1e5,
    "stage3_max_live_parameters": 1e9,
    "sub_group_size": 1e9,
}
# transformers fills "auto" from the model's hidden size h [code: transformers/integrations/
# deepspeed.py `HfTrainerDeepSpeedConfig.trainer_config_finalize`]: reduce bucket h*h, stage-3
# prefetch bucket 0.9*h*h, stage-3 persistence threshold 10*h.
AUTO_REDUCE_BUCKET = 1.0  # x h^2
AUTO_PREFETCH_BUCKET = 0.9  # x h^2
AUTO_PERSISTENCE_THRESHOLD = 10  # x h

# -- language-model decoder layer, bytes per token (bf16) [measured] -----------------------------------
# bytes/token = h * hidden + ffn * intermediate + kv * (kv_heads * head_dim) + const.
# "saved": what autograd keeps for the backward after the layer's forward.
# "peak": the layer's whole forward+backward peak (saved tensors plus backward workspace), less the
#   largest weight gradient, which full training adds once (`LLM_FULL_PEAK_WEIGHT_GRAD`).
# Modes: "full" (weights trained), "frozen" (weights frozen, gradient flows to the input because
# something below the language model trains), LoRA = "frozen" plus `LORA_EXTRA_PER_INPUT`.
LLM_LAYER = {
    ("full", "saved"): {"h": 20, "ffn": 8.0, "kv": 4.0, "const": 136.0},
    ("full", "peak"): {"h": 22, "ffn": 10.0, "kv": 4.0, "const": 136.0},
    ("frozen", "saved"): {"h": 12, "ffn": 6.0, "kv": 4.0, "const": 136.0},
    ("frozen", "peak"): {"h": 14, "ffn": 12.0, "kv": 4.0, "const": 136.0},
}
# One LoRA module adds, per token, 4 bytes per input feature (peft's dropout output and mask, and
# the input the adapter keeps) plus 2 bytes per rank (lora_A's output) [measured: four 4096-wide
# q/k/v/o adapters at r=64 add 66,048 bytes/token = 4 * (4*4096 + 2*64), saved and peak alike].
LORA_EXTRA_PER_INPUT = 4
LORA_EXTRA_PER_RANK = 2
# Held-out check of the fit: Qwen2-7B widths (2.6; 3584 / 18944 / 4 KV heads) measure 225,400
# bytes/token saved in full training; the formula gives 225,416.

# -- vision encoder layer (SigLIP-so400m: 1152 wide, FFN 4304, 16 heads) [measured] -------------------
# bytes = per_patch x (slices x patches) + per_score x (slices x heads x patches^2). The per-score
# term is eager attention's: the bf16 softmax output it saves and the fp32 softmax it computes in;
# SDPA (and flash-attention-2, same algorithm) keeps none. Measured over 2 slices of 1024 and of 256
# patches. Modes as for the language model, plus "no_grad": a frozen encoder runs without autograd
# and only its forward transient counts. "peak" excludes the largest weight gradient (fc1, 4304 x
# 1152), which full training adds once.
VISION_LAYER = {
    ("sdpa", "full", "saved"): (33416.0, 0.0),
    ("sdpa", "full", "peak"): (44329.1, 0.0),
    ("sdpa", "frozen", "saved"): (20200.0, 0.0),
    ("sdpa", "frozen", "peak"): (39720.0, 0.0),
    ("sdpa", "no_grad", "peak"): (21824.0, 0.0),
    ("eager", "full", "saved"): (33352.0, 6.0),
    ("eager", "full", "peak"): (23261.3, 11.129),
    ("eager", "frozen", "saved"): (17832.0, 6.0),
    ("eager", "frozen", "peak"): (13193.3, 11.898),
    ("eager", "no_grad", "peak"): (9216.0, 10.0),
}
VISION_MEASURED_WIDTH = 1152  # per-patch numbers scale with the encoder's width

# -- resampler, bytes per (patch x language-model width) over all slices [measured at 2.5: 4096 wide,
# 96 queries, 2 slices of 1024 patches]. "peak" excludes the largest weight gradient (attn.in_proj,
# 3 x 4096 x 4096), which training the resampler adds once.
RESAMPLER = {
    ("full", "saved"): 10.942,
    ("full", "peak"): 18.376,
    ("no_grad", "peak"): 10.281,
}

# -- logits and loss [measured] --------------------------------------------------------------------
# Copies of the fp32 [positions, vocab] logits alive at the loss's peak: the saved log-softmax,
# its gradient and the gradient of the logits (the forward peaks at two). The reference recipe's
# `lm_head(hidden).float()` + CrossEntropyLoss over every position measures 3.0.
LOGITS_COPIES = 3.0
# This toolkit's `next_token_loss` computes the supervised positions' logits in LOSS_CHUNKS chunks,
# each recomputed in its backward [code: finetune/models/minicpmv.py LOSS_CHUNKS], so only the
# largest chunk's exist at a time. Per chunk position it measures 3.24 copies (the bf16 logits and
# their gradient come on top), from the difference between 1024 and 512 supervised positions.
LOSS_CHUNKS = 8
CHUNK_LOGITS_COPIES = 3.24
# Fraction of a sample's text tokens (image placeholders excluded) that carry labels, for the
# selective logits of this toolkit. Chat SFT data supervises the answers; this assumes half the
# text is answer. All-answer data (captions, OCR transcripts) doubles the logits term. [assumption]
SUPERVISED_FRACTION = 0.5

# -- images ------------------------------------------------------------------------------------------
# Tokens around each slice's query_num placeholders: <image></image> or <slice></slice>, plus one
# newline per grid row [code: finetune/data/templates.py; spec §2]. Counted as 2 per slice + 1 per
# slice for the row breaks (an upper bound).
TAG_TOKENS_PER_SLICE = 3

# -- fixed costs -------------------------------------------------------------------------------------
# CUDA context, cuBLAS/cuDNN workspaces and NCCL communicator buffers: memory nvidia-smi shows that
# the caching allocator does not. [source: PyTorch docs "CUDA semantics > Memory management"
# (context of several hundred MB, driver/GPU dependent); NCCL_BUFFSIZE 4 MiB per channel and peer]
CUDA_CONTEXT_GIB = 0.75
# Per-process host memory besides offloaded state: Python, torch/CUDA libraries, transformers, the
# dataloader workers' share. [assumption, typical RSS of a torch+transformers training process]
HOST_PROCESS_GIB = 4.0

# -- the fitted constant [fitted] --------------------------------------------------------------------
# Reserved-over-allocated ratio of the caching allocator for the step's transient memory
# (activations, logits, buckets, gathered parameters): blocks freed between phases stay reserved,
# and nvidia-smi (where published figures come from) shows reserved memory. Fitted once over the
# twelve calibration points; see docs/memory.md.
TRANSIENT_OVERHEAD = 2.22

__all__ = [name for name in dir() if name.isupper()]
