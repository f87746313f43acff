"""Chat templates, image placeholders and assistant-only labels per family (spec §3.3, §4).

A conversation is encoded piece by piece: template text and message text go through the tokenizer,
image placeholders are emitted as token ids directly (so no text can be mistaken for one), and the
labels are built in the same pass. Labels follow the transformers convention (unshifted, -100 where
nothing is trained): the assistant's answer and its end-of-turn token are trained, nothing else.

Templates (tests check each against the tokenizer's own chat template):
- 2.0: `<s><用户>{user}<AI>{assistant}</s>` ... The released fine-tune drops the BOS that inference
  adds; we keep it, so training sees what `chat` sends at inference.
- 2.5: `<|begin_of_text|>` then `<|start_header_id|>{role}<|end_header_id|>\\n\\n{content.strip()}<|eot_id|>`.
- 2.6: ChatML, `<|im_start|>{role}\\n{content}<|im_end|>\\n`, no BOS.

The reference recipe also overwrites the label after each non-final answer with the end-of-turn id
(spec §4.4); that only teaches `<|eot_id|>` to follow `<|eot_id|>`, so it is not reproduced.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from ..models.config import Family
from ..models.tokenizer import SpecialTokens

IGNORE_INDEX = -100
# Canonical records mark image k (text order) as `<image_NN>` with NN = k (see formats.py).
IMAGE_MARKER = re.compile(r"<image_(\d+)>")


@dataclass(frozen=True)
class ImageLayout:
    """How one image is sliced: (cols, rows) of its grid, or None when only the source is used."""

    grid: tuple[int, int] | None

    @property
    def num_slices(self) -> int:
        return 1 + (0 if self.grid is None else self.grid[0] * self.grid[1])


@dataclass
class Encoded:
    """One encoded conversation.

    `image_spans[k]` is the start index of slice k's `query_num` placeholder tokens, in the order of
    the slices (images in text order, each: source, then grid cells row by row).
    """

    input_ids: list[int]
    labels: list[int]
    image_spans: list[int]
    num_images: int  # images kept (fewer than given when turns were truncated)
    dropped_turns: int = 0  # answers dropped from the end to fit model_max_length
    answer_tokens: int = 0  # trained tokens of answer text (end-of-turn tokens not counted)


class ConversationTooLongError(ValueError):
    """Even the first exchange does not fit in model_max_length, or truncation was refused."""


class NothingToTrainError(ValueError):
    """No assistant token is left to compute a loss on."""


class ChatEncoder:
    """Encodes canonical conversations for one family and tokenizer."""

    def __init__(self, family: Family, tokenizer: PreTrainedTokenizerBase, tokens: SpecialTokens, query_num: int):
        self.family = family
        self.tokenizer = tokenizer
        self.tokens = tokens
        self.query_num = query_num
        self._newline = self._text("\n")
        # Token ids around each role's content, tokenised once: every turn of every sample uses them.
        self._frames = {role: self._turn_frame(role) for role in ("system", "user", "assistant")}

    def _text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False) if text else []

    # -- image placeholders --------------------------------------------------------------------------

    def image_placeholder(self, layout: ImageLayout, image_index: int) -> tuple[list[int], list[int]]:
        """Token ids of one image's placeholder and the offsets of its slices' spans within them."""
        t = self.tokens
        ids: list[int] = []
        spans: list[int] = []

        def span(start: int, end: int) -> None:
            ids.append(start)
            spans.append(len(ids))
            ids.extend([t.unk] * self.query_num)
            ids.append(end)

        if self.family == "2.6":
            # 2.6 numbers images 0, 1, ... in text order on every image, as its inference does.
            ids.append(t.image_id_start)
            ids.extend(self._text(str(image_index)))
            ids.append(t.image_id_end)
        span(t.image_start, t.image_end)
        if layout.grid is None:
            return ids, spans
        cols, rows = layout.grid
        if self.family != "2.6":
            ids.append(t.slice_start)
        for row in range(rows):
            if row:
                ids.extend(self._newline)
            for _ in range(cols):
                if self.family == "2.6":
                    span(t.slice_start, t.slice_end)
                else:
                    span(t.image_start, t.image_end)
        if self.family != "2.6":
            ids.append(t.slice_end)
        return ids, spans

    # -- templates -----------------------------------------------------------------------------------

    def _turn_frame(self, role: str) -> tuple[list[int], list[int]]:
        """Token ids before and after a message's content (2.0 ends answers in `encode`)."""
        if self.family == "2.0":
            return self._text({"user": "<用户>", "assistant": "<AI>", "system": ""}[role]), []
        if self.family == "2.5":
            return self._text(f"<|start_header_id|>{role}<|end_header_id|>\n\n"), [self.tokens.eot_id]
        return self._text(f"<|im_start|>{role}\n"), [self.tokens.eot_id] + self._newline

    def _content(self, content: str, layouts: list[ImageLayout], spans: list[int], offset: int) -> list[int]:
        ids: list[int] = []
        if self.family == "2.5":
            content = content.strip()
        position = 0
        for match in IMAGE_MARKER.finditer(content):
            ids.extend(self._text(content[position : match.start()]))
            index = int(match.group(1))
            placeholder, image_spans = self.image_placeholder(layouts[index], index)
            spans.extend(offset + len(ids) + s for s in image_spans)
            ids.extend(placeholder)
            position = match.end()
        ids.extend(self._text(content[position:]))
        return ids

    def _encode_all(self, messages: list[dict], layouts: list[ImageLayout]) -> Encoded:
        t = self.tokens
        with_bos = self.family in ("2.0", "2.5") and t.bos is not None
        input_ids: list[int] = [t.bos] if with_bos else []
        labels: list[int] = [IGNORE_INDEX] * len(input_ids)
        spans: list[int] = []
        owes_stop = False  # 2.0: the answer just written still needs its stop label
        answer_tokens = 0
        for message in messages:
            role = message["role"]
            before, after = self._frames[role]
            start = len(input_ids)
            input_ids.extend(before)
            labels.extend([IGNORE_INDEX] * len(before))
            if owes_stop and before:
                # 2.0's history has no </s> between turns (as at inference), so the end of a
                # non-final answer is taught by labelling the next turn's first token </s>.
                labels[start] = t.eos
                owes_stop = False
            body = self._content(message["content"], layouts, spans, len(input_ids))
            input_ids.extend(body + after)
            if role == "assistant":
                labels.extend(body + after[:1] + [IGNORE_INDEX] * (len(after) - 1))
                answer_tokens += len(body)
                owes_stop = self.family == "2.0"
            else:
                labels.extend([IGNORE_INDEX] * (len(body) + len(after)))
        if owes_stop:
            input_ids.append(t.eos)
            labels.append(t.eos)
        num_images = sum(len(IMAGE_MARKER.findall(m["content"])) for m in messages)
        return Encoded(input_ids, labels, spans, num_images, answer_tokens=answer_tokens)

    def encode_prompt(self, messages: list[dict], layouts: list[ImageLayout]) -> Encoded:
        """A generation prompt: the conversation so far, encoded as in training, then the family's
        assistant header (2.0 `<AI>`, 2.5 `<|start_header_id|>assistant<|end_header_id|>\\n\\n`,
        2.6 `<|im_start|>assistant\\n`). Nothing is trained, so every label is -100.

        Raises:
            ValueError: the conversation does not end with a user turn.
        """
        if not messages or messages[-1]["role"] != "user":
            raise ValueError("a generation prompt must end with a user turn")
        encoded = self._encode_all(messages, layouts)
        encoded.input_ids.extend(self._frames["assistant"][0])
        encoded.labels = [IGNORE_INDEX] * len(encoded.input_ids)
        return encoded

    def encode(
        self,
        messages: list[dict],
        layouts: list[ImageLayout],
        *,
        max_length: int | None = None,
        truncate: bool = True,
    ) -> Encoded:
        """Encodes a conversation whose content marks image k as `<image_NN>` (NN = k).

        Over-long conversations lose whole user/assistant exchanges from the end, never part of one,
        so an image's placeholder is never cut (its slices go with it).

        Raises:
            ConversationTooLongError: the first exchange alone is too long, or `truncate` is False.
            NothingToTrainError: no assistant answer to train on.
        """
        answer_ends = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if not answer_ends:
            raise NothingToTrainError("the conversation has no assistant answer to train on")
        full_length = None
        for kept in range(len(answer_ends), 0, -1):
            encoded = self._encode_all(messages[: answer_ends[kept - 1] + 1], layouts)
            full_length = full_length or len(encoded.input_ids)
            if max_length is None or len(encoded.input_ids) <= max_length:
                # The end-of-turn token is always labelled, so test the answers' own tokens: a
                # sample that only teaches "stop at once" has nothing to train on.
                if encoded.answer_tokens == 0:
                    raise NothingToTrainError("every assistant answer is empty after tokenisation")
                encoded.dropped_turns = len(answer_ends) - kept
                return encoded
            if not truncate:
                raise ConversationTooLongError(
                    f"{full_length} tokens (images included), over model_max_length {max_length}"
                )
        raise ConversationTooLongError(
            f"the first exchange alone is {len(encoded.input_ids)} tokens (images included), over "
            f"model_max_length {max_length}; raise model_max_length or lower max_slice_nums"
        )


__all__ = [
    "ChatEncoder",
    "ConversationTooLongError",
    "Encoded",
    "IGNORE_INDEX",
    "IMAGE_MARKER",
    "ImageLayout",
    "NothingToTrainError",
]
