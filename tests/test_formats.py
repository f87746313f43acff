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


def without_source(record: dict) -> dict:
    return {key: value for key, value in record.items() if key not in ("source",)}


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict:
    return {"role": "system", "content": text}


# --------------------------------------------------------------------------- the same content, both formats

MINICPMV = [
    {"id": "one", "image": "a.jpg", "conversations": [user("<image>\nWhat is it?"), assistant("A cat.")]},
    {"id": "two", "image": {"<image_00>": "a.jpg", "<image_01>": "b.jpg"},
     "conversations": [system("Be brief."), user("<image_00> vs <image_01>?"), assistant("Same."),
                       user("Sure?"), assistant("Yes.")]},
    {"id": "text", "conversations": [user("Hi."), assistant("Hello.")]},
    {"id": "implicit", "image": "b.jpg", "conversations": [user("What is it?"), assistant("A dog.")]},
]  # fmt: skip
LLAVA = [
    {"id": "one", "image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                                      {"from": "gpt", "value": "A cat."}]},
    {"id": "two", "image": ["a.jpg", "b.jpg"],
     "conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "<image> vs <image>?"},
                       {"from": "gpt", "value": "Same."}, {"from": "human", "value": "Sure?"},
                       {"from": "gpt", "value": "Yes."}]},
    {"id": "text", "conversations": [{"from": "human", "value": "Hi."}, {"from": "gpt", "value": "Hello."}]},
    {"id": "implicit", "image": "b.jpg", "conversations": [{"from": "human", "value": "What is it?"},
                                                           {"from": "gpt", "value": "A dog."}]},
]  # fmt: skip


def test_canonical_record(data_dir: Path, tmp_path: Path):
    dataset, errors = load(write_json(data_dir / "m.json", MINICPMV), tmp_path)
    assert errors == []
    assert dataset[1] == {
        "id": "two",
        "images": [
            {"key": "<image_00>", "field": 'image["<image_00>"]', "path": str(data_dir / "a.jpg")},
            {"key": "<image_01>", "field": 'image["<image_01>"]', "path": str(data_dir / "b.jpg")},
        ],
        "messages": [system("Be brief."), user("<image_00> vs <image_01>?"), assistant("Same."),
                     user("Sure?"), assistant("Yes.")],
        "source": {"file": str(data_dir / "m.json"), "index": 1},
    }  # fmt: skip
    assert dataset[2]["images"] == []
    # A single image without placeholder goes in front of the first user turn.
    assert dataset[3]["messages"][0] == user("<image_00>\nWhat is it?")


@pytest.mark.parametrize("suffixes", [(".json", ".jsonl"), (".jsonl", ".json")])
def test_both_formats_and_file_types_normalise_identically(data_dir: Path, tmp_path: Path, suffixes):
    writers = {".json": write_json, ".jsonl": write_jsonl}
    minicpmv = writers[suffixes[0]](data_dir / f"m{suffixes[0]}", MINICPMV)
    llava = writers[suffixes[1]](data_dir / f"l{suffixes[1]}", LLAVA)
    from_minicpmv, errors_m = load(minicpmv, tmp_path)
    from_llava, errors_l = load(llava, tmp_path)
    assert errors_m == errors_l == []
    assert [without_source(r) for r in from_minicpmv] == [
        {**without_source(r), "images": [{**image, "key": key, "field": field} for image, key, field in
                                         zip(r["images"], KEYS[r["id"]], FIELDS[r["id"]])]}
        for r in from_llava
    ]  # fmt: skip


# The images' input names differ between the formats; everything else is identical.
KEYS = {"one": ["<image>"], "two": ["<image_00>", "<image_01>"], "text": [], "implicit": ["<image>"]}
FIELDS = {"one": ["image"], "two": ['image["<image_00>"]', 'image["<image_01>"]'], "text": [], "implicit": ["image"]}


def test_images_follow_text_order_not_dict_order(data_dir: Path, tmp_path: Path):
    sample = {"image": {"<image_01>": "b.jpg", "<image_00>": "a.jpg"},
              "conversations": [user("<image_01> first, then <image_00>"), assistant("Ok.")]}  # fmt: skip
    record = normalise_record(sample, file=str(data_dir / "d.json"), index=0)
    assert [image["key"] for image in record["images"]] == ["<image_01>", "<image_00>"]
    assert record["messages"][0]["content"] == "<image_00> first, then <image_01>"
    assert [int(n) for n in IMAGE_MARKER_RE.findall(record["messages"][0]["content"])] == [0, 1]


