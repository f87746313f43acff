"""Measures the activation constants of `constants.py` on the CPU, at the real layer widths.

Run book (takes a few minutes on 2 cores; needs ~6 GB of RAM)::

    python -m finetune.memory.measure            # prints a JSON report
    python -m finetune.memory.measure --quick    # shorter sequences, for a smoke run

How: every measurement runs one module's forward and backward in bf16 and counts the bytes of the
tensors the run creates while they are alive (`LiveTensorBytes`, a dispatch mode; torch's CPU
memory profiler would also count oneDNN's private scratchpads and weight reorders, ~150 MB of
noise that a GPU kernel does not have).
Weight gradients are dropped as soon as they are accumulated (a post-accumulate-grad hook), the
way DeepSpeed copies each gradient into its reduce bucket and frees it, so the numbers are
activations and workspace only. bf16 is used, not fp32 scaled by half: the model upcasts in
RMSNorm, softmax and the loss, and those fp32 copies only show up at the real dtype.

What the CPU cannot show is a GPU kernel's private workspace (cuBLAS, flash attention). PyTorch's
CPU SDPA is the flash-attention algorithm (blocked, keeps only the log-sum-exp), so it saves the
same tensors as the GPU's flash / memory-efficient kernels; eager attention materialises the
scores on both.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
import weakref
from typing import Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only

from . import constants as C

BF16 = torch.bfloat16


class LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of tensor storages that ops create while the mode is active.

    Every op's outputs are seen at dispatch; each new storage is counted until it is freed (a weakref
    finalizer on the storage, which PyTorch keeps alive exactly as long as the C++ storage). Storages
    that existed before (weights, inputs: pass them as `existing`) are never counted, so views of
    them (a transposed weight) cost nothing, as on a GPU. What an op allocates privately (oneDNN
    scratchpads and weight reorders on the CPU) is not a tensor and is not counted; torch's CPU memory
    profiler would count it, ~150 MB of noise that a GPU kernel does not have.
    """

    def __init__(self, existing: list[torch.Tensor] = ()) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}
        self._existing = {t.untyped_storage().data_ptr() for t in existing}

    def reset_peak(self) -> None:
        self.peak = self.live

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or key in self._sizes or key in self._existing:
            return
        self._sizes[key] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tree_map_only(torch.Tensor, self._track, out)
        return out


def _drop_weight_grads(module: nn.Module) -> None:
    for parameter in module.parameters():
        if parameter.requires_grad:
            parameter.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))


def _forward_backward(
    module_fn: Callable[[], torch.Tensor], grad_out: torch.Tensor | None, existing: list[torch.Tensor]
) -> dict[str, int]:
    """Counts forward then backward of `module_fn()`; bytes are relative to before the forward.

    With `grad_out=None` the forward runs under no_grad (a frozen part: transient memory only).
    """
    counter = LiveTensorBytes(existing + ([grad_out] if grad_out is not None else []))
    with counter:
        if grad_out is None:
            with torch.no_grad():
                module_fn()
            gc.collect()
            return {"forward_peak": counter.peak, "saved": 0, "peak": counter.peak, "output": 0}
        out = module_fn()
        gc.collect()
        forward_peak, after_forward = counter.peak, counter.live
        counter.reset_peak()
        out.backward(grad_out)
        backward_peak = counter.peak
    out_bytes = out.numel() * out.element_size()
    return {
        "forward_peak": forward_peak,
        # Tensors autograd keeps for the backward (the output itself excluded).
        "saved": after_forward - out_bytes,
        # The whole step's peak: forward transients, or saved tensors plus backward workspace.
        "peak": max(forward_peak, backward_peak),
        "output": out_bytes,
    }


def _tensors_of(*modules: nn.Module) -> list[torch.Tensor]:
    return [t for m in modules for t in (*m.parameters(), *m.buffers())]


# -- language model decoder layer --------------------------------------------------------------------


