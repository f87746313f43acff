"""Conversation formats: loading, normalisation to canonical records, and one DataError per problem."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import jsonschema
import pytest

from finetune.data.errors import DataError, DataErrors
from finetune.data.formats import (
    IMAGE_MARKER_RE,
    image_marker,
    load_conversations,
    normalise_record,
    validate_record,
)

SAMPLE = Path(__file__).resolve().parents[1] / "finetune" / "data" / "sample"
SCHEMAS = Path(__file__).resolve().parents[1] / "data_schemas"


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A folder with two (empty) image files, a.jpg and b.jpg: the default check only needs them to exist."""
    (tmp_path / "a.jpg").write_bytes(b"")
    (tmp_path / "b.jpg").write_bytes(b"")
    return tmp_path


def load(paths, tmp_path: Path, **kwargs):
    return load_conversations(paths, cache_dir=tmp_path / "cache", **kwargs)


def write_json(path: Path, samples: list) -> Path:
    path.write_text(json.dumps(samples, indent=1))
    return path


def write_jsonl(path: Path, samples: list) -> Path:
    path.write_text("".join(json.dumps(sample) + "\n" for sample in samples))
    return path


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict:
    return {"role": "system", "content": text}


def human(text: str) -> dict:
    return {"from": "human", "value": text}


def gpt(text: str) -> dict:
    return {"from": "gpt", "value": text}


# --------------------------------------------------------------------------- the same content, both formats

MINICPMV = [
    {"id": "one", "image": "a.jpg", "conversations": [user("<image>\nWhat is it?"), assistant("A cat.")]},
    {
        "id": "two",
        "image": {"<image_00>": "a.jpg", "<image_01>": "b.jpg"},
        "conversations": [
            system("Be brief."),
            user("<image_00> vs <image_01>?"),
            assistant("Same."),
            user("Sure?"),
            assistant("Yes."),
        ],
    },
    {"id": "text", "conversations": [user("Hi."), assistant("Hello.")]},
    {"id": "implicit", "image": "b.jpg", "conversations": [user("What is it?"), assistant("A dog.")]},
]
LLAVA = [
    {"id": "one", "image": "a.jpg", "conversations": [human("<image>\nWhat is it?"), gpt("A cat.")]},
    {
        "id": "two",
        "image": ["a.jpg", "b.jpg"],
        "conversations": [
            {"from": "system", "value": "Be brief."},
            human("<image> vs <image>?"),
            gpt("Same."),
            human("Sure?"),
            gpt("Yes."),
        ],
    },
    {"id": "text", "conversations": [human("Hi."), gpt("Hello.")]},
    {"id": "implicit", "image": "b.jpg", "conversations": [human("What is it?"), gpt("A dog.")]},
]


def test_canonical_record(data_dir: Path, tmp_path: Path):
    dataset, errors = load(write_json(data_dir / "m.json", MINICPMV), tmp_path)
    assert errors == []
    assert dataset[1] == {
        "id": "two",
        "images": [
            {"key": "<image_00>", "field": 'image["<image_00>"]', "path": str(data_dir / "a.jpg")},
            {"key": "<image_01>", "field": 'image["<image_01>"]', "path": str(data_dir / "b.jpg")},
        ],
        "messages": [
            system("Be brief."),
            user("<image_00> vs <image_01>?"),
            assistant("Same."),
            user("Sure?"),
            assistant("Yes."),
        ],
        "source": {"file": str(data_dir / "m.json"), "index": 1},
    }
    assert dataset[2]["images"] == []
    # A single image without placeholder goes in front of the first user turn.
    assert dataset[3]["messages"][0] == user("<image_00>\nWhat is it?")


def what_training_sees(record: dict) -> tuple:
    """Everything but where the record came from (source, and each image's name in the input)."""
    return record["id"], [image["path"] for image in record["images"]], record["messages"]


