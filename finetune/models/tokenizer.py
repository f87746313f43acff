"""Tokenizer loading, special-token lookup and tiny test tokenizers for MiniCPM-V 2.0, 2.5 and 2.6.

The released checkpoints name remote tokenizer classes (`MiniCPMVTokenizerFast` over a tokenizer.json
for 2.5/2.6, `MiniCPMVTokenizer`, a SentencePiece `LlamaTokenizer`, for 2.0). We never run that code.
transformers 5 lists `minicpmv` in `MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS`, so even `AutoTokenizer`
ignores the remote class and builds a generic `TokenizersBackend`; `load_tokenizer` picks the same
class directly, without `AutoTokenizer`'s detour through config.json (see its docstring).

The remote classes only added id properties (`im_start_id`, `slice_start_id`, `eot_id`, ...), so
`special_token_ids` resolves those ids from the vocabulary instead (spec §4.1: never hard-code them).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaTokenizer, PreTrainedTokenizerBase, TokenizersBackend
from transformers.utils import is_sentencepiece_available

from .config import Family

# ---------------------------------------------------------------------------------------------------
# Per-family token conventions (spec §4.1, §4.2)
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _FamilyTokens:
    marker: str  # a token only this family's vocabulary has, used to tell the families apart
    stop: tuple[str, ...]  # generation stops at any of these
    eot: str  # closes an assistant turn; the official target builder's `eot_id`, else `eos_id`
    pad: str  # the pad token the released tokenizer_config names, used when a directory names none


# Checked in this order: Qwen2 (2.6) and Llama-3 (2.5) vocabularies have no `</s>` token, but test
# the most specific marker first anyway.
_FAMILY_TOKENS: dict[Family, _FamilyTokens] = {
    "2.6": _FamilyTokens(
        marker="<|im_end|>", stop=("<|im_end|>", "<|endoftext|>"), eot="<|im_end|>", pad="<|endoftext|>"
    ),
    "2.5": _FamilyTokens(
        marker="<|eot_id|>", stop=("<|end_of_text|>", "<|eot_id|>"), eot="<|eot_id|>", pad="!"
    ),
    "2.0": _FamilyTokens(marker="</s>", stop=("</s>",), eot="</s>", pad="<unk>"),
}


class MissingSpecialTokenError(ValueError):
    """A tokenizer lacks a token MiniCPM-V needs as a single id (an image or slice marker, a stop token)."""


# ---------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------


def load_tokenizer(path: str | os.PathLike[str]) -> PreTrainedTokenizerBase:
    """Loads the tokenizer of a hub-format model directory without running remote code.

    - With a tokenizer.json (2.5, 2.6, our tiny tokenizers, anything saved by `save_pretrained`):
      `TokenizersBackend`, the class `AutoTokenizer` itself falls back to for `minicpmv`. We call it
      directly because `AutoTokenizer` first loads config.json through `AutoConfig`, which for a
      config with `auto_map` and no `trust_remote_code` asks on the terminal whether to run the code,
      and which fails outright on a directory without config.json.
    - With only tokenizer.model (2.0's SentencePiece BPE): `LlamaTokenizer`, the class the remote
      `MiniCPMVTokenizer` subclasses, converted to a fast tokenizer by transformers. The conversion
      needs the `sentencepiece` package. We pass the model's own `add_dummy_prefix` setting, which the
      generic `TokenizersBackend` conversion ignores, so text encodes as SentencePiece encodes it.

    Special and added tokens, `chat_template` and `legacy` come from the directory's
    tokenizer_config.json. Two things are then fixed up: padding goes on the right (training pads
    right; `LlamaTokenizer`'s class default is left), and a tokenizer without a pad token gets its
    family's (2.0 `<unk>`, 2.5 `!`, 2.6 `<|endoftext|>`). transformers registers the pad token as a
    special added token, so 2.5's `!` always encodes alone and `skip_special_tokens` drops it; the
    remote tokenizer under transformers 4 did the same, so token ids match the official pipeline.

    Args:
        path: the model directory (config.json is not needed).

    Returns:
        The tokenizer. `len(tokenizer)` is the number of ids, i.e. the embedding rows it needs.

    Raises:
        FileNotFoundError: `path` is not a directory, or holds neither tokenizer.json nor
            tokenizer.model.
        ImportError: only tokenizer.model is there and `sentencepiece` is not installed.
        MissingSpecialTokenError: no pad token is configured and the vocabulary belongs to no
            MiniCPM-V family (or lacks the family's pad token).
    """
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"tokenizer directory {directory} does not exist")
    if (directory / "tokenizer.json").is_file():
        tokenizer = TokenizersBackend.from_pretrained(directory)
    elif (directory / "tokenizer.model").is_file():
        tokenizer = _load_sentencepiece(directory)
    else:
        found = ", ".join(sorted(p.name for p in directory.iterdir())) or "nothing"
        raise FileNotFoundError(
            f"{directory} has no tokenizer.json or tokenizer.model (found: {found}); "
            "point at the directory of a MiniCPM-V checkpoint"
        )

    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        _add_family_pad_token(tokenizer, directory)
    return tokenizer


def _load_sentencepiece(directory: Path) -> PreTrainedTokenizerBase:
    if not is_sentencepiece_available():
        # Without it transformers logs a warning, retries the file as a tiktoken vocabulary and fails
        # with an unrelated error; say what is missing instead.
        raise ImportError(
            f"{directory} has only a SentencePiece tokenizer.model (MiniCPM-V 2.0 layout); converting it "
            "needs the `sentencepiece` package, which is not installed. Run `pip install sentencepiece`, "
            "or save the tokenizer once as tokenizer.json (`save_pretrained`) where it is installed."
        )
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((directory / "tokenizer.model").read_bytes())
    if proto.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
        # LlamaTokenizer assumes BPE; the generic conversion handles unigram models too.
        return TokenizersBackend.from_pretrained(directory)
    return LlamaTokenizer.from_pretrained(directory, add_prefix_space=proto.normalizer_spec.add_dummy_prefix)


def _add_family_pad_token(tokenizer: PreTrainedTokenizerBase, directory: Path) -> None:
    family = _detect_family(tokenizer)
    pad = _FAMILY_TOKENS[family].pad if family is not None else None
    if pad is None or _token_id(tokenizer, pad) is None:
        raise MissingSpecialTokenError(
            f"the tokenizer in {directory} names no pad token and its vocabulary has no MiniCPM-V family's "
            "pad token (2.0 <unk>, 2.5 !, 2.6 <|endoftext|>); set pad_token in tokenizer_config.json"
        )
    # add_special_tokens, not the pad_token setter, so the pad behaves as it does when the directory
    # names it: transformers registers configured special tokens as added tokens. It is already in the
    # vocabulary, so no id is added.
    tokenizer.add_special_tokens({"pad_token": pad})


# ---------------------------------------------------------------------------------------------------
# Special-token ids
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of the tokens the data pipeline and the model look for, resolved from the tokenizer.

    `image_start`/`image_end` bound each image's `<unk>` placeholders (2.0, 2.5); 2.6 also takes
    `slice_start`/`slice_end` as bounds (spec §3.3).
    """

    image_start: int  # <image>
    image_end: int  # </image>
    slice_start: int  # <slice>
    slice_end: int  # </slice>
    unk: int  # <unk>, the image placeholder; an added token in 2.5/2.6, not the tokenizer's unk
    image_id_start: int | None  # <image_id>, 2.6 only
    image_id_end: int | None  # </image_id>, 2.6 only
    bos: int | None  # None where the tokenizer names no bos token
    eos: int
    pad: int
    stop_ids: tuple[int, ...]  # 2.0 </s>; 2.5 <|end_of_text|>, <|eot_id|>; 2.6 <|im_end|>, <|endoftext|>
    eot_id: int  # 2.0 </s>, 2.5 <|eot_id|>, 2.6 <|im_end|>


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> SpecialTokens:
    """Resolves the ids of MiniCPM-V's special tokens from the tokenizer's own vocabulary.

    The family (which stop and end-of-turn tokens apply) is read off the vocabulary: `<|im_end|>`
    means 2.6, `<|eot_id|>` 2.5, `</s>` 2.0.

    Args:
        tokenizer: a tokenizer from `load_tokenizer`.

    Returns:
        The ids. Each one is a single token: encoding its string gives exactly that id.

    Raises:
        MissingSpecialTokenError: naming every required token the tokenizer lacks (or splits into
            several ids) and the tokenizer's directory.
    """
    missing: list[str] = []

    def required(token: str | None, role: str) -> int:
        token_id = _token_id(tokenizer, token) if token is not None else None
        if token_id is None:
            missing.append(f"{token} ({role})" if token is not None else role)
            return -1
        return token_id

    family = _detect_family(tokenizer)
    if family is None:
        conventions = None
        missing.append("a family marker: <|im_end|> (2.6), <|eot_id|> (2.5) or </s> (2.0)")
    else:
        conventions = _FAMILY_TOKENS[family]

    ids = SpecialTokens(
        image_start=required("<image>", "image start"),
        image_end=required("</image>", "image end"),
        slice_start=required("<slice>", "slice start"),
        slice_end=required("</slice>", "slice end"),
        unk=required("<unk>", "image placeholder"),
        image_id_start=_token_id(tokenizer, "<image_id>"),
        image_id_end=_token_id(tokenizer, "</image_id>"),
        bos=_token_id(tokenizer, tokenizer.bos_token) if tokenizer.bos_token is not None else None,
        eos=required(tokenizer.eos_token, "eos_token"),
        pad=required(tokenizer.pad_token, "pad_token"),
        stop_ids=tuple(required(token, "stop token") for token in conventions.stop) if conventions else (),
        eot_id=required(conventions.eot, "end of turn") if conventions else -1,
    )
    if missing:
        raise MissingSpecialTokenError(
            f"the tokenizer in {tokenizer.name_or_path or '(unsaved tokenizer)'} lacks MiniCPM-V special "
            f"tokens, or splits them into several ids: {', '.join(missing)}"
        )
    return ids


def _token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int | None:
    """The id of `token` if the tokenizer has it as one atomic token, else None."""
    token = str(token)
    token_id = tokenizer.convert_tokens_to_ids(token)
    # Unknown strings come back as the unk id (or None); only a real id maps back to the same string.
    if token_id is None or tokenizer.convert_ids_to_tokens(token_id) != token:
        return None
    # A vocabulary entry that text never encodes to (not registered as an added token, so BPE splits
    # it) would leave image bounds unfound; treat it as missing.
    if tokenizer.encode(token, add_special_tokens=False) != [token_id]:
        return None
    return token_id


def _detect_family(tokenizer: PreTrainedTokenizerBase) -> Family | None:
    for family, conventions in _FAMILY_TOKENS.items():
        if _token_id(tokenizer, conventions.marker) is not None:
            return family
    return None


# ---------------------------------------------------------------------------------------------------
# Tiny tokenizers for tests
# ---------------------------------------------------------------------------------------------------

_GROUNDING_TOKENS = ("<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<point>", "</point>")

# The special tokens of each released tokenizer, in their real id order. 2.0's chat markers `<用户>`
# and `<AI>` are not among them: MiniCPM's vocabulary splits them into several ids (OpenBMB/MiniCPM
# issue #115 quotes `<用户>` as [1786, 4194, 95388]), so they stay ordinary text here too.
_TINY_SPECIAL_TOKENS: dict[Family, tuple[str, ...]] = {
    "2.0": ("<unk>", "<s>", "</s>", "<image>", "</image>", *_GROUNDING_TOKENS, "<slice>", "</slice>"),
    "2.5": (
        "<|begin_of_text|>", "<|end_of_text|>", "<unk>", "<|start_header_id|>", "<|end_header_id|>",
        "<|eot_id|>", "<image>", "</image>", *_GROUNDING_TOKENS, "<slice>", "</slice>",
    ),
    "2.6": (
        "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "</image>", *_GROUNDING_TOKENS,
        "<slice>", "</slice>", "<image_id>", "</image_id>", "<unk>",
    ),
}

# bos, eos, unk, pad as the released tokenizer_config.json files name them. 2.6's file is not in
# shared/reference: eos, pad and unk follow spec §4.1-4.2; bos `<|im_start|>` is our reading of the
# hub file, and nothing relies on it, since 2.6 prompts carry no BOS (spec §4.2).
_TINY_NAMED_TOKENS: dict[Family, dict[str, str]] = {
    "2.0": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"},
    "2.5": {
        "bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "unk_token": "<unk>",
        "pad_token": "!",
    },
    "2.6": {
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<unk>",
        "pad_token": "<|endoftext|>",
    },
}

# Encoding prepends BOS for 2.0 and 2.5 (the official pipeline strips or expects it, spec §4.3);
# Qwen2 (2.6) adds none.
_TINY_PREPENDED_BOS: dict[Family, str] = {"2.0": "<s>", "2.5": "<|begin_of_text|>"}

_TINY_REMOTE_CLASS: dict[Family, tuple[str, str]] = {
    "2.0": ("MiniCPMVTokenizer", "tokenization_minicpmv.MiniCPMVTokenizer"),
    "2.5": ("MiniCPMVTokenizerFast", "tokenization_minicpmv_fast.MiniCPMVTokenizerFast"),
    "2.6": ("MiniCPMVTokenizerFast", "tokenization_minicpmv_fast.MiniCPMVTokenizerFast"),
}

CHAT_TEMPLATE_2_0 = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<用户>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '<AI>' + message['content'] }}"
    "{% else %}{{ message['content'] }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<AI>' }}{% endif %}"
)
# Verbatim from MiniCPM-Llama3-V-2_5/tokenizer_config.json. It appends the assistant header even
# without add_generation_prompt; the official fine-tune renders with its own copy minus that tail.
CHAT_TEMPLATE_2_5 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
)
CHAT_TEMPLATE_2_6 = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_TINY_CHAT_TEMPLATES: dict[Family, str] = {
    "2.0": CHAT_TEMPLATE_2_0, "2.5": CHAT_TEMPLATE_2_5, "2.6": CHAT_TEMPLATE_2_6,
}