def llama_layer(tokens: int, hidden: int, ffn: int, heads: int, kv_heads: int, mode: str) -> dict[str, int]:
    """One Llama decoder layer (the 2.5 LLM's; 2.0's and 2.6's differ only in widths and biases).

    mode: "full" (weights trained), "lora" (frozen, LoRA r=64 on q/k/v/o, dropout 0.05) or
    "frozen" (frozen weights, gradient flowing to the input for parts trained below the LLM).
    """
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=ffn, num_attention_heads=heads, num_key_value_heads=kv_heads,
        num_hidden_layers=1, vocab_size=256, max_position_embeddings=max(tokens, 2048),
    )
    config._attn_implementation = "sdpa"
    layer: nn.Module = LlamaDecoderLayer(config, layer_idx=0)
    layer.requires_grad_(mode == "full")
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        layer = get_peft_model(
            layer, LoraConfig(r=64, lora_alpha=64, lora_dropout=0.05,
                              target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
        )
    layer = layer.to(BF16).train()
    _drop_weight_grads(layer)
    x = torch.randn(1, tokens, hidden, dtype=BF16, requires_grad=True)
    position_ids = torch.arange(tokens)[None]
    cos_sin = LlamaRotaryEmbedding(config)(x, position_ids)
    grad = torch.randn(1, tokens, hidden, dtype=BF16)
    return _forward_backward(lambda: layer(x, position_embeddings=cos_sin, position_ids=position_ids), grad,
                             [*_tensors_of(layer), x, position_ids, *cos_sin])


# -- vision encoder layer ----------------------------------------------------------------------------


def vision_layer(slices: int, patches: int, attn: str, mode: str) -> dict[str, int]:
    """One SigLIP-so400m encoder layer (1152 wide, 16 heads, FFN 4304) over `slices` x `patches`.

    mode: "full" (trained), "frozen" (gradient to the input only) or "no_grad" (frozen vision:
    the forward runs without autograd, so only its transient peak counts).
    """
    from transformers import Idefics2VisionConfig
    from transformers.models.idefics2.modeling_idefics2 import Idefics2EncoderLayer

    config = Idefics2VisionConfig(hidden_size=1152, intermediate_size=4304, num_attention_heads=16,
                                  hidden_act="gelu_pytorch_tanh")
    config._attn_implementation = attn
    layer = Idefics2EncoderLayer(config).to(BF16).train()
    layer.requires_grad_(mode == "full")
    _drop_weight_grads(layer)
    x = torch.randn(slices, patches, 1152, dtype=BF16, requires_grad=mode != "no_grad")
    grad = None if mode == "no_grad" else torch.randn(slices, patches, 1152, dtype=BF16)
    return _forward_backward(lambda: layer(x, attention_mask=None), grad, [*_tensors_of(layer), x])


# -- resampler ---------------------------------------------------------------------------------------


def resampler(slices: int, patches: int, hidden: int, queries: int, mode: str) -> dict[str, int]:
    """The perceiver resampler over `slices` slices of `patches` patches (mode as for vision_layer)."""
    from finetune.models.resampler import Resampler

    module = Resampler(queries, hidden, hidden // 128, 1152, fixed_query_pos=False)
    nn.init.normal_(module.query, std=0.02)
    nn.init.normal_(module.attn.in_proj_weight, std=0.02)
    nn.init.zeros_(module.attn.in_proj_bias)
    nn.init.normal_(module.proj, std=0.02)
    module = module.to(BF16).train()
    module.requires_grad_(mode == "full")
    _drop_weight_grads(module)
    side = int(patches**0.5)
    tgt_sizes = torch.tensor([[side, patches // side]] * slices)
    x = torch.randn(slices, patches, 1152, dtype=BF16, requires_grad=mode != "no_grad")
    with torch.no_grad():
        module(x, tgt_sizes)  # grows the position cache outside the measurement
    grad = None if mode == "no_grad" else torch.randn(slices, queries, hidden, dtype=BF16)
    return _forward_backward(lambda: module(x, tgt_sizes), grad, [*_tensors_of(module), x, tgt_sizes])


# -- logits and loss ---------------------------------------------------------------------------------


def logits_and_loss(tokens: int, hidden: int, vocab: int, mode: str, supervised: int | None = None) -> dict[str, int]:
    """lm_head + cross-entropy, forward and backward, lm_head frozen (its gradient is counted apart).

    mode "selective": this toolkit's `next_token_loss` (fp32 logits at supervised positions, one
    chunk at a time). mode "full": the reference recipe (transformers' LlamaForCausalLM computes
    `lm_head(hidden).float()` at every position; the reference trainer's CrossEntropyLoss follows).
    """
    from finetune.models.minicpmv import next_token_loss

    head = nn.Linear(hidden, vocab, bias=False).to(BF16)
    head.requires_grad_(False)
    h = torch.randn(1, tokens, hidden, dtype=BF16, requires_grad=True)
    labels = torch.full((1, tokens), -100)
    n = tokens if supervised is None else supervised
    labels[0, -n:] = torch.randint(0, vocab, (n,))

    def loss_fn() -> torch.Tensor:
        if mode == "selective":
            return next_token_loss(head, h, labels)
        logits = head(h).float()
        return nn.CrossEntropyLoss()(logits.view(-1, vocab), labels.view(-1))

    return _forward_backward(loss_fn, torch.tensor(1.0), [*_tensors_of(head), h, labels])


# -- the report --------------------------------------------------------------------------------------


def run_all(quick: bool = False) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    t_llm = 512 if quick else 1024
    report: dict = {"torch": torch.__version__, "threads": torch.get_num_threads(), "results": {}}
    r = report["results"]

    def record(name: str, fn: Callable[[], dict]) -> None:
        start = time.perf_counter()
        r[name] = fn()
        r[name]["seconds"] = round(time.perf_counter() - start, 1)
        print(name, r[name], flush=True)

    # Llama-3-8B widths (2.5) in the three training modes, and width variants that separate the
    # hidden-, FFN- and KV-proportional parts of a layer's activations; two lengths each, because a
    # layer's backward peak has a length-independent part (its largest weight gradient).
    widths = {"4096_14336_kv1024": (4096, 14336, 32, 8), "4096_7168_kv1024": (4096, 7168, 32, 8),
              "4096_14336_kv4096": (4096, 14336, 32, 32)}
    for tokens in (t_llm // 2, t_llm):
        for label, dims in widths.items():
            modes = ("full", "lora", "frozen") if label == "4096_14336_kv1024" else ("full", "frozen")
            for mode in modes:
                record(f"llm_{label}_{mode}_T{tokens}", lambda d=dims, m=mode, t=tokens: llama_layer(t, *d, m))
    # Held out: Qwen2-7B widths (2.6), to check the fitted coefficients.
    record(f"llm_3584_18944_kv512_full_T{t_llm}", lambda: llama_layer(t_llm, 3584, 18944, 28, 4, "full"))
    # Vision: 2 slices of 1024 patches (one 448 x 448 slice = 32 x 32 patches) and of 256 patches,
    # which separates the per-patch part from eager attention's per-slice L^2 part.
    for attn in ("sdpa", "eager"):
        for patches in (1024, 256):
            for mode in ("full", "frozen", "no_grad"):
                record(f"vision_{attn}_{mode}_S2_L{patches}",
                       lambda a=attn, p=patches, m=mode: vision_layer(2, p, a, m))
    # Two supervised counts: their difference is the chunk's logits alone (the hidden states' gradient
    # and the gathered positions, there in both, cancel).
    for n in (512, 1024):
        record(f"logits_selective_T2048_n{n}_V128256",
               lambda n=n: logits_and_loss(2048, 4096, 128256, "selective", supervised=n))
    record("logits_full_T256_V128256", lambda: logits_and_loss(256, 4096, 128256, "full"))
    # Last: on some CPUs oneDNN refuses the resampler's strided bf16 matmul and torch falls back to a
    # slow kernel for the rest of the process (the byte counts are unaffected).
    for mode in ("full", "no_grad"):
        record(f"resampler_4096_q96_{mode}_S2_L1024", lambda m=mode: resampler(2, 1024, 4096, 96, m))
    return report


def derive(results: dict) -> dict:
    """Per-token coefficients (bytes, bf16) from `run_all`'s results; `constants.py` records them.

    Language-model layer: bytes per token = c_h * hidden + c_f * ffn + c_kv * kv_width + c_0, from
    three widths at two lengths (the length-independent part of the backward peak is the largest
    weight gradient, ffn * hidden * 2 bytes, in full training). Vision layer: bytes per patch, plus
    bytes per attention score (slices * heads * patches^2) for eager attention, plus the largest
    weight gradient (fc1) in full training. Resampler: bytes per (patch x LLM width) per slice.
    Logits: copies of the fp32 [positions, vocab] logits live at the peak.
    """
    out: dict = {}
    lengths = sorted({int(k.rsplit("_T", 1)[1]) for k in results if k.startswith("llm_4096")})
    t1, t2 = lengths[0], lengths[-1]

    def per_token(key: str, field: str) -> float:
        a, b = results[f"{key}_T{t1}"][field], results[f"{key}_T{t2}"][field]
        return (b - a) / (t2 - t1)

    for mode in ("full", "frozen"):
        for field in ("saved", "peak"):
            base = per_token(f"llm_4096_14336_kv1024_{mode}", field)
            c_f = (base - per_token(f"llm_4096_7168_kv1024_{mode}", field)) / 7168
            c_kv = (per_token(f"llm_4096_14336_kv4096_{mode}", field) - base) / 3072
            rest = base - c_f * 14336 - c_kv * 1024
            c_h = round(rest / 4096)
            out[f"llm_{mode}_{field}"] = {"h": c_h, "ffn": round(c_f, 3), "kv": round(c_kv, 3),
                                         "const": round(rest - c_h * 4096, 1)}
        a = results[f"llm_4096_14336_kv1024_{mode}_T{t1}"]["peak"]
        out[f"llm_{mode}_peak_intercept"] = a - per_token(f"llm_4096_14336_kv1024_{mode}", "peak") * t1
    for field in ("saved", "peak"):
        extra = per_token("llm_4096_14336_kv1024_lora", field) - per_token("llm_4096_14336_kv1024_frozen", field)
        out[f"llm_lora_extra_{field}_per_token"] = extra  # four LoRA modules on 4096-wide inputs, r=64
    fc1_grad = 4304 * 1152 * 2
    for attn in ("sdpa", "eager"):
        for mode in ("full", "frozen", "no_grad"):
            for field in ("saved", "peak"):
                big = results[f"vision_{attn}_{mode}_S2_L1024"][field]
                small = results[f"vision_{attn}_{mode}_S2_L256"][field]
                if field == "peak" and mode == "full":
                    big, small = big - fc1_grad, small - fc1_grad
                # big = 2048 a + 2*16*1024^2 q ; small = 512 a + 2*16*256^2 q (q = 0 for sdpa)
                if attn == "sdpa":
                    q, a = 0.0, big / 2048
                else:
                    q = (big - 4 * small) / (2 * 16 * 1024**2 - 4 * 2 * 16 * 256**2)
                    a = (big - q * 2 * 16 * 1024**2) / 2048
                out[f"vision_{attn}_{mode}_{field}"] = {"per_patch": round(a, 1), "per_score": round(q, 3)}
    for mode in ("full", "no_grad"):
        r = results[f"resampler_4096_q96_{mode}_S2_L1024"]
        in_proj_grad = 3 * 4096 * 4096 * 2 if mode == "full" else 0
        out[f"resampler_{mode}"] = {
            "saved_per_patch_width": round(r["saved"] / (2 * 1024 * 4096), 3),
            "peak_per_patch_width": round((r["peak"] - in_proj_grad) / (2 * 1024 * 4096), 3),
        }
    small, big = (results[f"logits_selective_T2048_n{n}_V128256"]["peak"] for n in (512, 1024))
    rows = (1024 - 512) / C.LOSS_CHUNKS  # the largest chunk grows by this many positions
    full = results["logits_full_T256_V128256"]
    out["logits_selective_copies"] = round((big - small) / (rows * 128256 * 4), 3)
    out["logits_full_copies"] = round(full["peak"] / (256 * 128256 * 4), 3)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune.memory.measure", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter sequences (a smoke run)")
    parser.add_argument("--out", default=None, help="also write the JSON report here")
    parser.add_argument("--derive", default=None, metavar="REPORT", help="only derive coefficients from a saved report")
    args = parser.parse_args(argv)
    if args.derive:
        with open(args.derive) as f:
            print(json.dumps(derive(json.load(f)["results"]), indent=2))
        return 0
    report = run_all(quick=args.quick)
    report["derived"] = derive(report["results"])
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