@pytest.mark.parametrize("suffixes", [(".json", ".jsonl"), (".jsonl", ".json")])
def test_both_formats_and_file_types_normalise_identically(data_dir: Path, tmp_path: Path, suffixes):
    writers = {".json": write_json, ".jsonl": write_jsonl}
    minicpmv = writers[suffixes[0]](data_dir / f"m{suffixes[0]}", MINICPMV)
    llava = writers[suffixes[1]](data_dir / f"l{suffixes[1]}", LLAVA)
    from_minicpmv, errors_m = load(minicpmv, tmp_path)
    from_llava, errors_l = load(llava, tmp_path)
    assert errors_m == errors_l == []
    assert [what_training_sees(r) for r in from_minicpmv] == [what_training_sees(r) for r in from_llava]
    assert [image["field"] for image in from_llava[1]["images"]] == ["image[0]", "image[1]"]
    assert [image["key"] for image in from_llava[1]["images"]] == ["<image>", "<image>"]


def test_images_follow_text_order_not_dict_order(data_dir: Path, tmp_path: Path):
    sample = {
        "image": {"<image_01>": "b.jpg", "<image_00>": "a.jpg"},
        "conversations": [user("<image_01> first, then <image_00>"), assistant("Ok.")],
    }
    record = normalise_record(sample, file=str(data_dir / "d.json"), index=0)
    assert [image["key"] for image in record["images"]] == ["<image_01>", "<image_00>"]
    assert record["messages"][0]["content"] == "<image_00> first, then <image_01>"
    assert [int(n) for n in IMAGE_MARKER_RE.findall(record["messages"][0]["content"])] == [0, 1]


def test_placeholder_in_a_later_user_turn(data_dir: Path):
    sample = {
        "image": "a.jpg",
        "conversations": [user("Hi."), assistant("Hello."), user("<image> what?"), assistant("A cat.")],
    }
    record = normalise_record(sample, file=str(data_dir / "d.json"), index=0)
    assert [m["content"] for m in record["messages"]] == ["Hi.", "Hello.", "<image_00> what?", "A cat."]


def test_missing_id_uses_file_name_and_index(data_dir: Path):
    for raw_id in (None, ""):
        sample = {"id": raw_id, "conversations": [user("Hi."), assistant("Hello.")]}
        assert normalise_record(sample, file=str(data_dir / "d.json"), index=7)["id"] == "d.json:7"
    assert normalise_record({**sample, "id": 12}, file="x.json", index=0)["id"] == "12"


def test_image_marker():
    assert (
        image_marker(0) == "<image_00>"
        and image_marker(12) == "<image_12>"
        and image_marker(100) == "<image_100>"
    )


# --------------------------------------------------------------------------- files, paths, streaming


def test_mixed_files_keep_file_and_index(data_dir: Path, tmp_path: Path):
    first = write_json(data_dir / "m.json", MINICPMV[:2])
    second = write_jsonl(data_dir / "l.jsonl", LLAVA[2:])
    for paths in ([first, second], f"{first}, {second}"):
        dataset, errors = load(paths, tmp_path)
        assert errors == []
        assert [(r["source"]["file"], r["source"]["index"]) for r in dataset] == [
            (str(first), 0),
            (str(first), 1),
            (str(second), 0),
            (str(second), 1),
        ]


def test_relative_paths_and_image_root(tmp_path: Path):
    data = tmp_path / "data"
    images = tmp_path / "pictures"
    (data / "sub").mkdir(parents=True)
    images.mkdir()
    (data / "sub" / "x.jpg").write_bytes(b"")
    (images / "y.jpg").write_bytes(b"")
    sample = lambda path: {"image": path, "conversations": [user("?"), assistant("!")]}  # noqa: E731

    dataset, errors = load(write_json(data / "d.json", [sample("sub/x.jpg")]), tmp_path)
    assert errors == [] and dataset[0]["images"][0]["path"] == str(data / "sub" / "x.jpg")

    dataset, errors = load(write_json(data / "e.json", [sample("y.jpg")]), tmp_path, image_root=images)
    assert errors == [] and dataset[0]["images"][0]["path"] == str(images / "y.jpg")

    absolute = str(images / "y.jpg")  # absolute paths ignore image_root
    dataset, errors = load(write_json(data / "f.json", [sample(absolute)]), tmp_path, image_root=data)
    assert errors == [] and dataset[0]["images"][0]["path"] == absolute


