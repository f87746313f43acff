"""Tokenizer loading and special-token lookup, on tiny tokenizers written per family.

The tiny tokenizers give every special token a different id from the released ones, so a passing
run shows nothing is hard-coded; `test_real_2_5_config_resolves_released_ids` checks the other side
against the released 2.5 tokenizer_config.json.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import finetune.models.tokenizer as tokenizer_module
from finetune.models.tokenizer import (
    CHAT_TEMPLATE_2_5,
    MissingSpecialTokenError,
    SpecialTokens,
    load_tokenizer,
    special_token_ids,
    write_tiny_tokenizer,
)

FAMILIES = ("2.0", "2.5", "2.6")
FAMILY_PAD = {"2.0": "<unk>", "2.5": "!", "2.6": "<|endoftext|>"}
FAMILY_STOP = {
    "2.0": ("</s>",), "2.5": ("<|end_of_text|>", "<|eot_id|>"), "2.6": ("<|im_end|>", "<|endoftext|>"),
}
FAMILY_EOT = {"2.0": "</s>", "2.5": "<|eot_id|>", "2.6": "<|im_end|>"}

REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE_2_5 = next(
    (
        root / "shared" / "reference" / "MiniCPM-Llama3-V-2_5"
        for root in (REPO_ROOT, REPO_ROOT.parent)
        if (root / "shared" / "reference" / "MiniCPM-Llama3-V-2_5" / "tokenizer_config.json").is_file()
    ),
    None,
)

TWO_TURNS = [
    {"role": "user", "content": "What is in the image?"},
    {"role": "assistant", "content": "A dog on a bench."},
]
EXPECTED_CHAT = {
    "2.0": "<s><用户>What is in the image?<AI>A dog on a bench.",
    # The released 2.5 template always ends with the assistant header.
    "2.5": (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is in the image?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nA dog on a bench.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "2.6": (
        "<|im_start|>user\nWhat is in the image?<|im_end|>\n"
        "<|im_start|>assistant\nA dog on a bench.<|im_end|>\n"
    ),
}
EXPECTED_GENERATION_PROMPT = {
    "2.0": "<s><用户>What is in the image?<AI>",
    "2.5": (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is in the image?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "2.6": "<|im_start|>user\nWhat is in the image?<|im_end|>\n<|im_start|>assistant\n",
}


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_tokenizers")
    for family in FAMILIES:
        write_tiny_tokenizer(family, root / family)
    return {family: root / family for family in FAMILIES}


def _copy(source: Path, destination: Path) -> Path:
    shutil.copytree(source, destination)
    return destination


def _edit_json(path: Path, edit) -> None:
    content = json.loads(path.read_text(encoding="utf-8"))
    edit(content)
    path.write_text(json.dumps(content, ensure_ascii=False), encoding="utf-8")


@pytest.mark.parametrize("family", FAMILIES)
def test_special_token_ids_resolve_from_the_vocabulary(tiny_dirs, family):
    tokenizer = load_tokenizer(tiny_dirs[family])
    ids = special_token_ids(tokenizer)

    def id_of(token: str) -> int:
        return tokenizer.convert_tokens_to_ids(token)

    assert ids == SpecialTokens(
        image_start=id_of("<image>"),
        image_end=id_of("</image>"),
        slice_start=id_of("<slice>"),
        slice_end=id_of("</slice>"),
        unk=id_of("<unk>"),
        image_id_start=id_of("<image_id>") if family == "2.6" else None,
        image_id_end=id_of("</image_id>") if family == "2.6" else None,
        bos=tokenizer.bos_token_id,
        eos=tokenizer.eos_token_id,
        pad=id_of(FAMILY_PAD[family]),
        stop_ids=tuple(id_of(token) for token in FAMILY_STOP[family]),
        eot_id=id_of(FAMILY_EOT[family]),
    )
    markers = [ids.image_start, ids.image_end, ids.slice_start, ids.slice_end, ids.unk]
    markers += [ids.image_id_start, ids.image_id_end] if family == "2.6" else []
    turn_tokens = {ids.bos, ids.eos, ids.eot_id, *ids.stop_ids}
    assert len(set(markers)) == len(markers)
    assert not set(markers) & turn_tokens
    assert all(0 <= token_id < len(tokenizer) for token_id in [*markers, *turn_tokens, ids.pad])
    # 2.5/2.6's <unk> placeholder is an added token of its own, not a fallback id.
    assert tokenizer.convert_ids_to_tokens(ids.unk) == "<unk>"


@pytest.mark.parametrize("family", FAMILIES)
def test_special_tokens_encode_atomically(tiny_dirs, family):
    tokenizer = load_tokenizer(tiny_dirs[family])
    ids = special_token_ids(tokenizer)

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    assert encode("<image><unk></image>") == [ids.image_start, ids.unk, ids.image_end]
    assert encode("<slice><unk><unk></slice>") == [
        ids.slice_start, ids.unk, ids.unk, ids.slice_end,
    ]
    if family == "2.6":
        encoded = encode("<image_id>0</image_id>")
        assert encoded[0] == ids.image_id_start and encoded[-1] == ids.image_id_end and len(encoded) == 3


@pytest.mark.parametrize("family", FAMILIES)
def test_text_round_trips(tiny_dirs, family):
    tokenizer = load_tokenizer(tiny_dirs[family])
    texts = ["The dog sat on the bench.", "  two spaces\n\nand lines\t", "héllo 你好 🤖 42 3.14", "<用户>hi<AI>"]
    for text in texts:
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


@pytest.mark.parametrize("family", FAMILIES)
def test_label_masking_anchors_are_single_tokens(tiny_dirs, family):
    # The official masking looks up "assistant" by id (2.5, 2.6) and skips "\n\n" as one id (2.5).
    tokenizer = load_tokenizer(tiny_dirs[family])
    for text in ["user", "assistant", "system", "\n\n"]:
        assert len(tokenizer.encode(text, add_special_tokens=False)) == 1, repr(text)


@pytest.mark.parametrize("family", FAMILIES)
def test_bos_is_prepended_only_up_to_2_5(tiny_dirs, family):
    tokenizer = load_tokenizer(tiny_dirs[family])
    encoded = tokenizer.encode("dog")
    assert (encoded[0] == tokenizer.bos_token_id) == (family != "2.6")


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_template_renders_two_turns(tiny_dirs, family):
    tokenizer = load_tokenizer(tiny_dirs[family])
    assert tokenizer.apply_chat_template(TWO_TURNS, tokenize=False) == EXPECTED_CHAT[family]
    assert (
        tokenizer.apply_chat_template(TWO_TURNS[:1], tokenize=False, add_generation_prompt=True)
        == EXPECTED_GENERATION_PROMPT[family]
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_vocabulary_sizes_the_embedding(tiny_dirs, family):
    tokenizer = load_tokenizer(tiny_dirs[family])
    backend = Tokenizer.from_file(str(tiny_dirs[family] / "tokenizer.json"))
    # Loading registers no new ids (the 2.5 pad "!" is already in the vocabulary), and ids are dense.
    assert len(tokenizer) == backend.get_vocab_size(with_added_tokens=True)
    assert max(tokenizer.get_vocab().values()) == len(tokenizer) - 1
    assert 256 < len(tokenizer) <= 1000
    assert tokenizer.padding_side == "right"
    assert tokenizer.pad_token == FAMILY_PAD[family]


def test_tiny_tokenizer_is_deterministic(tiny_dirs, tmp_path):
    write_tiny_tokenizer("2.6", tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / name).read_bytes() == (tiny_dirs["2.6"] / name).read_bytes()


def test_missing_slice_token_names_token_and_directory(tiny_dirs, tmp_path):
    directory = _copy(tiny_dirs["2.5"], tmp_path / "no_slice")
    # Rename the added token in every file, so `<slice>` is left to BPE and splits into pieces.
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        path = directory / name
        path.write_text(path.read_text(encoding="utf-8").replace('"<slice>"', '"<gone>"'), encoding="utf-8")
    tokenizer = load_tokenizer(directory)

    with pytest.raises(MissingSpecialTokenError, match=re.escape("<slice>")) as error:
        special_token_ids(tokenizer)
    assert str(directory) in str(error.value)
    assert "</slice>" not in str(error.value)


def test_missing_pad_token_falls_back_to_family_rule(tiny_dirs, tmp_path):
    directory = _copy(tiny_dirs["2.5"], tmp_path / "no_pad")

    def drop_pad(config: dict) -> None:
        config.pop("pad_token")
        config["padding_side"] = "left"

    _edit_json(directory / "tokenizer_config.json", drop_pad)
    _edit_json(directory / "special_tokens_map.json", lambda special_map: special_map.pop("pad_token"))
    tokenizer = load_tokenizer(directory)

    assert tokenizer.pad_token == "!"
    assert tokenizer.padding_side == "right"
    assert len(tokenizer) == len(load_tokenizer(tiny_dirs["2.5"]))


def test_directory_without_tokenizer_files_is_rejected(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path)


def test_sentencepiece_only_directory_needs_sentencepiece(tmp_path, monkeypatch):
    monkeypatch.setattr(tokenizer_module, "is_sentencepiece_available", lambda: False)
    (tmp_path / "tokenizer.model").write_bytes(b"not read before the check")
    with pytest.raises(ImportError, match="pip install sentencepiece"):
        load_tokenizer(tmp_path)


@pytest.mark.skipif(REFERENCE_2_5 is None, reason="shared/reference/MiniCPM-Llama3-V-2_5 not found")
def test_real_2_5_config_resolves_released_ids(tmp_path):
    """The released 2.5 tokenizer_config.json/special_tokens_map.json over a small tokenizer.json
    that holds the 256 added tokens at their released ids (128000-128255) above a toy BPE."""
    config = json.loads((REFERENCE_2_5 / "tokenizer_config.json").read_text(encoding="utf-8"))
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    backend.train_from_iterator(["The dog sat on the bench.\n\nassistant user"], trainer)
    serialized = json.loads(backend.to_str())
    serialized["added_tokens"] = []
    for token_id, token in config["added_tokens_decoder"].items():
        # tokenizers keeps an added token's id only if the model's vocabulary holds it there.
        serialized["model"]["vocab"][token["content"]] = int(token_id)
        fields = ("content", "single_word", "lstrip", "rstrip", "normalized", "special")
        serialized["added_tokens"].append({"id": int(token_id), **{key: token[key] for key in fields}})
    (tmp_path / "tokenizer.json").write_text(json.dumps(serialized), encoding="utf-8")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(REFERENCE_2_5 / name, tmp_path / name)

    tokenizer = load_tokenizer(tmp_path)
    ids = special_token_ids(tokenizer)

    # Spec §4.1.
    assert (ids.bos, ids.eos, ids.unk) == (128000, 128001, 128002)
    image_and_slice = (ids.image_start, ids.image_end, ids.slice_start, ids.slice_end)
    assert image_and_slice == (128010, 128011, 128020, 128021)
    assert (ids.image_id_start, ids.image_id_end) == (None, None)
    assert ids.stop_ids == (128001, 128009) and ids.eot_id == 128009
    assert tokenizer.pad_token == "!" and tokenizer.padding_side == "right"
    assert tokenizer.encode("<image><unk></image>", add_special_tokens=False) == [128010, 128002, 128011]
    assert tokenizer.chat_template == config["chat_template"] == CHAT_TEMPLATE_2_5


SENTENCEPIECE_CORPUS = [
    "The image shows a small brown dog sitting on a wooden bench in a green park.",
    "What is written on the sign? The sign says welcome to the city library.",
    "There are three cats: one is black, one is white and one is orange, 2024.",
]


@pytest.mark.skipif(importlib.util.find_spec("sentencepiece") is None, reason="sentencepiece not installed")
def test_sentencepiece_directory_encodes_like_sentencepiece(tmp_path):
    """A 2.0-style directory (tokenizer.model plus the released tokenizer_config layout) loads without
    remote code and encodes text segments as SentencePiece does, BOS first."""
    import io

    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCEPIECE_CORPUS * 20),
        model_writer=model,
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        user_defined_symbols=["<image>", "</image>", "<slice>", "</slice>"],
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        minloglevel=2,
    )
    (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
    processor = sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())
    specials = ["<unk>", "<s>", "</s>", "<image>", "</image>", "<slice>", "</slice>"]
    decoder = {
        str(processor.piece_to_id(token)): {
            "content": token, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": True,
        }
        for token in specials
    }
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": decoder,
                "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>",
                "legacy": True, "padding_side": "right", "tokenizer_class": "MiniCPMVTokenizer",
                "auto_map": {"AutoTokenizer": ["tokenization_minicpmv.MiniCPMVTokenizer", None]},
            }
        )
    )

    tokenizer = load_tokenizer(tmp_path)
    ids = special_token_ids(tokenizer)

    for text in ["The dog sat on the bench.", "What is in the image?\nThree cats 2024", "héllo 你好"]:
        assert tokenizer.encode(text) == [ids.bos, *processor.encode(text)]
    placeholder = tokenizer.encode("<image><unk></image>", add_special_tokens=False)
    assert placeholder == [ids.image_start, ids.unk, ids.image_end]
    assert (ids.unk, ids.bos, ids.eos, ids.pad, ids.stop_ids) == (0, 1, 2, 0, (2,))
