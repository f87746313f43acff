"""ChatEncoder per family: chat templates, image placeholders, labels and truncation (spec §3.3, §4).

Every family is checked against its tokenizer's own chat template (the tiny tokenizers carry the
released templates), with the known differences pinned: 2.5's shipped template always appends the
generation prompt, which training leaves out; 2.0's template has no stop token, which training
appends. Image placeholders are checked twice: token by token against spec §3.3, and as a whole
against the reference way of building them (expand the placeholder string, then tokenise it).
"""

from __future__ import annotations

import pytest

from finetune.data.templates import (
    IGNORE_INDEX,
    ChatEncoder,
    ConversationTooLongError,
    Encoded,
    ImageLayout,
    NothingToTrainError,
)
from finetune.models.loading import read_config
from finetune.models.tokenizer import load_tokenizer, special_token_ids

FAMILIES = ["2.0", "2.5", "2.6"]
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
TEXT_CHAT = [
    {"role": "user", "content": "What is in the picture?"},
    {"role": "assistant", "content": "A small brown dog."},
    {"role": "user", "content": "How many cats are there?"},
    {"role": "assistant", "content": "There are three cats."},
]
# Three images in text order: sliced 3 cols x 2 rows, unsliced, sliced 1 col x 2 rows.
IMAGE_CHAT = [
    {"role": "user", "content": "<image_00>\nWhat is in the picture?"},
    {"role": "assistant", "content": "A small brown dog."},
    {"role": "user", "content": "Compare <image_01> and <image_02>, please."},
    {"role": "assistant", "content": "There are three cats."},
]
LAYOUTS = [ImageLayout((3, 2)), ImageLayout(None), ImageLayout((1, 2))]
GENERATION_PROMPT_2_5 = "<|start_header_id|>assistant<|end_header_id|>\n\n"
END_OF_TURN = {"2.0": "</s>", "2.5": "<|eot_id|>", "2.6": "<|im_end|>"}


class Setup:
    def __init__(self, family: str, directory) -> None:
        self.family = family
        self.tokenizer = load_tokenizer(directory)
        self.tokens = special_token_ids(self.tokenizer)
        self.query_num = read_config(directory)["query_num"]
        self.chat = ChatEncoder(family, self.tokenizer, self.tokens, self.query_num)

    def text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def template(self, messages: list[dict]) -> list[int]:
        """The tokenizer's own chat-template tokenization (no generation prompt asked for)."""
        ids = self.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=False)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def expected_from_template(self, messages: list[dict]) -> list[int]:
        """What our encoding must be, given the template's tokens: the known differences, pinned."""
        ids = self.template(messages)
        if self.family == "2.5":
            tail = self.text(GENERATION_PROMPT_2_5)
            assert ids[-len(tail):] == tail, "the 2.5 template always ends with the generation prompt"
            return ids[: -len(tail)]
        if self.family == "2.0":
            return ids + [self.tokens.eos]
        return ids


@pytest.fixture(params=FAMILIES)
def setup(request, tiny_model_dir) -> Setup:
    return Setup(request.param, tiny_model_dir(request.param))


def placeholder_text(family: str, layout: ImageLayout, index: int, query_num: int) -> str:
    """Spec §3.3's placeholder string of one image, built the way the reference builds it."""
    unks = "<unk>" * query_num
    image = f"<image>{unks}</image>"
    if family == "2.6":
        image = f"<image_id>{index}</image_id>" + image
        cell = f"<slice>{unks}</slice>"
    else:
        cell = f"<image>{unks}</image>"
    if layout.grid is None:
        return image
    cols, rows = layout.grid
    grid = "\n".join(cell * cols for _ in range(rows))
    return image + grid if family == "2.6" else image + f"<slice>{grid}</slice>"


def expanded(messages: list[dict], family: str, query_num: int) -> list[dict]:
    """`messages` with each `<image_NN>` marker replaced by its placeholder string."""
    out = []
    for message in messages:
        content = message["content"]
        for index, layout in enumerate(LAYOUTS):
            content = content.replace(f"<image_{index:02d}>", placeholder_text(family, layout, index, query_num))
        out.append({**message, "content": content})
    return out