# Llama-3's pre-tokenizer split (Qwen2's differs only in splitting digits one by one). Unlike GPT-2's
# it keeps "\n\n" in one piece, so "\n\n" after `<|end_header_id|>` is one id as in Llama-3, which
# the 2.5 label masking (`assistant` + 3) relies on.
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Training text for the tiny BPE, fed as one string. Role names stand alone before a blank line, as
# in rendered chats, so `user`, `assistant`, `system` and "\n\n" become single ids, as in the real
# vocabularies, where label masking looks them up.
_TINY_CORPUS = """\
system

You are a helpful assistant that answers questions about images, documents, charts and videos.

user

Describe this image in detail.

assistant

The image shows a small brown dog sitting on a wooden bench in a green park. Behind the dog there are
tall trees, a blue sky with a few white clouds, and two people walking along a path.

user

What is written on the sign in the picture?

assistant

The sign says "Welcome to the city library". The letters are black on a white background.

system

You are a careful assistant. Answer in one short sentence.

user

How many cats are there in this photo, and what colour are they?

assistant

There are three cats: one is black, one is white with grey spots, and one is orange. They are lying
on a red carpet next to a window, and the sunlight makes the room look warm and quiet.

user

Read the table and tell me the total for the year 2024.

assistant

The total for 2024 is 1,250 units, which is 15% more than the 1,087 units sold in 2023.

system

You describe pictures for people who cannot see them.

user

Is the person in the picture holding an umbrella?

assistant

Yes. The person on the left is holding a large yellow umbrella because it is raining on the street.

user

Summarize the chart for me, please.

assistant

The chart compares the monthly rainfall of four cities. The first city is the wettest in every month,
while the last one stays dry from June to September.

The quick brown fox jumps over the lazy dog. A picture is worth a thousand words! Numbers such as 0, 1,
2, 3, 4, 5, 6, 7, 8, 9, 10, 42, 100 and 3.14 appear in documents; so do questions? And answers.
"""

