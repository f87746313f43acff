"""Shared fixtures: one tiny random-weight model directory per model family, written once per session."""

from __future__ import annotations

from pathlib import Path

import pytest


def _write_tiny(family: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from finetune.models.tiny import write_tiny_model

    # write_tiny_model seeds torch itself; seed 0 makes every session's weights the same.
    return write_tiny_model(family, tmp_path_factory.mktemp(f"tiny-{family}"), seed=0)


@pytest.fixture(scope="session")
def tiny_v2_0_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Hub-format directory of a tiny MiniCPM-V 2.0 (config.json, model.safetensors, tokenizer)."""
    return _write_tiny("2.0", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_v2_5_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Hub-format directory of a tiny MiniCPM-Llama3-V 2.5."""
    return _write_tiny("2.5", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_v2_6_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Hub-format directory of a tiny MiniCPM-V 2.6."""
    return _write_tiny("2.6", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Hub-format directory of a tiny LLaVA (SigLIP + Llama-3, transformers' class and processor)."""
    return _write_tiny("llava", tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_v4_6_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Hub-format directory of a tiny MiniCPM-V 4.6 (transformers' class and processor)."""
    return _write_tiny("4.6", tmp_path_factory)


_TINY_DIR_FIXTURES = {"2.0": "tiny_v2_0_dir", "2.5": "tiny_v2_5_dir", "2.6": "tiny_v2_6_dir",
                      "llava": "tiny_llava_dir", "4.6": "tiny_v4_6_dir"}


@pytest.fixture
def tiny_model_dir(request: pytest.FixtureRequest):
    """Factory: `tiny_model_dir("2.5")` is that family's session-wide tiny model directory."""
    return lambda family: request.getfixturevalue(_TINY_DIR_FIXTURES[family])
