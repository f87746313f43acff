"""Chat with a model, in Python or with `finetune chat`: prompts built exactly as training builds them.

    finetune chat --model DIR [--adapter DIR] [--image PATH ...] "question"
    finetune chat --model DIR [--adapter DIR] [--image PATH ...] --interactive

    from finetune.generate import Chat
    chat = Chat("output/lora", adapter=None)          # or Chat(base_dir, adapter="output/lora")
    chat.ask("What is in the picture?", images=["cat.jpg"])

A prompt is the conversation so far encoded by the training path (`SampleEncoder.encode_prompt`:
the family's chat template, images sliced and their placeholders written as in training; for llava
and 4.6 `NativeSampleEncoder.encode_prompt`, with the processor's placeholders and pixels), followed
by the chat format's assistant header (2.0 `<AI>`, 2.5 and Llama-3 llava
`<|start_header_id|>assistant<|end_header_id|>\\n\\n`, 2.6 and 4.6 `<|im_start|>assistant\\n`).
Decoding is transformers' `generate` (greedy or sampled, KV cache) and stops at the family's stop
tokens (`SpecialTokens.stop_ids`). A batch is left-padded, so every prompt ends at the same column;
position ids count real tokens only, so a padded prompt gets the positions it has alone.

A conversation is given in either of two forms:
- a list of messages `{"role": "system"|"user"|"assistant", "content": str}`, where a user message
  may carry `"images": [PIL image or path, ...]`, placed in front of its text, one per line (as the
  released `chat` places them, and as training places a single image without a marker);
- a canonical record `{"messages": [...], "images": [...]}` (see finetune/data/formats.py) whose
  content marks image k, in text order, as `<image_NN>` (NN = k); `images` holds PIL images, paths
  or `{"path": ...}` dicts (the loader's form).
Either way the last message is the user's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from .data.dataset import DataSettings, load_sample_encoder
from .data.formats import IMAGE_MARKER_RE, image_marker
from .data.images import ImageError, open_image
from .models.config import detect_family
from .models.loading import CheckpointError, load_model, read_config
from .models.tokenizer import SpecialTokens

ImageInput = Image.Image | str | os.PathLike | dict
DEFAULT_MAX_SLICE_NUMS = 9  # the training default (DataArguments.max_slice_nums)


class PromptError(ValueError):
    """A conversation cannot be turned into a prompt (wrong roles, markers that name no image)."""


# ------------------------------------------------------------------------------------ conversations


def to_record(conversation: list[dict] | dict) -> dict:
    """Either conversation form (module docstring) as a canonical record `{"messages", "images"}`.

    Raises:
        PromptError: naming the message at fault.
    """
    if isinstance(conversation, dict):
        messages, images = list(conversation["messages"]), list(conversation.get("images") or [])
        markers = [int(m) for message in messages for m in IMAGE_MARKER_RE.findall(message["content"])]
        if markers != list(range(len(images))):
            raise PromptError(f"the image markers in text order are {markers}; {len(images)} images "
                              f"need <image_00> .. <image_{len(images) - 1:02d}>, each once, in order")
    else:
        messages, images = [], []
        for index, message in enumerate(conversation):
            content = message["content"]
            if IMAGE_MARKER_RE.search(content):
                raise PromptError(f"message {index}: <image_NN> markers belong to the record form; "
                                  "pass the message's images in its `images` list")
            extra = list(message.get("images") or [])
            if extra and message["role"] != "user":
                raise PromptError(f"message {index}: only user messages carry images, not {message['role']!r}")
            markers = "".join(image_marker(len(images) + k) + "\n" for k in range(len(extra)))
            images.extend(extra)
            messages.append({"role": message["role"], "content": markers + content})
    roles = [m["role"] for m in messages]
    body = roles[1:] if roles[:1] == ["system"] else roles
    if not body or any(role != ("user", "assistant")[i % 2] for i, role in enumerate(body)) or body[-1] != "user":
        raise PromptError(f"roles {roles}: expected an optional system message, then user and assistant "
                          "alternating, starting and ending with the user")
    return {"messages": messages, "images": images}


def _open(image: ImageInput) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    return open_image(image["path"] if isinstance(image, dict) else image)


def left_padded(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Moves each row of a right-padded collator batch to the right end (and the 2.x image bounds
    with it), dropping labels and position ids: `generate` appends tokens on the right, and derives
    positions from the attention mask. Pixel keys pass unchanged."""
    mask = batch["attention_mask"]
    width = mask.shape[1]
    shift = width - mask.sum(dim=1)  # [B] padding per row
    # new[t] = old[(t - shift) mod width]: the real tokens move right by `shift`, padding wraps left.
    index = (torch.arange(width) - shift[:, None]) % width
    out = {key: value for key, value in batch.items() if key not in ("labels", "position_ids")}
    out["input_ids"], out["attention_mask"] = batch["input_ids"].gather(1, index), mask.gather(1, index)
    if "image_bound" in batch:
        out["image_bound"] = batch["image_bound"].clone()
        out["image_bound"][:, 1:] += shift[out["image_bound"][:, 0]][:, None]
    return out


