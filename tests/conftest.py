"""Shared fixtures: one tiny random-weight model directory per model family, written once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

# Family -> the name of its fixture, for tests that take one family's directory as an argument.
_TINY_DIR_FIXTURES = {"2.0": "tiny_v2_0_dir", "2.5": "tiny_v2_5_dir", "2.6": "tiny_v2_6_dir",
                      "llava": "tiny_llava_dir", "4.6": "tiny_v4_6_dir"}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory):
    """Factory: `tiny_model_dir("2.5")` is that family's hub-format tiny model directory (config.json,
    model.safetensors, tokenizer; llava and 4.6 with their processor files), written on first use."""
    from finetune.models.tiny import write_tiny_model

    written: dict[str, Path] = {}

    def directory(family: str) -> Path:
        if family not in written:
            # write_tiny_model seeds torch itself; seed 0 makes every session's weights the same.
            written[family] = write_tiny_model(family, tmp_path_factory.mktemp(f"tiny-{family}"), seed=0)
        return written[family]

    return directory


def _family_fixture(family: str):
    @pytest.fixture(scope="session")
    def directory(tiny_model_dir) -> Path:
        return tiny_model_dir(family)

    directory.__doc__ = f"The tiny {family} model directory (see `tiny_model_dir`)."
    return directory


for _family, _name in _TINY_DIR_FIXTURES.items():
    globals()[_name] = _family_fixture(_family)