def test_streaming_gives_the_same_records(data_dir: Path, tmp_path: Path):
    bad = {"id": "bad", "conversations": [user("Hi.")]}
    paths = [
        write_json(data_dir / "m.json", MINICPMV + [bad]),
        write_jsonl(data_dir / "l.jsonl", [bad] + LLAVA),
    ]
    table, errors = load(paths, tmp_path)
    stream, stream_errors = load(paths, tmp_path, streaming=True)
    assert len(errors) == 2 and stream_errors == errors
    assert list(stream) == list(table)
    assert len(table) == len(MINICPMV) + len(LLAVA)


def test_cache_follows_file_content(data_dir: Path, tmp_path: Path):
    path = write_json(data_dir / "m.json", MINICPMV[:1])
    first, _ = load(path, tmp_path)
    assert load(path, tmp_path)[0]._fingerprint == first._fingerprint  # unchanged: reused
    write_json(path, MINICPMV[:2])
    second, _ = load(path, tmp_path)
    assert len(second) == 2 and second._fingerprint != first._fingerprint


def test_missing_image_file_is_checked_every_load(data_dir: Path, tmp_path: Path):
    path = write_json(data_dir / "m.json", MINICPMV[:1])
    assert len(load(path, tmp_path)[0]) == 1
    (data_dir / "a.jpg").unlink()
    dataset, errors = load(path, tmp_path)
    assert len(dataset) == 0 and [e.field for e in errors] == ["image"]


def test_check_image_hook_runs_once_per_path(data_dir: Path, tmp_path: Path):
    seen = []

    def reject_b(path: str) -> str | None:
        seen.append(path)
        return "cannot decode" if path.endswith("b.jpg") else None

    dataset, errors = load(
        write_json(data_dir / "m.json", MINICPMV + MINICPMV), tmp_path, check_image=reject_b
    )
    assert sorted(seen) == [str(data_dir / "a.jpg"), str(data_dir / "b.jpg")]
    assert [(e.index, e.field) for e in errors] == [
        (1, 'image["<image_01>"]'),
        (3, "image"),
        (5, 'image["<image_01>"]'),
        (7, "image"),
    ]
    assert str(data_dir / "b.jpg") in errors[0].reason and "cannot decode" in errors[0].reason
    assert [r["id"] for r in dataset] == ["one", "text", "one", "text"]


# --------------------------------------------------------------------------- malformed files


def test_malformed_jsonl_line_reports_line_and_keeps_the_rest(data_dir: Path, tmp_path: Path):
    path = data_dir / "d.jsonl"
    good = json.dumps(MINICPMV[2])
    path.write_text(f'{good}\n\n{{"id": "x", "conversations": [}}\n{good}\n')
    dataset, errors = load(path, tmp_path)
    assert len(dataset) == 2
    [error] = errors
    assert (error.file, error.index, error.line) == (str(path), 1, 3)
    assert str(error).startswith(f"{path}:3:") and "invalid JSON" in str(error)
    assert [r["source"]["index"] for r in dataset] == [0, 2]


def test_malformed_json_reports_line_and_column(data_dir: Path, tmp_path: Path):
    path = data_dir / "d.json"
    path.write_text('[\n  {"id": "a", "conversations": []},\n  {"id": "b",, }\n]\n')
    dataset, errors = load(path, tmp_path)
    assert len(dataset) == 0
    [error] = errors
    assert (error.index, error.line, error.column) == (None, 3, 14)
    assert str(error).startswith(f"{path}:3:14: invalid JSON")


@pytest.mark.parametrize(
    "name, content, reason",
    [
        ("d.json", '{"id": "a"}', "top level is an object"),
        ("d.csv", "id\n", 'unsupported file type ".csv"'),
        ("missing.json", None, "data file not found"),
        ("latin1.json", b'[{"id": "caf\xe9"}]', "not UTF-8"),
    ],
)
def test_file_level_errors(tmp_path: Path, name, content, reason):
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content)
    elif content is not None:
        path.write_bytes(content)
    dataset, errors = load(path, tmp_path)
    assert len(dataset) == 0 and len(errors) == 1
    assert errors[0].file == str(path) and errors[0].index is None and reason in errors[0].reason


