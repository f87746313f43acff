"""Training pieces without a training run: arguments, trainable parts, checkpoints, callbacks."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest

from finetune.models.loading import load_model, read_config
from finetune.models.tokenizer import load_tokenizer, special_token_ids
from finetune.train.args import LLM_TYPES, ConfigError, TuningArguments, check_llm_type, parse_args
from finetune.train.callbacks import NonFiniteCallback, ThroughputCallback
from finetune.train.checkpoints import COMPLETE_MARKER, CheckpointMarker, resolve_resume
from finetune.train.trainable import added_token_ids, apply_tuning


def _trainable(model) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


# -- arguments -----------------------------------------------------------------------------------------


def test_reference_recipe_arguments_parse(tmp_path):
    model_args, data_args, tuning, training = parse_args([
        "--model_name_or_path", "m", "--data_path", "d.json", "--use_lora", "true", "--lora_r", "8",
        "--model_max_length", "1024", "--max_slice_nums", "4", "--tune_vision", "false",
        "--output_dir", str(tmp_path), "--report_to", "none",
    ])
    assert (model_args.model_name_or_path, data_args.data_path, tuning.lora_r) == ("m", "d.json", 8)
    assert (data_args.model_max_length, data_args.max_slice_nums) == (1024, 4)
    assert training.remove_unused_columns is False  # the batch's pixel keys must reach the model


def test_config_file_values_are_overridden_by_the_command_line(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("model_name_or_path: m\ndata_path: d.json\nuse_lora: true\nlora_r: 4\nreport_to: none\n")
    _, _, tuning, _ = parse_args(["--config", str(config), "--lora_r", "16", "--output_dir", str(tmp_path)])
    assert tuning.use_lora and tuning.lora_r == 16


@pytest.mark.parametrize("flags,trains_resampler", [
    ([], True), (["--use_lora", "true"], False), (["--use_lora", "true", "--tune_resampler", "true"], True),
    (["--tune_resampler", "false", "--tune_vision", "true"], False),
])
def test_resampler_trains_by_default_only_without_lora(flags, trains_resampler, tmp_path):
    base = ["--model_name_or_path", "m", "--data_path", "d.json", "--output_dir", str(tmp_path), "--report_to", "none"]
    _, _, tuning, _ = parse_args([*base, *flags])
    assert tuning.tune_resampler is trains_resampler


def test_unknown_config_keys_are_errors(tmp_path):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"model_name_or_path": "m", "lora_rank": 4}))
    with pytest.raises(ConfigError, match="lora_rank"):
        parse_args(["--config", str(config)])


def test_every_problem_is_reported_at_once(tmp_path):
    with pytest.raises(ConfigError) as raised:
        parse_args(["--use_lora", "true", "--tune_llm", "true", "--output_dir", str(tmp_path)])
    message = str(raised.value)
    for expected in ("--model_name_or_path is required", "--data_path is required", "drop --tune_llm"):
        assert expected in message


# family -> the --llm_type values that name its language model (llava: the tiny one's Llama-3).
LLM_TYPE_CASES = {"2.0": {"minicpm"}, "2.5": {"llama3"}, "2.6": {"qwen", "qwen2"}, "llava": {"llama3"},
                  "4.6": {"qwen", "qwen3"}}


@pytest.mark.parametrize("family", LLM_TYPE_CASES)
def test_llm_type_must_name_the_language_model(family, tiny_model_dir):
    config = read_config(tiny_model_dir(family))
    check_llm_type(None, config)
    for llm_type in LLM_TYPES:
        if llm_type in LLM_TYPE_CASES[family]:
            check_llm_type(llm_type, config)
            continue
        with pytest.raises(ConfigError) as refused:
            check_llm_type(llm_type, config)
        message = str(refused.value)
        assert f"--llm_type {llm_type} names a" in message and f"family {family} model" in message
        assert f"pass --llm_type {' or '.join(sorted(LLM_TYPE_CASES[family], key=list(LLM_TYPES).index))}" in message


# -- trainable parts -----------------------------------------------------------------------------------


def test_full_parts_are_trained_exactly(tiny_model_dir):
    directory = tiny_model_dir("2.0")
    tokens = special_token_ids(load_tokenizer(directory))
    model = apply_tuning(load_model(directory), TuningArguments(tune_vision=True, tune_resampler=False), tokens)
    trained = _trainable(model)
    assert trained and all(name.startswith("vpm.") for name in trained)
    model = apply_tuning(load_model(directory), TuningArguments(), tokens)
    trained = _trainable(model)
    assert all(name.startswith("resampler.") for name in trained)
    # 2.0's fixed query position table is never trained.
    assert "resampler.pos_embed" not in trained and "resampler.query" in trained


def test_lora_trains_adapters_resampler_and_new_token_rows(tiny_model_dir):
    directory = tiny_model_dir("2.6")
    tokens = special_token_ids(load_tokenizer(directory))
    model = apply_tuning(
        load_model(directory), TuningArguments(use_lora=True, tune_resampler=True, tune_embeddings="new_tokens"), tokens
    )
    trained = _trainable(model)
    lora = {name for name in trained if "lora_" in name}
    assert lora and all(".llm." in name and "self_attn" in name for name in lora)
    assert any("resampler" in name for name in trained)
    assert not any(".vpm." in name for name in trained)
    token_rows = [name for name in trained if "token_adapter" in name or "trainable_tokens" in name]
    assert token_rows, sorted(trained)
    assert tokens.unk in added_token_ids(tokens) and len(added_token_ids(tokens)) == 7


# -- checkpoints ---------------------------------------------------------------------------------------


def test_auto_resume_skips_a_checkpoint_cut_off_while_saving(tmp_path):
    for step, complete in ((2, True), (4, True), (6, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if complete:
            (folder / COMPLETE_MARKER).write_text("{}")
    assert resolve_resume("auto", str(tmp_path)) == str(tmp_path / "checkpoint-4")
    assert resolve_resume("auto", str(tmp_path / "empty")) is None
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        resolve_resume(str(tmp_path / "checkpoint-6"), str(tmp_path))


def test_checkpoint_marker_is_written_by_rank_zero_only(tmp_path):
    (tmp_path / "checkpoint-3").mkdir()
    args = SimpleNamespace(output_dir=str(tmp_path))
    CheckpointMarker().on_save(args, SimpleNamespace(global_step=3, is_world_process_zero=False), None)
    assert not (tmp_path / "checkpoint-3" / COMPLETE_MARKER).exists()
    CheckpointMarker().on_save(args, SimpleNamespace(global_step=3, is_world_process_zero=True), None)
    assert json.loads((tmp_path / "checkpoint-3" / COMPLETE_MARKER).read_text()) == {"global_step": 3}
    assert [p.name for p in (tmp_path / "checkpoint-3").iterdir()] == [COMPLETE_MARKER]


# -- callbacks -----------------------------------------------------------------------------------------


def test_non_finite_steps_are_reported_with_their_step(caplog):
    state = SimpleNamespace(global_step=17)
    with caplog.at_level(logging.WARNING, logger="finetune"):
        NonFiniteCallback().on_log(None, state, None, logs={"loss": 1.0, "grad_norm": float("nan")})
        NonFiniteCallback().on_log(None, state, None, logs={"loss": 2.0, "grad_norm": 1.0})
    assert len(caplog.records) == 1
    assert "step 17" in caplog.text and "grad_norm=nan" in caplog.text


def test_throughput_counts_all_ranks_since_the_last_log(monkeypatch):
    clock = iter([100.0, 102.0])
    monkeypatch.setattr("finetune.train.callbacks.time.perf_counter", lambda: next(clock))
    args = SimpleNamespace(per_device_train_batch_size=2, gradient_accumulation_steps=3, world_size=2)
    callback = ThroughputCallback()
    callback.on_train_begin(args, SimpleNamespace(global_step=10, num_input_tokens_seen=1000), None)
    logs = {"loss": 1.0}
    callback.on_log(args, SimpleNamespace(global_step=14, num_input_tokens_seen=5000), None, logs=logs)
    assert logs["samples_per_second"] == pytest.approx(4 * 12 / 2.0)
    assert logs["tokens_per_second"] == pytest.approx(4000 / 2.0)


def test_activation_checkpointing_defaults_on_and_the_old_flag_still_works(tmp_path):
    base = ["--model_name_or_path", "m", "--data_path", "d.json", "--use_lora", "true", "--output_dir", str(tmp_path)]
    assert parse_args(base)[3].activation_checkpointing is True
    assert parse_args(base + ["--gradient_checkpointing", "false"])[3].activation_checkpointing is False