_TINY_BPE_VOCAB_SIZE = 640  # upper bound; the corpus yields somewhat fewer merges
_TINY_MODEL_MAX_LENGTH = 2048  # the fine-tune's default max length (spec §4.4)


def write_tiny_tokenizer(family: Family, out_dir: str | os.PathLike[str]) -> None:
    """Writes a small tokenizer that `load_tokenizer` reads exactly like the family's released one.

    A byte-level BPE (every byte in its alphabet, so any text encodes) trained deterministically on
    a built-in English corpus, with the family's real special-token strings as added special tokens
    (ids differ from the real ones), its chat template, and tokenizer_config.json plus
    special_tokens_map.json in the released layout (including the remote `tokenizer_class` and
    `auto_map`, which `load_tokenizer` must ignore). The vocabulary has a few hundred ids; size a
    model's embedding with `len(load_tokenizer(out_dir))`.

    Args:
        family: "2.0", "2.5" or "2.6".
        out_dir: created if needed; existing tokenizer files are overwritten.

    Raises:
        ValueError: for an unknown family.
    """
    if family not in _TINY_SPECIAL_TOKENS:
        raise ValueError(f"family must be one of {sorted(_TINY_SPECIAL_TOKENS)}, got {family!r}")
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    special_tokens = _TINY_SPECIAL_TOKENS[family]

    # 2.0 keeps <unk>, <s>, </s> at ids 0-2 as SentencePiece does; the others' specials follow the BPE
    # vocabulary, as Llama-3's and Qwen2's do.
    leading = special_tokens[:3] if family == "2.0" else ()
    tokenizer = build_tiny_bpe(special_tokens, leading=leading, prepend_bos=_TINY_PREPENDED_BOS.get(family))
    tokenizer.save(str(directory / "tokenizer.json"))

    _write_json(directory / "tokenizer_config.json", _tiny_tokenizer_config(family, tokenizer))
    _write_json(directory / "special_tokens_map.json", _tiny_special_tokens_map(family))


