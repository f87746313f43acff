"""Training-step speed of our MiniCPM-V model beside a straightforward reference-recipe-style step.

    .venv/bin/python bench/train_step.py           # ~2.5 CPU-minutes (about 6 min wall on a busy 2-core box)
    .venv/bin/python bench/train_step.py --steps 5 --ref-pad-to 0 --profile

One model (`build_model(config, device="cpu")`, MiniCPM-V 2.6 layout at a mid size, fp32) and one
batch (4 samples through SampleEncoder + MiniCPMVCollator: two sliced images, one unsliced, one
text-only). Every step is forward + backward + AdamW step over all parameters. Variants, timed in
interleaved rounds (one step of each per round) so that load from other processes hits all alike:

- ours           `model(**batch)`: all slices in one vpm + resampler call, features joined with
                 one index_put, logits only at supervised positions.
- ours+ckpt      the same with activation checkpointing (non-reentrant, as the training recipe
                 sets it; on by default in `finetune train`).
- ref(longest)   the reference recipe's way (spec §2), written here on the SAME modules: one
                 vpm + resampler call per slice, a Python loop per sample scattering features into
                 the embeddings, `llm(...)` computing logits [B, T, vocab] at every position, then
                 CrossEntropy with -100 over pre-shifted labels. Text padded to the batch's longest
                 sample, which is what the recipe's data_collator does (pad_sequence).
- ref(pad N)     the same, every sample padded to N = model_max_length tokens (a fixed-length
                 pad, the worst case of a long max length); --ref-pad-to 0 leaves it out.

Before timing, the bench checks that ours and the reference give the same loss (relative 1e-4)
and the same gradients on the same batch and weights; it exits non-zero otherwise. The 2.6 layout
is used because its vision encoder masks padded patches, so one slice encoded alone equals the
same slice in a padded batch; 2.5's released encoder does not (spec §1.2), and per-slice calls
would change its numbers.

Figures: medians over --steps timed rounds, after the check (which runs ours and the reference once)
and AdamW's state creation; --warmup adds untimed rounds. Wall and CPU ms/step are both printed;
the speed-up and tokens/s (non-padding tokens, image placeholders included, per CPU second) use CPU
time, which on a shared machine measures the work where wall time measures the neighbours too.
One torch thread by default for the same reason (--threads to change it). Peak RSS delta is the
highest resident set size sampled every 2 ms during a step minus the size just before it (approximate).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finetune.data.collator import MiniCPMVCollator  # noqa: E402
from finetune.data.dataset import DataSettings, SampleEncoder  # noqa: E402
from finetune.models.loading import build_model  # noqa: E402
from finetune.models.minicpmv import normalize_pixels  # noqa: E402
from finetune.models.tiny import tiny_config  # noqa: E402
from finetune.models.tokenizer import load_tokenizer, special_token_ids, write_tiny_tokenizer  # noqa: E402

IGNORE_INDEX = -100
FAMILY = "2.6"

_WORDS = (
    "the a image shows small large red blue green cat dog table chair window light shadow person "
    "holding looking left right behind front near far street car tree sky cloud building sign text "
    "reads number three four seven bright dark corner center wall floor wooden metal glass paper "
    "book cup plate food answer question because therefore however describe count there are is"
).split()


def bench_config(vocab_size: int, bos: int | None, eos: int) -> dict:
    """The tiny 2.6 config scaled to a mid size (LLM 512 x 4 layers, vision 256 x 4, 64 queries)."""
    config = tiny_config(FAMILY, vocab_size, bos, eos)
    config.update(
        hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, query_num=64,
    )
    config["vision_config"] = {
        **config["vision_config"], "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4,
        "num_attention_heads": 4,
    }
    return config


def _words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(count))


def _image(width: int, height: int, seed: int) -> Image.Image:
    pixels = torch.randint(0, 256, (height, width, 3), generator=torch.Generator().manual_seed(seed))
    return Image.fromarray(pixels.to(torch.uint8).numpy())


def make_batch(tokenizer_dir: Path, query_num: int, args) -> dict[str, torch.Tensor]:
    """4 samples through the training data path: 2 sliced images, 1 unsliced, 1 text-only."""
    tokenizer = load_tokenizer(tokenizer_dir)
    tokens = special_token_ids(tokenizer)
    settings = DataSettings(
        FAMILY, query_num, max_slice_nums=args.max_slice_nums, model_max_length=args.model_max_length,
        truncate=False, scale_resolution=args.scale_resolution,
    )  # truncate=False: a sample over model_max_length fails instead of silently losing turns
    encoder = SampleEncoder(settings, tokenizer, tokens)
    rng = random.Random(0)
    r = args.scale_resolution
    # (image sizes, words per user turn, words per answer, turns): images are 2x2-sliced, 3x1-sliced,
    # unsliced; the fourth sample has none.
    plans = [
        ([(2 * r, 2 * r)], 20, 37, 3),
        ([(3 * r, r)], 18, 32, 3),
        ([(r, r * 3 // 4)], 25, 45, 3),
        ([], 15, 30, 3),
    ]
    samples = []
    for index, (sizes, user_words, answer_words, turns) in enumerate(plans):
        messages = []
        for turn in range(turns):
            marker = "".join(f"<image_{k:02d}>\n" for k in range(len(sizes))) if turn == 0 else ""
            messages.append({"role": "user", "content": marker + _words(rng, user_words) + "?"})
            messages.append({"role": "assistant", "content": _words(rng, answer_words) + "."})
        images = [_image(w, h, seed=10 * index + k) for k, (w, h) in enumerate(sizes)]
        samples.append(encoder.encode({"messages": messages, "images": []}, images))
    return MiniCPMVCollator(tokens.pad, query_num)(samples)


# -- the reference-recipe-style step ------------------------------------------------------------------


def to_reference_batch(batch: dict[str, torch.Tensor], pad_to: int | None) -> dict:
    """Our batch in the recipe's layout: pre-shifted labels, per-sample lists of unpadded slices.

    Text is padded with 0 to `pad_to` tokens (None: the longest sample), as the recipe's collator.
    """
    lengths = batch["attention_mask"].sum(1).tolist()
    width = pad_to or max(lengths)
    if width < max(lengths):
        raise SystemExit(f"--ref-pad-to {pad_to} is shorter than the longest sample ({max(lengths)} tokens)")
    rows = len(lengths)
    input_ids = torch.zeros(rows, width, dtype=torch.long)
    position_ids = torch.zeros(rows, width, dtype=torch.long)
    labels = torch.full((rows, width), IGNORE_INDEX, dtype=torch.long)
    for i, n in enumerate(lengths):
        input_ids[i, :n] = batch["input_ids"][i, :n]
        position_ids[i, :n] = torch.arange(n)
        labels[i, : n - 1] = batch["labels"][i, 1:n]  # the recipe's labels are already shifted
    pixel_values: list[list] = [[] for _ in range(rows)]
    tgt_sizes: list[list] = [[] for _ in range(rows)]
    image_bound: list[list] = [[] for _ in range(rows)]
    # The recipe's batch holds normalised float strips [3, P, h*w*P], one per slice.
    strips = normalize_pixels(batch["pixel_values"], batch["tgt_sizes"], torch.float32)
    patch = strips.shape[2]
    for strip, (h, w), (sample, start, end) in zip(strips, batch["tgt_sizes"].tolist(), batch["image_bound"].tolist()):
        pixel_values[sample].append(strip[:, :, : h * w * patch].clone())
        tgt_sizes[sample].append((h, w))
        image_bound[sample].append((start, end))
    return {
        "input_ids": input_ids, "position_ids": position_ids, "labels": labels,
        "pixel_values": pixel_values, "tgt_sizes": tgt_sizes, "image_bound": image_bound,
    }


def reference_loss(model, data: dict) -> torch.Tensor:
    """Loss the way the reference recipe computes it (spec §2.1, §2.3), on our model's modules."""
    # One vpm + resampler call per slice.
    features = []
    for strips, sizes in zip(data["pixel_values"], data["tgt_sizes"]):
        per_slice = []
        for strip, size in zip(strips, sizes):
            tgt = torch.tensor([size], dtype=torch.long)
            per_slice.append(model.resampler(model.vpm(strip[None], tgt), tgt)[0])
        features.append(per_slice)
    embeds = model.llm.model.embed_tokens(data["input_ids"])
    if model.text_embedding_scale != 1.0:
        embeds = embeds * model.text_embedding_scale
    hidden_size = embeds.shape[-1]
    # A Python loop per sample scattering its features over its placeholder tokens.
    for i in range(embeds.shape[0]):
        if not data["image_bound"][i]:
            continue
        index = torch.stack([torch.arange(s, e) for s, e in data["image_bound"][i]]).view(-1, 1)
        row = embeds[i]
        row.scatter_(0, index.expand(-1, hidden_size), torch.cat(features[i]).view(-1, hidden_size))
    # Full causal LM: logits [B, T, vocab] everywhere, no attention mask (the recipe drops it).
    logits = model.llm(inputs_embeds=embeds, position_ids=data["position_ids"], use_cache=False).logits
    return F.cross_entropy(
        logits.view(-1, logits.shape[-1]).float(), data["labels"].view(-1), ignore_index=IGNORE_INDEX
    )


