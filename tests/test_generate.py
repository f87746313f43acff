"""Generation on tiny models: prompts match training, greedy decoding equals an uncached argmax loop,
a left-padded batch equals its prompts one at a time, and `finetune chat` answers."""

from __future__ import annotations

import dataclasses
import io

import pytest
import torch
from PIL import Image

from finetune.cli import main
from finetune.data.dataset import SampleEncoder
from finetune.data.slicing import plan_slices
from finetune.generate import Chat, PromptError, to_record

FAMILIES = ("2.0", "2.5", "2.6")
MAX_SLICE_NUMS = 2  # a wide image becomes source + 2 cells: the grid path at a third of 9's cost
NEW_TOKENS = 6


def _image(width: int, height: int, seed: int) -> Image.Image:
    pixels = (torch.rand(height, width, 3, generator=torch.Generator().manual_seed(seed)) * 255).to(torch.uint8)
    return Image.fromarray(pixels.numpy())


WIDE = _image(900, 450, 1)  # sliced: 2 x 1 grid
SMALL = _image(64, 48, 2)  # not sliced


@pytest.fixture(scope="module", params=FAMILIES)
def chat(request) -> Chat:
    chat = Chat(request.getfixturevalue(f"tiny_v{request.param.replace('.', '_')}_dir"), max_slice_nums=MAX_SLICE_NUMS)
    # Slices of 224 instead of 448 pixels: a quarter of the patches, the same code path.
    chat.encoder = SampleEncoder(dataclasses.replace(chat.encoder.settings, scale_resolution=224),
                                 chat.tokenizer, chat.tokens)
    return chat


@torch.no_grad()
def _argmax_loop(chat: Chat, prompt: dict, steps: int) -> list[int]:
    """Greedy decoding the slow way: re-run the whole sequence, images included, for every token."""
    batch = chat.collator([prompt])
    ids = batch["input_ids"]
    new: list[int] = []
    for _ in range(steps):
        length = ids.shape[1]
        logits = chat.model(
            input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=torch.arange(length)[None],
            pixel_values=batch["pixel_values"], tgt_sizes=batch["tgt_sizes"], image_bound=batch["image_bound"],
            use_cache=False,
        ).logits
        token = int(logits[0, -1].argmax())
        if token in chat.tokens.stop_ids:
            break
        new.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return new


def test_greedy_equals_uncached_argmax_loop_and_is_deterministic(chat):
    prompt = chat.prompt([{"role": "user", "content": "What is in the picture?", "images": [WIDE]}])
    cached = chat.generate_ids([prompt], max_new_tokens=NEW_TOKENS)
    assert cached == chat.generate_ids([prompt], max_new_tokens=NEW_TOKENS)
    assert cached == chat.generate_ids([prompt], max_new_tokens=NEW_TOKENS, use_cache=False)
    assert cached == [_argmax_loop(chat, prompt, NEW_TOKENS)]


def test_left_padded_batch_equals_one_at_a_time(chat):
    conversations = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "user", "content": "Describe both pictures in a few words, please.", "images": [WIDE, SMALL]}],
        [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": "What is this?", "images": [SMALL]},
         {"role": "assistant", "content": "A picture."},
         {"role": "user", "content": "And its colour?"}],
    ]
    prompts = [chat.prompt(c) for c in conversations]
    assert len({len(p["input_ids"]) for p in prompts}) == 3  # every row is padded differently
    alone = [chat.generate_ids([p], max_new_tokens=NEW_TOKENS)[0] for p in prompts]
    assert chat.generate_ids(prompts, max_new_tokens=NEW_TOKENS) == alone
    assert chat.generate_batch(conversations, max_new_tokens=NEW_TOKENS) == [chat.decode(ids) for ids in alone]