def trained_runs(setup: Setup, encoded: Encoded) -> list[str]:
    """Decoded label values of each run of consecutive trained positions."""
    runs, current = [], []
    for label in encoded.labels + [IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            current.append(label)
        elif current:
            runs.append(setup.tokenizer.decode(current))
            current = []
    return runs


# ------------------------------------------------------------------------------------ templates


@pytest.mark.parametrize("with_system", [False, True])
def test_text_conversation_equals_chat_template(setup, with_system):
    messages = ([SYSTEM] if with_system else []) + TEXT_CHAT
    ours = setup.chat.encode(messages, []).input_ids
    template = setup.template(messages)
    if setup.family == "2.6":
        assert ours == template
    elif setup.family == "2.5":
        # The shipped 2.5 template appends the assistant header even without add_generation_prompt.
        assert template == ours + setup.text(GENERATION_PROMPT_2_5)
    else:
        # 2.0's template has no stop token; training ends the last answer with </s>.
        assert template + [setup.tokens.eos] == ours
    if setup.family in ("2.0", "2.5"):
        assert ours[0] == setup.tokens.bos and ours.count(setup.tokens.bos) == 1
    else:  # no BOS in 2.6 (the tiny tokenizer's named bos is <|im_start|>, which opens each turn)
        assert ours[: len(setup.text("<|im_start|>"))] == setup.text("<|im_start|>")


@pytest.mark.parametrize("family", ["2.5", "2.6"])
def test_whitespace_around_content_follows_the_template(tiny_model_dir, family):
    """2.5's template trims every message; 2.6's keeps content verbatim. Ours does the same."""
    setup = Setup(family, tiny_model_dir(family))
    messages = [
        {"role": "user", "content": "  What is in the picture?\n"},
        {"role": "assistant", "content": " A small brown dog.  "},
    ]
    assert setup.chat.encode(messages, []).input_ids == setup.expected_from_template(messages)
    trimmed = [{**m, "content": m["content"].strip()} for m in messages]
    same = setup.chat.encode(messages, []).input_ids == setup.chat.encode(trimmed, []).input_ids
    assert same == (family == "2.5")


def test_2_6_content_starting_with_a_newline_is_a_known_difference(tiny_model_dir):
    """Known difference, pinned: we tokenise the turn header and the content apart, so a 2.6 message
    whose content starts with "\n" gives "\n" + "\n..." where the template's one string merges
    "\n\n" (one id in Qwen2 and in the tiny BPE). Same text, different ids; 2.5 trims it away."""
    setup = Setup("2.6", tiny_model_dir("2.6"))
    messages = [TEXT_CHAT[0], {"role": "assistant", "content": "\nA small brown dog."}]
    ours = setup.chat.encode(messages, []).input_ids
    template = setup.template(messages)
    assert ours != template
    assert setup.tokenizer.decode(ours) == setup.tokenizer.decode(template)
    assert len(ours) == len(template) + 1


# --------------------------------------------------------------------------------- placeholders


def test_placeholders_equal_the_expanded_spec_strings(setup):
    """Ids emitted directly == the reference way: expand the §3.3 strings, tokenise with the template."""
    encoded = setup.chat.encode(IMAGE_CHAT, LAYOUTS)
    reference = setup.expected_from_template(expanded(IMAGE_CHAT, setup.family, setup.query_num))
    assert encoded.input_ids == reference
    assert encoded.num_images == 3


@pytest.mark.parametrize("index", [0, 1, 12])
def test_placeholder_tokens_per_spec(setup, index):
    t, q = setup.tokens, setup.query_num
    unks = [t.unk] * q
    newline = setup.text("\n")
    layout = ImageLayout((2, 3))  # 2 cols x 3 rows
    ids, spans = setup.chat.image_placeholder(layout, index)
    if setup.family == "2.6":
        cell = [t.slice_start, *unks, t.slice_end]
        row = cell * 2
        expected = [t.image_id_start, *setup.text(str(index)), t.image_id_end, t.image_start, *unks, t.image_end]
        expected += row + newline + row + newline + row
    else:
        cell = [t.image_start, *unks, t.image_end]
        row = cell * 2
        expected = [t.image_start, *unks, t.image_end, t.slice_start, *row, *newline, *row, *newline, *row, t.slice_end]
    assert ids == expected
    assert setup.tokenizer.decode(ids) == placeholder_text(setup.family, layout, index, q)
    assert len(spans) == layout.num_slices == 7

    unsliced, unsliced_spans = setup.chat.image_placeholder(ImageLayout(None), index)
    prefix = [t.image_id_start, *setup.text(str(index)), t.image_id_end] if setup.family == "2.6" else []
    assert unsliced == prefix + [t.image_start, *unks, t.image_end]
    assert unsliced_spans == [len(prefix) + 1]


def test_image_spans_point_at_unk_runs(setup):
    t, q = setup.tokens, setup.query_num
    encoded = setup.chat.encode(IMAGE_CHAT, LAYOUTS)
    ids = encoded.input_ids
    assert len(encoded.image_spans) == sum(layout.num_slices for layout in LAYOUTS) == 7 + 1 + 3
    assert encoded.image_spans == sorted(encoded.image_spans)
    # 2.0/2.5 take bounds from <image> pairs only (grid cells are <image> too, inside one <slice>
    # wrapper per sliced image); 2.6 takes <image> for the source and <slice> for each cell.
    starts = [ids[s - 1] for s in encoded.image_spans]
    ends = [ids[s + q] for s in encoded.image_spans]
    if setup.family == "2.6":
        per_image = [[t.image_start] + [t.slice_start] * (layout.num_slices - 1) for layout in LAYOUTS]
        assert starts == sum(per_image, [])
        assert ends == [t.image_end if s == t.image_start else t.slice_end for s in starts]
    else:
        assert starts == [t.image_start] * len(starts)
        assert ends == [t.image_end] * len(ends)
        assert ids.count(t.slice_start) == ids.count(t.slice_end) == 2  # one wrapper per sliced image
    for start in encoded.image_spans:
        assert ids[start : start + q] == [t.unk] * q
    # No <unk> outside the spans: every placeholder token belongs to exactly one slice.
    assert ids.count(t.unk) == q * len(encoded.image_spans)
    # Image placeholders are never trained.
    assert all(encoded.labels[s + k] == IGNORE_INDEX for s in encoded.image_spans for k in range(-1, q + 1))


def test_image_ids_follow_text_order_on_every_image(setup):
    text = setup.tokenizer.decode(setup.chat.encode(IMAGE_CHAT, LAYOUTS).input_ids)
    if setup.family == "2.6":
        positions = [text.index(f"<image_id>{k}</image_id><image>") for k in range(3)]
        assert positions == sorted(positions)
        assert text.count("<image_id>") == 3  # sliced and unsliced images alike
    else:
        assert "<image_id>" not in text


# --------------------------------------------------------------------------------------- labels


def test_only_answers_and_their_end_token_are_trained(setup):
    messages = [SYSTEM] + IMAGE_CHAT
    encoded = setup.chat.encode(messages, LAYOUTS)
    end = END_OF_TURN[setup.family]
    assert trained_runs(setup, encoded) == [f"A small brown dog.{end}", f"There are three cats.{end}"]
    assert len(encoded.labels) == len(encoded.input_ids)
    assert encoded.answer_tokens == len(setup.text("A small brown dog.")) + len(setup.text("There are three cats."))

    trained = [i for i, label in enumerate(encoded.labels) if label != IGNORE_INDEX]
    ids, labels = encoded.input_ids, encoded.labels
    if setup.family == "2.0":
        # History carries no </s> between turns (as at inference): the first token of the next
        # user turn is labelled </s> instead; the final answer ends with a real </s>.
        first_stop = trained[len(setup.text("A small brown dog."))]
        assert labels[first_stop] == setup.tokens.eos
        assert ids[first_stop] == setup.text("<用户>")[0]
        assert ids[-1] == labels[-1] == setup.tokens.eos
        unshifted = [i for i in trained if i != first_stop]
    else:
        unshifted = trained
        if setup.family == "2.6":
            # <|im_end|> is trained, the "\n" after it is not.
            for i in trained:
                if ids[i] == setup.tokens.eot_id:
                    assert ids[i + 1 : i + 2] == setup.text("\n") and labels[i + 1] == IGNORE_INDEX
    # Unshifted (HF convention): the label at t is the token at t.
    assert all(labels[i] == ids[i] for i in unshifted)

    # System and user turns, and the template around answers, are never trained.
    untrained = setup.tokenizer.decode([ids[i] for i in range(len(ids)) if labels[i] == IGNORE_INDEX])
    for text in ("You are a helpful assistant.", "What is in the picture?", "Compare", "please."):
        assert text in untrained


# ----------------------------------------------------------------------------------- truncation

THREE_EXCHANGES = [
    {"role": "user", "content": "<image_00>\nWhat is in the picture?"},
    {"role": "assistant", "content": "A small brown dog."},
    {"role": "user", "content": "And here? <image_01>"},
    {"role": "assistant", "content": "There are three cats."},
    {"role": "user", "content": "<image_02> How about this one?"},
    {"role": "assistant", "content": "A page of text, a chart and a table."},
]


def test_overlong_sample_loses_whole_exchanges_from_the_end(setup):
    full = setup.chat.encode(THREE_EXCHANGES, LAYOUTS)
    two = setup.chat.encode(THREE_EXCHANGES[:4], LAYOUTS)
    one = setup.chat.encode(THREE_EXCHANGES[:2], LAYOUTS)
    assert full.dropped_turns == 0 and len(one.input_ids) < len(two.input_ids) < len(full.input_ids)
    end = END_OF_TURN[setup.family]

    for max_length, kept, runs in [
        (len(full.input_ids), full, 3),
        (len(full.input_ids) - 1, two, 2),
        (len(two.input_ids), two, 2),
        (len(two.input_ids) - 1, one, 1),
        (len(one.input_ids), one, 1),
    ]:
        encoded = setup.chat.encode(THREE_EXCHANGES, LAYOUTS, max_length=max_length)
        assert len(encoded.input_ids) <= max_length
        assert encoded.dropped_turns == 3 - runs
        assert encoded.input_ids == kept.input_ids and encoded.labels == kept.labels
        # The kept images and their spans are a prefix of the full sample's; none is cut.
        assert encoded.num_images == runs
        slices = sum(layout.num_slices for layout in LAYOUTS[:runs])
        assert encoded.image_spans == full.image_spans[:slices]
        assert len(trained_runs(setup, encoded)) == runs
        assert trained_runs(setup, encoded)[-1].endswith(end)
        if setup.family != "2.0":  # 2.0 closes the last kept answer with an appended </s>
            assert encoded.input_ids == full.input_ids[: len(encoded.input_ids)]


def test_truncation_refused_raises(setup):
    full = setup.chat.encode(THREE_EXCHANGES, LAYOUTS)
    limit = len(full.input_ids) - 1
    with pytest.raises(ConversationTooLongError, match=rf"{len(full.input_ids)} tokens .*over model_max_length {limit}"):
        setup.chat.encode(THREE_EXCHANGES, LAYOUTS, max_length=limit, truncate=False)
    # A sample that fits is kept whole either way.
    assert setup.chat.encode(THREE_EXCHANGES, LAYOUTS, max_length=limit + 1, truncate=False).dropped_turns == 0


def test_first_exchange_too_long_raises_with_its_length(setup):
    first = len(setup.chat.encode(THREE_EXCHANGES[:2], LAYOUTS).input_ids)
    with pytest.raises(ConversationTooLongError, match=rf"first exchange alone is {first} tokens.*{first - 1}"):
        setup.chat.encode(THREE_EXCHANGES, LAYOUTS, max_length=first - 1)


def test_answers_that_tokenize_to_nothing_raise(setup):
    empty = [{**m, "content": ""} if m["role"] == "assistant" else m for m in TEXT_CHAT]
    with pytest.raises(NothingToTrainError):
        setup.chat.encode(empty, [])
    with pytest.raises(NothingToTrainError):
        setup.chat.encode(TEXT_CHAT[:1], [])  # no answer at all
    # One non-empty answer is enough.
    assert setup.chat.encode(empty[:3] + TEXT_CHAT[3:], []).answer_tokens > 0


def test_2_5_whitespace_only_answer_is_nothing_to_train(tiny_model_dir):
    setup = Setup("2.5", tiny_model_dir("2.5"))  # 2.5 trims content, as its template does
    with pytest.raises(NothingToTrainError):
        setup.chat.encode([TEXT_CHAT[0], {"role": "assistant", "content": " \n "}], [])