def test_placeholder_in_a_later_user_turn(data_dir: Path):
    sample = {"image": "a.jpg", "conversations": [user("Hi."), assistant("Hello."), user("<image> what?"),
                                                  assistant("A cat.")]}  # fmt: skip
    record = normalise_record(sample, file=str(data_dir / "d.json"), index=0)
    assert [m["content"] for m in record["messages"]] == ["Hi.", "Hello.", "<image_00> what?", "A cat."]


def test_missing_id_uses_file_name_and_index(data_dir: Path):
    for raw_id in (None, ""):
        sample = {"id": raw_id, "conversations": [user("Hi."), assistant("Hello.")]}
        assert normalise_record(sample, file=str(data_dir / "d.json"), index=7)["id"] == "d.json:7"
    assert normalise_record({**sample, "id": 12}, file="x.json", index=0)["id"] == "12"


def test_image_marker():
    assert image_marker(0) == "<image_00>" and image_marker(12) == "<image_12>" and image_marker(100) == "<image_100>"


# --------------------------------------------------------------------------- files, paths, streaming


def test_mixed_files_keep_file_and_index(data_dir: Path, tmp_path: Path):
    first = write_json(data_dir / "m.json", MINICPMV[:2])
    second = write_jsonl(data_dir / "l.jsonl", LLAVA[2:])
    for paths in ([first, second], f"{first}, {second}"):
        dataset, errors = load(paths, tmp_path)
        assert errors == []
        assert [(r["source"]["file"], r["source"]["index"]) for r in dataset] == [
            (str(first), 0), (str(first), 1), (str(second), 0), (str(second), 1)]  # fmt: skip


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
    paths = [write_json(data_dir / "m.json", MINICPMV + [bad]), write_jsonl(data_dir / "l.jsonl", [bad] + LLAVA)]
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

    dataset, errors = load(write_json(data_dir / "m.json", MINICPMV + MINICPMV), tmp_path, check_image=reject_b)
    assert sorted(seen) == [str(data_dir / "a.jpg"), str(data_dir / "b.jpg")]
    assert [(e.index, e.field) for e in errors] == [
        (1, 'image["<image_01>"]'), (3, "image"), (5, 'image["<image_01>"]'), (7, "image")]  # fmt: skip
    assert str(data_dir / "b.jpg") in errors[0].reason and "cannot decode" in errors[0].reason
    assert [r["id"] for r in dataset] == ["one", "text", "one", "text"]


# --------------------------------------------------------------------------- malformed files


def test_malformed_jsonl_line_reports_line_and_keeps_the_rest(data_dir: Path, tmp_path: Path):
    path = data_dir / "d.jsonl"
    good = json.dumps(MINICPMV[2])
    path.write_text(f"{good}\n\n{{\"id\": \"x\", \"conversations\": [}}\n{good}\n")
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