# -- measuring -----------------------------------------------------------------------------------------


class PeakRSS:
    """Samples this process's resident set size every 2 ms while active (Linux /proc).

    On entry, glibc is asked to return freed heap to the system first, so memory one variant freed
    does not hide the next variant's growth.
    """

    def __init__(self) -> None:
        self._page = os.sysconf("SC_PAGE_SIZE")
        libc_name = ctypes.util.find_library("c")
        self._libc = ctypes.CDLL(libc_name) if libc_name else None
        self._peak = 0
        self._running = False
        self._thread: threading.Thread | None = None

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _run(self) -> None:
        while self._running:
            self._peak = max(self._peak, self.rss())
            time.sleep(0.002)

    def __enter__(self) -> PeakRSS:
        if self._libc is not None and hasattr(self._libc, "malloc_trim"):
            self._libc.malloc_trim(0)
        self.start = self.rss()
        self._peak = self.start
        self._running = True
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._running = False
        self._thread.join()
        self._peak = max(self._peak, self.rss())
        self.delta = self._peak - self.start


def set_checkpointing(model, enabled: bool) -> None:
    if enabled:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.activation_checkpointing_disable()


def grads(model) -> list[torch.Tensor]:
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


def total_norm(tensors: list[torch.Tensor]) -> float:
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors])).item()