# --------------------------------------------------------------------------------------------- Chat


@torch.inference_mode()
def generate_ids(model, collator, tokens: SpecialTokens, prompts: list[dict], *, max_new_tokens: int = 512,
                 do_sample: bool = False, use_cache: bool = True, **sampling) -> list[list[int]]:
    """New token ids per prompt (`SampleEncoder.encode_prompt` output), cut before the first stop token.

    `model` is a model `load_model` loads (or a peft model around one) in eval mode; the training recipe's
    sample-generation callback passes the model being trained.
    """
    batch = left_padded(collator(prompts))
    inputs = {key: value.to(model.device) for key, value in batch.items()}
    # llava's and 4.6's processors give float pixels (none for a batch without images); 2.x batches
    # carry uint8, which the model normalises itself.
    if inputs.get("pixel_values") is not None and inputs["pixel_values"].is_floating_point():
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    if do_sample:
        options = {key: sampling[key] for key in ("temperature", "top_p", "top_k") if key in sampling}
    else:
        # Unset explicitly: a checkpoint's generation_config.json may set them, and transformers
        # warns that they are ignored.
        options = {"temperature": None, "top_p": None, "top_k": None}
    output = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        num_beams=1,
        repetition_penalty=sampling.get("repetition_penalty", 1.0),
        eos_token_id=list(tokens.stop_ids),
        pad_token_id=tokens.pad,
        use_cache=use_cache,
        **options,
    )
    stops = set(tokens.stop_ids)
    answers = []
    for row in output[:, batch["input_ids"].shape[1]:].tolist():
        end = next((i for i, token in enumerate(row) if token in stops), len(row))
        answers.append(row[:end])
    return answers