def test_prompt_is_the_training_encoding_up_to_the_answer(chat):
    """The prompt is the training sample of the same exchange, cut where the answer starts."""
    question = {"role": "user", "content": "<image_00>\nWhat is it?"}
    prompt = chat.prompt({"messages": [question], "images": [WIDE]})
    sample = chat.encoder.encode({"messages": [question, {"role": "assistant", "content": "A cat."}]}, [WIDE])
    n = len(prompt["input_ids"])
    assert torch.equal(prompt["input_ids"], sample["input_ids"][:n])
    assert sample["labels"][n - 1] == -100 and sample["labels"][n] != -100  # the answer starts right after
    assert torch.equal(prompt["image_spans"], sample["image_spans"])
    assert all(torch.equal(a, b) for a, b in zip(prompt["slices"], sample["slices"], strict=True))
    header = {"2.0": "<AI>", "2.5": "<|start_header_id|>assistant<|end_header_id|>\n\n",
              "2.6": "<|im_start|>assistant\n"}[chat.family]
    assert chat.tokenizer.decode(prompt["input_ids"]).endswith(header)


@pytest.mark.parametrize("images", [[], [SMALL], [WIDE, SMALL, WIDE]], ids=["0", "1", "3"])
def test_ask_with_images(chat, images):
    answer = chat.ask("What do you see?", images=images, max_new_tokens=3)
    assert isinstance(answer, str)
    prompt = chat.prompt([{"role": "user", "content": "What do you see?", "images": images}])
    ids, t, q = prompt["input_ids"], chat.tokens, chat.encoder.settings.query_num
    slices = sum(plan_slices(*image.size, max_slice_nums=MAX_SLICE_NUMS, scale_resolution=224).num_slices
                 for image in images)
    assert len(prompt["image_spans"]) == len(prompt["slices"]) == slices
    assert int((ids == t.unk).sum()) == slices * q
    for start in prompt["image_spans"].tolist():  # each span: start token, q placeholders, end token
        assert ids[start - 1] in (t.image_start, t.slice_start) and ids[start + q] in (t.image_end, t.slice_end)
        assert bool((ids[start : start + q] == t.unk).all())
    if chat.family == "2.6":  # every image is numbered, in order
        assert int((ids == t.image_id_start).sum()) == len(images)
    # Images go in front of the question, in order: the first span comes before the question's text.
    if images:
        question_at = chat.tokenizer.decode(ids).index("What do you see?")
        assert len(chat.tokenizer.decode(ids[: int(prompt["image_spans"][-1])])) < question_at


def test_sampling_is_reproducible_with_a_seed(chat):
    torch.manual_seed(0)
    first = chat.ask("Hello", max_new_tokens=4, do_sample=True, temperature=1.5)
    torch.manual_seed(0)
    assert chat.ask("Hello", max_new_tokens=4, do_sample=True, temperature=1.5) == first


def test_conversation_errors_name_the_message():
    with pytest.raises(PromptError, match="message 1: only user messages"):
        to_record([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "images": [SMALL]},
                   {"role": "user", "content": "c"}])
    with pytest.raises(PromptError, match="ending with the user"):
        to_record([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    with pytest.raises(PromptError, match="markers"):
        to_record({"messages": [{"role": "user", "content": "<image_01> a"}], "images": [SMALL]})


def test_chat_cli_one_turn_and_interactive(tiny_v2_6_dir, tmp_path, capsys, monkeypatch):
    paths = []
    for index, image in enumerate((WIDE, SMALL)):
        paths.append(str(tmp_path / f"{index}.png"))
        image.save(paths[-1])
    common = ["chat", "--model", str(tiny_v2_6_dir), "--max_new_tokens", "3", "--max_slice_nums", "2"]
    assert main([*common, "--image", paths[0], "--image", paths[1], "What are these?"]) == 0
    assert capsys.readouterr().out.endswith("\n")  # the answer (random weights: any text)

    monkeypatch.setattr("sys.stdin", io.StringIO("And now?\n\n"))
    assert main([*common, "--image", paths[0], "--interactive", "What is it?"]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("> ") == 2  # the first question came as an argument; then "And now?", then ""
    assert captured.out.count("\n") >= 2  # two answers

    with pytest.raises(SystemExit, match="2"):  # cli.py's convention for a command's own exit status
        main([*common, "--image", str(tmp_path / "missing.png"), "What?"])
    assert "image file not found" in capsys.readouterr().err