ANSWER = [user("What is it?"), assistant("A cat.")]
# (case, sample, field of the one error, words the reason contains)
ERROR_CASES = [
    ("not an object", ["a", "list"], None, "sample is a list"),
    ("conversation typo", {"id": "s", "conversation": ANSWER}, "conversations", 'found "conversation"'),
    ("messages instead", {"id": "s", "messages": ANSWER}, "conversations", 'found "messages"'),
    ("no conversations", {"id": "s"}, "conversations", 'missing "conversations"'),
    ("conversations not a list", {"id": "s", "conversations": "hi"}, "conversations", "a string"),
    ("empty conversations", {"id": "s", "conversations": []}, "conversations", "empty list"),
    ("bad id type", {"id": 1.5, "conversations": ANSWER}, "id", "id is a number"),
    ("turn not an object", {"id": "s", "conversations": ["hi", assistant("A cat.")]}, "conversations[0]", "a string"),
    ("first turn from assistant", {"id": "s", "conversations": [assistant("Hi."), *ANSWER]},
     "conversations[0].role", 'starts with "assistant"'),
    ("system then assistant", {"id": "s", "conversations": [system("Be brief."), assistant("Hi."), *ANSWER]},
     "conversations[1].role", 'starts with "assistant"'),
    ("two user turns", {"id": "s", "conversations": [user("Hi."), *ANSWER]},
     "conversations[1].role", 'two "user" turns in a row'),
    ("two assistant turns", {"id": "s", "conversations": [*ANSWER, assistant("Sure.")]},
     "conversations[2].role", 'two "assistant" turns in a row'),
    ("unknown role", {"id": "s", "conversations": [user("?"), {"role": "bot", "content": "!"}]},
     "conversations[1].role", 'unknown role "bot"'),
    ("llava role in minicpmv", {"id": "s", "conversations": [{"role": "human", "content": "?"}, assistant("!")]},
     "conversations[0].role", 'unknown role "human"'),
    ("missing role", {"id": "s", "conversations": [{"content": "?"}, assistant("!")]},
     "conversations[0].role", 'missing "role"'),
    ("missing content", {"id": "s", "conversations": [{"role": "user"}, assistant("!")]},
     "conversations[0].content", 'missing "content"'),
    ("system not first", {"id": "s", "conversations": [*ANSWER, system("Be brief."), *ANSWER]},
     "conversations[2].role", "system turn after the first"),
    ("only a system turn", {"id": "s", "conversations": [system("Be brief.")]},
     "conversations", "no user or assistant turn"),
    ("content parts", {"id": "s", "conversations": [{"role": "user", "content": [{"type": "text", "text": "?"}]},
                                                     assistant("!")]},
     "conversations[0].content", "content is a list"),
    ("content null", {"id": "s", "conversations": [user("?"), {"role": "assistant", "content": None}]},
     "conversations[1].content", "content is null"),
    ("empty answer", {"id": "s", "conversations": [user("?"), assistant(" \n")]},
     "conversations[1].content", "empty assistant answer"),
    ("nothing to train on", {"id": "s", "image": "a.jpg", "conversations": [user("What is it?")]},
     "conversations[0].role", 'no "assistant" answer'),
    ("trailing question", {"id": "s", "conversations": [*ANSWER, user("And?")]},
     "conversations[2].role", 'ends with a "user" turn'),
    ("unknown numbered placeholder", {"id": "s", "image": {"<image_00>": "a.jpg", "<image_01>": "b.jpg"},
                                      "conversations": [user("<image_00> <image_03>"), assistant("!")]},
     "conversations[0].content", "<image_03> names no image"),
    ("numbered placeholder, one image", {"id": "s", "image": "a.jpg",
                                         "conversations": [user("<image_00>?"), assistant("!")]},
     "conversations[0].content", "<image_00> names no image"),
    ("placeholder without image", {"id": "s", "conversations": [user("<image>?"), assistant("!")]},
     "conversations[0].content", "has no image"),
    ("image named by no placeholder", {"id": "s", "image": {"<image_00>": "a.jpg", "<image_01>": "b.jpg"},
                                       "conversations": [user("<image_00>?"), assistant("!")]},
     'image["<image_01>"]', "no placeholder names image <image_01>"),
    ("placeholder repeated", {"id": "s", "image": "a.jpg",
                              "conversations": [user("<image>?"), assistant("!"), user("<image>?"), assistant("!")]},
     "conversations[2].content", "used again"),
    ("<image> with several images", {"id": "s", "image": {"<image_00>": "a.jpg", "<image_01>": "b.jpg"},
                                     "conversations": [user("<image>?"), assistant("!")]},
     "conversations[0].content", "<image> is ambiguous"),
    ('"<image>" key among several', {"id": "s", "image": {"<image>": "a.jpg", "<image_01>": "b.jpg"},
                                      "conversations": [user("<image_01>?"), assistant("!")]},
     'image["<image>"]', "names one image"),
    ("bad image key", {"id": "s", "image": {"cat": "a.jpg"}, "conversations": ANSWER},
     'image["cat"]', "not an image placeholder"),
    ("placeholder in assistant turn", {"id": "s", "image": "a.jpg",
                                       "conversations": [user("?"), assistant("Here: <image>")]},
     "conversations[1].content", "in an assistant turn"),
    ("placeholder in system turn", {"id": "s", "image": "a.jpg",
                                    "conversations": [system("<image>"), *ANSWER]},
     "conversations[0].content", "in a system turn"),
    ("image list in minicpmv", {"id": "s", "image": ["a.jpg"], "conversations": ANSWER}, "image", "image is a list"),
    ("empty image path", {"id": "s", "image": "", "conversations": ANSWER}, "image", "image path is empty"),
    ("image not a path", {"id": "s", "image": 3, "conversations": ANSWER}, "image", "image is a number"),
    ("missing image file", {"id": "s", "image": "nope.jpg", "conversations": ANSWER}, "image", "not found"),
    ("missing image in dict", {"id": "s", "image": {"<image_00>": "a.jpg", "<image_01>": "nope.jpg"},
                               "conversations": [user("<image_00><image_01>"), assistant("!")]},
     'image["<image_01>"]', "not found"),
    ("llava unknown role", {"id": "s", "conversations": [{"from": "user", "value": "?"}, {"from": "gpt", "value": "!"}]},
     "conversations[0].from", 'unknown role "user"'),
    ("llava too many placeholders", {"id": "s", "image": ["a.jpg"],
                                     "conversations": [{"from": "human", "value": "<image><image>"},
                                                       {"from": "gpt", "value": "!"}]},
     "conversations[0].value", "more <image> placeholders than images"),
    ("llava too few placeholders", {"id": "s", "image": ["a.jpg", "b.jpg"],
                                    "conversations": [{"from": "human", "value": "<image>?"},
                                                      {"from": "gpt", "value": "!"}]},
     "image[1]", "2 images but 1 <image> placeholder"),
    ("llava numbered placeholder", {"id": "s", "image": "a.jpg",
                                    "conversations": [{"from": "human", "value": "<image_00>?"},
                                                      {"from": "gpt", "value": "!"}]},
     "conversations[0].value", "MiniCPM-V placeholder"),
    ("llava image dict", {"id": "s", "image": {"<image_00>": "a.jpg"},
                          "conversations": [{"from": "human", "value": "?"}, {"from": "gpt", "value": "!"}]},
     "image", "image is an object"),
    ("mixed formats", {"id": "s", "conversations": [user("?"), {"from": "gpt", "value": "!"}]},
     "conversations[1]", 'uses "from"/"value" (LLaVA)'),
]  # fmt: skip


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
    error = DataError("data.json", 3, "abc", "conversations[2].role", 'unknown role "bot"',
                      "use one of user, assistant, system")  # fmt: skip
    assert str(error) == (
        'data.json: sample 3 (id "abc"), field conversations[2].role: unknown role "bot"; '
        "use one of user, assistant, system"
    )
    assert str(DataError("d.json", None, None, None, "invalid JSON: x", line=3, column=14)) == "d.json:3:14: invalid JSON: x"
    assert pickle.loads(pickle.dumps(error)) == error
    with pytest.raises(DataError):
        raise error


def test_data_errors_caps_each_file():
    errors = [DataError("a.json", i, None, "id", "bad") for i in range(60)] + [DataError("b.json", 0, None, None, "bad")]
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


@pytest.mark.parametrize("schema, files", [("minicpmv", ["train.json", "eval.json"]), ("llava", ["train_llava.jsonl"])])
def test_schemas_accept_the_bundled_samples(schema, files):
    validator = jsonschema.Draft202012Validator(json.loads((SCHEMAS / f"{schema}.schema.json").read_text()))
    for name in files:
        text = (SAMPLE / name).read_text()
        samples = json.loads(text) if name.endswith(".json") else [json.loads(line) for line in text.splitlines()]
        for sample in samples:
            validator.validate(sample)


def test_schemas_reject_structural_mistakes():
    validator = jsonschema.Draft202012Validator(json.loads((SCHEMAS / "minicpmv.schema.json").read_text()))
    bad = json.loads((SAMPLE / "bad.json").read_text())
    # not an object, "conversation" typo, unknown role, content parts, null content
    for index in [0, 1, 4, 6, 7]:
        assert not validator.is_valid(bad[index]), BAD_SAMPLE_ERRORS[index]