class Chat:
    """A model, its tokenizer and the training-time encoder, ready to answer.

    Args:
        model_dir: a hub-format model directory (a base, a full fine-tune or a merged model).
        adapter: a LoRA adapter directory from `finetune train --use_lora true`, applied on
            `model_dir` (folded into the weights in memory, as `finetune merge` does on disk).
        dtype: torch dtype or its name; default: the checkpoint's own (config.json).
        device: default: "cuda" where available, else "cpu".
        max_slice_nums: most slices per image; default: what the run that produced the model or
            adapter used (its run_config.json; for a merged model, its adapter's), else 9, the
            training default.
        attn_implementation: as for `load_model`.

    Raises:
        CheckpointError: `model_dir` or `adapter` is not a usable directory.
        UnsupportedModelError: a config of no family this toolkit reads (raised by loading).
        MissingSpecialTokenError: from loading the tokenizer.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        adapter: str | os.PathLike | None = None,
        dtype: torch.dtype | str | None = None,
        *,
        device: str | torch.device | None = None,
        max_slice_nums: int | None = None,
        attn_implementation: str = "sdpa",
    ) -> None:
        config = read_config(model_dir)
        family = detect_family(config)
        if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
            raise CheckpointError(f"{adapter}: no adapter_config.json; --adapter takes the output_dir (or a "
                                  "checkpoint-N) of a --use_lora run")
        run_dir = Path(adapter if adapter is not None else model_dir)
        settings = DataSettings(
            family=family,
            query_num=config.get("query_num", 0),  # 2.x only
            max_slice_nums=max_slice_nums or _trained_with(run_dir, "max_slice_nums") or DEFAULT_MAX_SLICE_NUMS,
            model_max_length=_trained_with(run_dir, "model_max_length") or 2048,
        )
        # The training encoder: ours for 2.x, the processor's for llava and 4.6.
        self.encoder = load_sample_encoder(model_dir, settings)
        self.tokenizer, self.tokens = self.encoder.tokenizer, self.encoder.tokens
        self.collator = self.encoder.collator()
        model = load_model(model_dir, dtype=dtype, attn_implementation=attn_implementation)
        if adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter, is_trainable=False).merge_and_unload()
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model: torch.nn.Module = model.to(device).eval()
        self.family = family

    @property
    def device(self) -> torch.device:
        return self.model.device

    def prompt(self, conversation: list[dict] | dict) -> dict:
        """The encoded prompt of one conversation: `input_ids`, `slices`, `image_spans` (and all-(-100)
        `labels`), as `SampleEncoder.encode` gives a training sample."""
        record = to_record(conversation)
        return self.encoder.encode_prompt(record, [_open(image) for image in record["images"]])

    @torch.inference_mode()
    def generate_batch(
        self,
        conversations: Sequence[list[dict] | dict],
        *,
        max_new_tokens: int = 512,
        do_sample: bool = False,
        temperature: float = 0.7,
        top_p: float = 0.8,
        top_k: int = 100,
        repetition_penalty: float = 1.0,
        use_cache: bool = True,
    ) -> list[str]:
        """Answers every conversation in one left-padded batch; returns one string per conversation.

        Greedy by default (`do_sample=False`; `temperature`, `top_p` and `top_k` apply to sampling
        only). Seed with `torch.manual_seed` for reproducible samples.
        """
        if not conversations:
            return []
        return [self.decode(ids) for ids in self.generate_ids(
            [self.prompt(c) for c in conversations], max_new_tokens=max_new_tokens, do_sample=do_sample,
            temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty,
            use_cache=use_cache,
        )]

    def generate_ids(self, prompts: list[dict], *, max_new_tokens: int = 512, do_sample: bool = False,
                     use_cache: bool = True, **sampling) -> list[list[int]]:
        """New token ids per prompt (from `prompt`), cut before the first stop token."""
        return generate_ids(self.model, self.collator, self.tokens, prompts, max_new_tokens=max_new_tokens,
                            do_sample=do_sample, use_cache=use_cache, **sampling)

    def decode(self, ids: list[int]) -> str:
        """The answer's text. Special tokens stay (MiniCPM-V writes `<ref>`, `<box>` in answers);
        stop tokens and padding were cut by `generate_ids`."""
        return self.tokenizer.decode(ids, skip_special_tokens=False).strip()

    def ask(
        self,
        question: str,
        images: Sequence[ImageInput] | None = None,
        history: list[dict] | None = None,
        **generation,
    ) -> str:
        """Answers one question; `images` go in front of it, in order.

        Args:
            question: the user's message.
            images: PIL images or paths.
            history: earlier messages (list form of the module docstring: user messages may carry
                `images`); not modified.
            **generation: as for `generate_batch` (max_new_tokens, do_sample, temperature, ...).

        Returns:
            The answer, without the stop token.
        """
        message = {"role": "user", "content": question, "images": list(images or [])}
        return self.generate_batch([[*(history or []), message]], **generation)[0]


def _trained_with(run_dir: Path, name: str) -> int | None:
    """A data argument of the run that wrote `run_dir` (its run_config.json), if it recorded one; for
    a `finetune merge` output, of the run that wrote its adapter (named in merge_info.json)."""
    try:
        if not (run_dir / "run_config.json").is_file() and (run_dir / "merge_info.json").is_file():
            run_dir = Path(json.loads((run_dir / "merge_info.json").read_text())["adapter"])
        return json.loads((run_dir / "run_config.json").read_text())["arguments"]["data"][name]
    except (OSError, KeyError, TypeError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------- CLI


def chat_main(argv: list[str]) -> int:
    """`finetune chat`; returns the exit status (2 for an unusable image or conversation)."""
    parser = argparse.ArgumentParser(prog="finetune chat", description="answer a question about images")
    parser.add_argument("question", nargs="?", help="the question (omit with --interactive)")
    parser.add_argument("--model", required=True, help="model directory (base, full fine-tune or merged)")
    parser.add_argument("--adapter", default=None, help="LoRA adapter directory to apply on --model")
    parser.add_argument("--image", action="append", default=[], metavar="PATH",
                        help="an image, placed in front of the question; repeat for several, in order")
    parser.add_argument("--interactive", action="store_true",
                        help="keep a multi-turn session: read questions from stdin until EOF or an empty line")
    parser.add_argument("--max_new_tokens", type=int, default=512)
    parser.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=0.7, help="with --do_sample")
    parser.add_argument("--top_p", type=float, default=0.8, help="with --do_sample")
    parser.add_argument("--seed", type=int, default=0, help="with --do_sample")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default: the checkpoint's")
    parser.add_argument("--max_slice_nums", type=int, default=None,
                        help="most slices per image; default: the training run's, else 9")
    args = parser.parse_args(argv)
    if not args.interactive and not args.question:
        parser.error("give a question, or --interactive")
    try:
        images = [open_image(path) for path in args.image]
    except ImageError as error:
        print(f"error: {error.reason} ({error.fix.replace('in the data file', 'given to --image')})",
              file=sys.stderr)
        return 2
    chat = Chat(args.model, args.adapter, args.dtype, max_slice_nums=args.max_slice_nums)
    options = {"max_new_tokens": args.max_new_tokens, "do_sample": args.do_sample,
               "temperature": args.temperature, "top_p": args.top_p}
    torch.manual_seed(args.seed)
    if not args.interactive:
        print(chat.ask(args.question, images, **options))
        return 0
    history: list[dict] = []
    question = args.question
    while True:
        if question is None:
            print("> ", end="", file=sys.stderr, flush=True)
            line = sys.stdin.readline()
            if not line.strip():
                return 0
            question = line.rstrip("\n")
        answer = chat.ask(question, images, history, **options)
        print(answer, flush=True)
        history += [{"role": "user", "content": question, "images": images},
                    {"role": "assistant", "content": answer}]
        question, images = None, []  # the images belong to the first question


__all__ = ["Chat", "PromptError", "chat_main", "left_padded", "to_record"]