def build_tiny_bpe(
    special_tokens: Sequence[str], *, leading: Sequence[str] = (), prepend_bos: str | None = None
) -> Tokenizer:
    """The tiny tokenizers' model: a byte-level BPE trained deterministically on the built-in corpus.

    Every byte is in its alphabet, so any text encodes. Used by `write_tiny_tokenizer` and by the
    tiny writers of the transformers-native families (`models/hf_native.py`).

    Args:
        special_tokens: added as special tokens, atomic in any text, in this order after the BPE
            vocabulary (those also in `leading` excepted).
        leading: special tokens that take the first ids, before the BPE vocabulary.
        prepend_bos: a special token the post-processor puts in front of every encoding.

    Returns:
        The `tokenizers.Tokenizer`; a few hundred ids.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_TINY_BPE_VOCAB_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[_added_token(token) for token in leading],
        show_progress=False,
    )
    tokenizer.train_from_iterator([_TINY_CORPUS], trainer)
    tokenizer.add_special_tokens([_added_token(token) for token in special_tokens if token not in leading])

    if prepend_bos is not None:
        # transformers 5 ignores tokenizer_config's add_bos_token when a tokenizer.json exists: the BOS
        # must come from tokenizer.json's post-processor, as in Llama-3's and converted Llama files.
        tokenizer.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(
                    single=f"{prepend_bos}:0 $A:0",
                    pair=f"{prepend_bos}:0 $A:0 {prepend_bos}:1 $B:1",
                    special_tokens=[(prepend_bos, tokenizer.token_to_id(prepend_bos))],
                ),
            ]
        )
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def _added_token(content: str) -> AddedToken:
    return AddedToken(content, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False)


def _tiny_tokenizer_config(family: Family, tokenizer: Tokenizer) -> dict:
    named = _TINY_NAMED_TOKENS[family]
    tokenizer_class, remote_class = _TINY_REMOTE_CLASS[family]
    config: dict = {}
    if family == "2.0":
        # As released; transformers 5 reads these only for tokenizer.model directories.
        config.update(add_bos_token=True, add_eos_token=False)
    config["added_tokens_decoder"] = {
        str(tokenizer.token_to_id(token)): {
            "content": token, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True,
        }
        for token in _TINY_SPECIAL_TOKENS[family]
    }
    if family != "2.5":  # the 2.5 files list no additional_special_tokens
        config["additional_special_tokens"] = _additional_special_tokens(family)
    config.update(
        auto_map={"AutoTokenizer": [remote_class, None]},
        chat_template=_TINY_CHAT_TEMPLATES[family],
        clean_up_tokenization_spaces=False,
        model_max_length=_TINY_MODEL_MAX_LENGTH,
        padding_side="right",
        tokenizer_class=tokenizer_class,
        truncation_side="right",
        **named,
    )
    if family == "2.0":
        config["legacy"] = True
    return config


def _tiny_special_tokens_map(family: Family) -> dict:
    named = _TINY_NAMED_TOKENS[family]
    special_map: dict = {}
    if family != "2.5":
        special_map["additional_special_tokens"] = _additional_special_tokens(family)
    for key in ("bos_token", "eos_token", "unk_token"):
        special_map[key] = {
            "content": named[key], "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False,
        }
    special_map["pad_token"] = named["pad_token"]  # a plain string in both released files
    return special_map


def _additional_special_tokens(family: Family) -> list[str]:
    named = set(_TINY_NAMED_TOKENS[family].values())
    chat_markers = {"<|im_start|>", "<|im_end|>", "<|endoftext|>"}
    return [token for token in _TINY_SPECIAL_TOKENS[family] if token not in named | chat_markers]


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


__all__ = [
    "CHAT_TEMPLATE_2_0",
    "CHAT_TEMPLATE_2_5",
    "CHAT_TEMPLATE_2_6",
    "MissingSpecialTokenError",
    "SpecialTokens",
    "build_tiny_bpe",
    "load_tokenizer",
    "special_token_ids",
    "write_tiny_tokenizer",
]