def test_no_files_is_a_usage_error(tmp_path: Path):
    with pytest.raises(ValueError):
        load(" , ", tmp_path)


# --------------------------------------------------------------------------- one error per problem

TWO_IMAGES = {"<image_00>": "a.jpg", "<image_01>": "b.jpg"}


def sample(*turns, **fields) -> dict:
    """A sample with id "s"; ``fields`` adds (or, with ``conversations``, replaces) keys."""
    return {"id": "s", "conversations": list(turns), **fields}


Q, A = user("What is it?"), assistant("A cat.")
# (case, sample, field of the one error, words its reason contains)
ERROR_CASES = [
    ("not an object", ["a", "list"], None, "sample is a list"),
    ("conversation typo", {"id": "s", "conversation": [Q, A]}, "conversations", 'found "conversation"'),
    ("messages instead", {"id": "s", "messages": [Q, A]}, "conversations", 'found "messages"'),
    ("no conversations", {"id": "s"}, "conversations", 'missing "conversations"'),
    ("conversations not a list", sample(conversations="hi"), "conversations", "a string"),
    ("empty conversations", sample(), "conversations", "empty list"),
    ("bad id type", sample(Q, A, id=1.5), "id", "id is a number"),
    ("turn not an object", sample("hi", A), "conversations[0]", "turn is a string"),
    ("first turn from assistant", sample(A, Q, A), "conversations[0].role", 'starts with "assistant"'),
    (
        "system then assistant",
        sample(system("."), A, Q, A),
        "conversations[1].role",
        'starts with "assistant"',
    ),
    ("two user turns", sample(Q, Q, A), "conversations[1].role", 'two "user" turns in a row'),
    ("two assistant turns", sample(Q, A, A), "conversations[2].role", 'two "assistant" turns in a row'),
    (
        "unknown role",
        sample(Q, {"role": "bot", "content": "!"}),
        "conversations[1].role",
        'unknown role "bot"',
    ),
    ("LLaVA role name", sample({"role": "human", "content": "?"}, A), "conversations[0].role", '"human"'),
    ("missing role", sample({"content": "?"}, A), "conversations[0].role", 'missing "role"'),
    ("missing content", sample({"role": "user"}, A), "conversations[0].content", 'missing "content"'),
    ("neither role nor content", sample({"text": "?"}, A), "conversations[0]", 'neither "role" nor'),
    ("system not first", sample(Q, A, system("."), Q, A), "conversations[2].role", "system turn after"),
    ("only a system turn", sample(system(".")), "conversations", "no user or assistant turn"),
    (
        "content parts",
        sample({"role": "user", "content": [{"type": "text", "text": "?"}]}, A),
        "conversations[0].content",
        "content is a list",
    ),
    ("content null", sample(Q, assistant(None)), "conversations[1].content", "content is null"),
    ("empty answer", sample(Q, assistant(" \n")), "conversations[1].content", "empty assistant answer"),
    ("nothing to train on", sample(Q, image="a.jpg"), "conversations[0].role", 'no "assistant" answer'),
    ("trailing question", sample(Q, A, Q), "conversations[2].role", 'ends with a "user" turn'),
    (
        "unknown numbered placeholder",
        sample(user("<image_00> <image_03>"), A, image=TWO_IMAGES),
        "conversations[0].content",
        "<image_03> names no image",
    ),
    (
        "numbered placeholder, one image",
        sample(user("<image_00>?"), A, image="a.jpg"),
        "conversations[0].content",
        "one image is <image>",
    ),
    (
        "<image> with a one-image dict",
        sample(user("<image>?"), A, image={"<image_00>": "a.jpg"}),
        "conversations[0].content",
        "one image is <image_00>",
    ),
    ("placeholder without image", sample(user("<image>?"), A), "conversations[0].content", "has no image"),
    (
        "image named by no placeholder",
        sample(user("<image_00>?"), A, image=TWO_IMAGES),
        'image["<image_01>"]',
        "no placeholder names image <image_01>",
    ),
    (
        "placeholder repeated",
        sample(user("<image>?"), A, user("<image>?"), A, image="a.jpg"),
        "conversations[2].content",
        "used again",
    ),
    (
        "<image> with several images",
        sample(user("<image>?"), A, image=TWO_IMAGES),
        "conversations[0].content",
        "<image> is ambiguous",
    ),
    (
        '"<image>" key among several',
        sample(user("<image_01>?"), A, image={"<image>": "a.jpg", "<image_01>": "b.jpg"}),
        'image["<image>"]',
        "names one image",
    ),
    ("bad image key", sample(Q, A, image={"cat": "a.jpg"}), 'image["cat"]', "not an image placeholder"),
    (
        "placeholder in assistant turn",
        sample(Q, assistant("Here: <image>"), image="a.jpg"),
        "conversations[1].content",
        "in an assistant turn",
    ),
    (
        "placeholder in system turn",
        sample(system("<image>"), Q, A, image="a.jpg"),
        "conversations[0].content",
        "in a system turn",
    ),
    ("image list in MiniCPM-V", sample(Q, A, image=["a.jpg"]), "image", "image is a list"),
    ("empty image path", sample(Q, A, image=""), "image", "image path is empty"),
    ("image not a path", sample(Q, A, image=3), "image", "image is a number"),
    ("missing image file", sample(Q, A, image="nope.jpg"), "image", "not found"),
    (
        "missing image in dict",
        sample(user("<image_00><image_01>"), A, image={"<image_00>": "a.jpg", "<image_01>": "nope.jpg"}),
        'image["<image_01>"]',
        "not found",
    ),
    (
        "LLaVA: unknown role",
        sample({"from": "user", "value": "?"}, gpt("!")),
        "conversations[0].from",
        'unknown role "user"',
    ),
    (
        "LLaVA: too many placeholders",
        sample(human("<image><image>"), gpt("!"), image=["a.jpg"]),
        "conversations[0].value",
        "more <image> placeholders than images",
    ),
    (
        "LLaVA: too few placeholders",
        sample(human("<image>?"), gpt("!"), image=["a.jpg", "b.jpg"]),
        "image[1]",
        "2 images but 1 <image> placeholder",
    ),
    (
        "LLaVA: numbered placeholder",
        sample(human("<image_00>?"), gpt("!"), image="a.jpg"),
        "conversations[0].value",
        "MiniCPM-V placeholder",
    ),
    ("LLaVA: image dict", sample(human("?"), gpt("!"), image={"<image_00>": "a.jpg"}), "image", "an object"),
    ("mixed formats", sample(Q, gpt("!")), "conversations[1]", 'uses "from"/"value" (LLaVA)'),
]