def check_same(model, batch, ref_batch) -> None:
    """Ours and the reference give the same loss and gradients; exits non-zero if not."""
    model.zero_grad(set_to_none=True)
    ours = model(**batch).loss
    ours.backward()
    ours_grads = grads(model)
    model.zero_grad(set_to_none=True)
    ref = reference_loss(model, ref_batch)
    ref.backward()
    ref_grads = grads(model)
    model.zero_grad(set_to_none=True)
    loss_rel = abs(ours.item() - ref.item()) / abs(ref.item())
    # Relative to the whole gradient, not per tensor: some tensors' gradients are zero in exact
    # arithmetic (a key bias under softmax) and differ only in rounding noise.
    norm_o, norm_r = total_norm(ours_grads), total_norm(ref_grads)
    grad_rel = total_norm([a - b for a, b in zip(ours_grads, ref_grads)]) / norm_r
    print(f"loss   ours {ours.item():.6f}   reference {ref.item():.6f}   relative difference {loss_rel:.1e}")
    print(f"grads  norm ours {norm_o:.6f}   reference {norm_r:.6f}   |ours - ref| / |ref| {grad_rel:.1e}")
    if loss_rel > 1e-4 or grad_rel > 1e-4:
        raise SystemExit("ours and the reference disagree: the comparison would not be fair")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="timed rounds (one step of each variant per round)")
    parser.add_argument("--warmup", type=int, default=0,
                        help="untimed rounds first (the loss check already ran ours and ref once, and the "
                        "optimizer state is created before timing)")
    parser.add_argument("--scale-resolution", type=int, default=224,
                        help="slice side in pixels (released: 448; 224 keeps the vision part CPU-sized)")
    parser.add_argument("--max-slice-nums", type=int, default=4)
    parser.add_argument("--model-max-length", type=int, default=1024)
    parser.add_argument("--ref-pad-to", type=int, default=None,
                        help="fixed pad length of the ref(pad N) variant (default: --model-max-length; 0: skip it)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared machine CPU time then measures the work "
                        "itself, and one thread loses nothing to waiting for a descheduled sibling)")
    parser.add_argument("--profile", action="store_true", help="also profile one step of ours and of the reference")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pad_to = args.model_max_length if args.ref_pad_to is None else args.ref_pad_to

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_tokenizer(FAMILY, tmp)
        tokenizer = load_tokenizer(tmp)
        tokens = special_token_ids(tokenizer)
        config = bench_config(32000, tokens.bos, tokens.eos)
        batch = make_batch(Path(tmp), config["query_num"], args)
    model = build_model(config, device="cpu").train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    real_tokens = int(batch["attention_mask"].sum())
    supervised = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    lengths = batch["attention_mask"].sum(1).tolist()
    params = sum(p.numel() for p in model.parameters())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, CPU")
    print(f"model: MiniCPM-V {FAMILY} layout, {params / 1e6:.1f}M parameters (LLM 512 x 4 layers, vocab 32000; "
          f"vision 256 x 4 layers; {config['query_num']} queries), all trained with AdamW")
    text = [n - c * config["query_num"] for n, c in zip(lengths, batch["slice_counts"].tolist())]
    print(f"batch: {len(lengths)} samples of {lengths} tokens ({text} text + {batch['slice_counts'].tolist()} slices x "
          f"{config['query_num']} image tokens; {real_tokens} real, {supervised} supervised)")
    print(f"       {batch['pixel_values'].shape[0]} slices of (h, w) patches {batch['tgt_sizes'].tolist()} "
          f"at scale_resolution {args.scale_resolution}, max_slice_nums {args.max_slice_nums}")

    variants: dict[str, tuple] = {
        "ours": ("ours", False, None),
        "ours+ckpt": ("ours", True, None),
        "ref(longest)": ("ref", False, to_reference_batch(batch, None)),
    }
    if pad_to:
        variants[f"ref(pad {pad_to})"] = ("ref", False, to_reference_batch(batch, pad_to))
    check_same(model, batch, variants["ref(longest)"][2])
    # Create AdamW's state outside the timed steps (the first step() allocates it).
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    def step(kind: str, checkpointing: bool, ref_batch) -> None:
        set_checkpointing(model, checkpointing)
        loss = model(**batch).loss if kind == "ours" else reference_loss(model, ref_batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times: dict[str, list[float]] = {name: [] for name in variants}
    cpu_times: dict[str, list[float]] = {name: [] for name in variants}
    peaks: dict[str, list[int]] = {name: [] for name in variants}
    timing_start = time.perf_counter()
    for round_index in range(args.warmup + args.steps):
        for name, spec in variants.items():
            with PeakRSS() as rss:
                start, cpu_start = time.perf_counter(), time.process_time()
                step(*spec)
                elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            if round_index >= args.warmup:
                times[name].append(elapsed)
                cpu_times[name].append(cpu)
                peaks[name].append(rss.delta)
    set_checkpointing(model, False)
    print(f"(timing took {time.perf_counter() - timing_start:.0f} s wall)")

    base = statistics.median(cpu_times["ref(longest)"])
    print(f"\n{args.steps} timed rounds after {args.warmup} warm-up, medians; speed-up = ref(longest) CPU ms/step / "
          "the variant's; tokens/s = non-padding tokens per CPU second")
    header = f"{'variant':<15}{'wall ms/step':>13}{'CPU ms/step':>13}{'tokens/s':>10}{'peak RSS +MiB':>15}"
    print(header + f"{'speed-up':>10}")
    for name in variants:
        wall, cpu = statistics.median(times[name]), statistics.median(cpu_times[name])
        print(f"{name:<15}{wall * 1e3:>13.0f}{cpu * 1e3:>13.0f}{real_tokens / cpu:>10.0f}"
              f"{statistics.median(peaks[name]) / 2**20:>15.0f}{base / cpu:>9.2f}x")
    busy = sum(map(sum, cpu_times.values())) / sum(map(sum, times.values()))
    if busy < 0.9 * args.threads:
        print(f"note: the process got {busy:.2f} CPU-seconds per second with {args.threads} thread(s): the machine "
              "was shared, so wall times are inflated; compare CPU times")

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for name in ("ours", "ref(longest)"):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step(*variants[name])
            print(f"\nprofile of one {name} step (top 15 ops by self CPU time)")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
