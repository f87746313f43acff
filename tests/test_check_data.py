"""`finetune check-data`: the report on good data, one line per problem on bad data, never a traceback.

The bundled sample and bad.json run as the user runs them (`python -m finetune check-data`, both
processes started together to share the import time); the cases built in tmp_path call
`finetune.cli.main` in-process, which is the same code minus the interpreter start.
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import datasets
import pytest

from finetune.cli import main
from finetune.data.dataset import DataSettings, SampleEncoder
from finetune.data.formats import load_conversations
from finetune.models.loading import read_config
from finetune.models.tokenizer import load_tokenizer, special_token_ids

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "finetune" / "data" / "sample"
GOOD = [SAMPLE / "train.json", SAMPLE / "train_llava.jsonl"]
BAD = SAMPLE / "bad.json"
PHOTO = SAMPLE / "images" / "chelsea.jpg"


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    """Arrow tables of in-process runs go under tmp_path, not the user's datasets cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))


@pytest.fixture(scope="module")
def cli_runs(tiny_v2_6_dir, tmp_path_factory):
    """check-data on the bundled sample and on bad.json, as two subprocesses run side by side."""
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path_factory.mktemp("datasets-cache"))}
    commands = {
        "good": [",".join(map(str, GOOD))],
        "bad": [str(BAD)],
    }
    processes = {
        name: subprocess.Popen(
            [sys.executable, "-m", "finetune", "check-data", *data, "--model", str(tiny_v2_6_dir)],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for name, data in commands.items()
    }
    results = {}
    for name, process in processes.items():
        stdout, stderr = process.communicate(timeout=600)
        results[name] = (process.returncode, stdout, stderr)
    return results


def _error_lines(stderr: str) -> list[str]:
    return [line.strip() for line in stderr.splitlines() if line.startswith("  ")]


def test_bundled_sample_passes_with_a_report(cli_runs, tmp_path):
    code, stdout, stderr = cli_runs["good"]
    assert code == 0, stderr
    assert "Traceback" not in stdout + stderr
    records, errors = load_conversations(GOOD, cache_dir=tmp_path)
    assert errors == []
    images = sum(len(record["images"]) for record in records)

    assert f"samples: {len(records)} valid, 0 problems" in stdout
    assert f"images: {images}\n" in stdout
    histogram = re.search(r"slices per image \(slices: images\): (.+)", stdout).group(1)
    counts = dict(map(int, pair.split(": ")) for pair in histogram.split(", "))
    assert sum(counts.values()) == images and set(counts) - {1} and 1 in counts  # sliced and unsliced
    p50, p90, p99, longest = map(int, re.search(
        r"tokens per sample, images included: p50 (\d+), p90 (\d+), p99 (\d+), max (\d+)", stdout
    ).groups())
    assert 0 < p50 <= p90 <= p99 <= longest <= 2048
    # Image tokens are counted: the longest sample holds at least one image's 16-token spans.
    assert longest > 16
    assert "truncated to 2048 tokens by dropping whole exchanges: 0" in stdout


def test_bad_data_exits_2_with_one_line_per_problem(cli_runs):
    code, stdout, stderr = cli_runs["bad"]
    assert code == 2
    assert "Traceback" not in stdout + stderr
    samples = json.loads(BAD.read_text())
    lines = _error_lines(stderr)
    assert len(lines) == len(samples)
    for index, (line, sample) in enumerate(zip(lines, samples)):
        assert line.startswith(f"{BAD}: sample {index}"), line
        if isinstance(sample, dict) and isinstance(sample.get("id"), str):
            assert f'(id "{sample["id"]}")' in line, line
        if isinstance(sample, dict):
            assert ", field " in line, line
    assert "samples: 0 valid, 21 problems" in stdout


# ----------------------------------------------------------------------- cases built in tmp_path


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main(["check-data", *map(str, argv)])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def _write(path: Path, samples: list[dict]) -> Path:
    path.write_text(json.dumps(samples, ensure_ascii=False))
    return path


LONG_ANSWER = "The chart compares the monthly rainfall of four cities, and the first city is the wettest."
LONG = {
    "id": "long",
    "image": str(PHOTO),
    "conversations": [
        {"role": "user", "content": "<image>\nDescribe the picture."},
        {"role": "assistant", "content": LONG_ANSWER},
        {"role": "user", "content": "And the chart?"},
        {"role": "assistant", "content": LONG_ANSWER},
        {"role": "user", "content": "Once more, please."},
        {"role": "assistant", "content": LONG_ANSWER},
    ],
}
SHORT = {"id": "short", "conversations": [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]}


@pytest.fixture
def lengths(tiny_model_dir, tmp_path):
    """(whole LONG, LONG's first exchange, SHORT) in tokens, images included, as training encodes them."""
    directory = tiny_model_dir("2.6")
    tokenizer = load_tokenizer(directory)
    settings = DataSettings("2.6", read_config(directory)["query_num"], 9, model_max_length=10**6)
    encoder = SampleEncoder(settings, tokenizer, special_token_ids(tokenizer))
    records, errors = load_conversations(_write(tmp_path / "probe.json", [LONG, SHORT]), cache_dir=tmp_path)
    assert errors == []
    from PIL import Image

    with Image.open(PHOTO) as photo:
        layouts = [encoder.layout(*photo.size)]
    long, short = records[0], records[1]
    first = {**long, "messages": long["messages"][:2]}
    return tuple(len(encoder.encode_text(r, l).input_ids) for r, l in [(long, layouts), (first, layouts), (short, [])])


def test_overlong_sample_is_truncated_and_counted(capsys, tiny_model_dir, tmp_path, lengths):
    full, first, short = lengths
    data = _write(tmp_path / "data.json", [LONG, SHORT])
    code, out, err = _run(capsys, data, "--model", tiny_model_dir("2.6"), "--model_max_length", full - 1)
    assert code == 0, err
    assert "samples: 2 valid, 0 problems" in out
    assert f"truncated to {full - 1} tokens by dropping whole exchanges: 1" in out


def test_overlong_sample_is_reported_with_truncation_reject(capsys, tiny_model_dir, tmp_path, lengths):
    full, first, short = lengths
    data = _write(tmp_path / "data.json", [LONG, SHORT])
    code, out, err = _run(
        capsys, data, "--model", tiny_model_dir("2.6"), "--model_max_length", full - 1, "--truncation", "reject"
    )
    assert code == 2
    (line,) = _error_lines(err)
    assert line.startswith(f'{data}: sample 0 (id "long"), field conversations: {full} tokens')
    assert f"over model_max_length {full - 1}" in line
    assert "--truncation turns" in line  # says how to fix it
    assert "samples: 1 valid, 1 problems" in out
    assert f"over {full - 1} tokens (refused, --truncation reject): 1" in out and "truncated to" not in out


def test_first_exchange_too_long_is_reported(capsys, tiny_model_dir, tmp_path, lengths):
    full, first, short = lengths
    assert short < first - 1
    data = _write(tmp_path / "data.json", [SHORT, LONG])
    code, out, err = _run(capsys, data, "--model", tiny_model_dir("2.6"), "--model_max_length", first - 1)
    assert code == 2
    (line,) = _error_lines(err)
    assert line.startswith(f'{data}: sample 1 (id "long"), field conversations: the first exchange alone is {first}')
    assert "raise model_max_length or lower max_slice_nums" in line


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, with no pixel data at all."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_unusable_images_are_reported(capsys, tiny_model_dir, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "bomb.png").write_bytes(_png_header(9000, 9000))  # 81 MP: over our 64 MP limit
    (images / "huge.png").write_bytes(_png_header(20000, 20000))  # over PIL's own bomb limit too
    (images / "garbage.jpg").write_bytes(b"this is not an image\n" * 10)
    (images / "empty.jpg").write_bytes(b"")
    (images / "truncated.jpg").write_bytes(PHOTO.read_bytes()[:2000])
    (images / "folder.jpg").mkdir()
    cases = {
        "bomb.png": "image is too large",
        "huge.png": "too large to decode safely",
        "garbage.jpg": "not an image PIL can read",
        "empty.jpg": "image file is empty",
        "truncated.jpg": "corrupt or truncated",
        "folder.jpg": "image path is a directory",
    }
    samples = [
        {"id": name, "image": f"images/{name}",
         "conversations": [{"role": "user", "content": "<image>\nWhat is it?"}, {"role": "assistant", "content": "A photo."}]}
        for name in cases
    ] + [SHORT]
    data = _write(tmp_path / "data.json", samples)
    code, out, err = _run(capsys, data, "--model", tiny_model_dir("2.6"))
    assert code == 2
    lines = _error_lines(err)
    assert len(lines) == len(cases), err
    for index, (line, (name, reason)) in enumerate(zip(lines, cases.items())):
        assert line.startswith(f'{data}: sample {index} (id "{name}"), field image: '), line
        assert reason in line and name in line, line
        assert "relative paths are resolved" not in line  # the file was found: the path is not the problem
    assert "samples: 1 valid, 6 problems" in out