@pytest.mark.parametrize("case, sample, field, reason", ERROR_CASES, ids=[case[0] for case in ERROR_CASES])
def test_each_problem_gives_one_error(data_dir: Path, case, sample, field, reason):
    file = str(data_dir / "d.json")
    errors = validate_record(sample, file=file, index=3)
    assert len(errors) == 1, [str(e) for e in errors]
    [error] = errors
    assert (error.file, error.index, error.field) == (file, 3, field)
    expected_id = sample.get("id") if isinstance(sample, dict) and isinstance(sample.get("id"), str) else None
    assert error.sample_id == expected_id
    assert reason in error.reason
    line = str(error)
    assert "\n" not in line and line.startswith(f"{file}: sample 3")
    if expected_id:
        assert f'(id "{expected_id}")' in line
    if field:
        assert f"field {field}: " in line


def test_error_line_format():
    error = DataError(
        "data.json",
        3,
        "abc",
        "conversations[2].role",
        'unknown role "bot"',
        "use one of user, assistant, system",
    )
    assert str(error) == (
        'data.json: sample 3 (id "abc"), field conversations[2].role: unknown role "bot"; '
        "use one of user, assistant, system"
    )
    assert (
        str(DataError("d.json", None, None, None, "invalid JSON: x", line=3, column=14))
        == "d.json:3:14: invalid JSON: x"
    )
    assert pickle.loads(pickle.dumps(error)) == error
    with pytest.raises(DataError):
        raise error


def test_data_errors_caps_each_file():
    errors = [DataError("a.json", i, None, "id", "bad") for i in range(60)] + [
        DataError("b.json", 0, None, None, "bad")
    ]
    text = str(DataErrors(errors, max_per_file=50))
    lines = text.splitlines()
    assert lines[0] == "61 data errors in 2 files:"
    assert sum(line.startswith("  a.json: sample") for line in lines) == 50
    assert "  a.json: ... and 10 more errors in this file" in lines
    assert "  b.json: sample 0: bad" in lines
    with pytest.raises(ValueError):
        DataErrors([])


# --------------------------------------------------------------------------- bundled sample and schemas


def test_bundled_sample_loads_cleanly(tmp_path: Path):
    for name, count in [("train.json", 16), ("train_llava.jsonl", 8), ("eval.json", 4)]:
        dataset, errors = load(SAMPLE / name, tmp_path)
        assert errors == [], [str(e) for e in errors]
        assert len(dataset) == count
        for record in dataset:
            assert record["messages"][-1]["role"] == "assistant"
            for image in record["images"]:
                assert Path(image["path"]).is_file()
    dataset, _ = load([SAMPLE / "train.json", SAMPLE / "train_llava.jsonl"], tmp_path)
    assert any(len(r["images"]) == 2 for r in dataset) and any(not r["images"] for r in dataset)
    assert any(r["messages"][0]["role"] == "system" for r in dataset)


# (index, id, field) of bad.json's errors: one per sample, in order.
BAD_SAMPLE_ERRORS = [
    (0, None, None),
    (1, "typo-conversation", "conversations"),
    (2, "first-turn-assistant", "conversations[0].role"),
    (3, "two-user-turns", "conversations[1].role"),
    (4, "unknown-role", "conversations[1].role"),
    (5, "system-not-first", "conversations[2].role"),
    (6, "content-parts", "conversations[0].content"),
    (7, "content-null", "conversations[1].content"),
    (8, "empty-answer", "conversations[1].content"),
    (9, "no-answer", "conversations[0].role"),
    (10, "unknown-placeholder", "conversations[0].content"),
    (11, "placeholder-without-image", "conversations[0].content"),
    (12, "unnamed-image", 'image["<image_01>"]'),
    (13, "repeated-placeholder", "conversations[2].content"),
    (14, "ambiguous-image", "conversations[0].content"),
    (15, "placeholder-in-answer", "conversations[1].content"),
    (16, "missing-image-file", "image"),
    (17, None, "id"),
    (18, "llava-too-few-placeholders", "image[1]"),
    (19, "llava-numbered-placeholder", "conversations[0].value"),
    (20, "mixed-formats", "conversations[1]"),
]


def test_bundled_bad_sample_gives_the_expected_errors(tmp_path: Path):
    dataset, errors = load(SAMPLE / "bad.json", tmp_path)
    assert len(dataset) == 0
    assert [(e.index, e.sample_id, e.field) for e in errors] == BAD_SAMPLE_ERRORS
    assert all(e.file == str(SAMPLE / "bad.json") and e.fix for e in errors)


@pytest.mark.parametrize(
    "schema, files", [("minicpmv", ["train.json", "eval.json"]), ("llava", ["train_llava.jsonl"])]
)
def test_schemas_accept_the_bundled_samples(schema, files):
    validator = jsonschema.Draft202012Validator(json.loads((SCHEMAS / f"{schema}.schema.json").read_text()))
    for name in files:
        text = (SAMPLE / name).read_text()
        samples = (
            json.loads(text) if name.endswith(".json") else [json.loads(line) for line in text.splitlines()]
        )
        for sample in samples:
            validator.validate(sample)


def test_schemas_reject_structural_mistakes():
    validator = jsonschema.Draft202012Validator(json.loads((SCHEMAS / "minicpmv.schema.json").read_text()))
    bad = json.loads((SAMPLE / "bad.json").read_text())
    # not an object, "conversation" typo, unknown role, content parts, null content
    for index in [0, 1, 4, 6, 7]:
        assert not validator.is_valid(bad[index]), BAD_SAMPLE_ERRORS[index]
