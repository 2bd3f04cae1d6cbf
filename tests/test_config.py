import subprocess
import sys

import pytest
import yaml

from rdhpc.cli import main
from rdhpc.config import ConfigError, config_from_dict, config_to_dict, load_config, save_config
from rdhpc.config.loader import config_from_checkpoint, parse_override
from rdhpc.model import MODEL_SIZES


def problems_of(raw, overrides=()):
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw, list(overrides))
    return info.value.problems


def test_defaults_are_the_paper_run():
    config = config_from_dict({})
    assert config.model.hidden_size == 5280 and config.model.mean_recurrence == 32
    assert config.optim.lr == 4e-5 and config.optim.betas == (0.9, 0.95)
    assert config.schedule.warmup_steps == 4096
    assert config.train.global_batch_size == 4096


def test_every_shipped_config_loads(repo_root):
    for path in sorted((repo_root / "configs").glob("*.yaml")):
        load_config(path)


def test_size_is_a_base_and_keys_override_it():
    config = config_from_dict({"model": {"size": "debug", "mean_recurrence": 7}})
    assert config.model.hidden_size == MODEL_SIZES["debug"]["hidden_size"]
    assert config.model.mean_recurrence == 7
    assert config.model.size == "debug"


def test_overrides_beat_the_file_and_parse_as_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  size: debug\n  mean_recurrence: 8\neval:\n  depths: [1, 2]\n")
    config = load_config(path, ["model.mean_recurrence=16", "eval.depths=[3, 5]", "train.precision=fp32",
                                "optim.lr=1e-3", "model.qk_bias=false"])
    assert config.model.mean_recurrence == 16
    assert config.eval.depths == [3, 5]
    assert config.optim.lr == 1e-3 and isinstance(config.optim.lr, float)  # YAML 1.1 reads 1e-3 as a string
    assert config.model.qk_bias is False
    assert parse_override("model.size=huginn-3.5b") == (["model", "size"], "huginn-3.5b")


def test_all_problems_are_reported_at_once():
    problems = problems_of(
        {"model": {"size": "debug", "hidden_size": 65, "mean_recurence": 3, "qk_bias": "yes", "block_type": "post"},
         "trian": {},
         "train": {"val_depths": [1, 2], "micro_batch_size": 3, "global_batch_size": 8},
         "eval": {"depths": [1, "x"]}},
        ["optim.lr=abc", "zero.stage=5", "nosuch.key=1", "badformat"])
    text = "\n".join(problems)
    expected = [
        "trian: unknown section (did you mean 'train'?)",
        "model.mean_recurence: unknown key (did you mean 'mean_recurrence'?)",
        "model.qk_bias: expected bool, got str 'yes'",
        "optim.lr: expected float, got str 'abc'",
        "eval.depths[1]: expected int, got str 'x'",
        "train.val_depths: moved to eval.depths",
        "model.hidden_size: 65 is not divisible by model.num_heads = 4",
        "model.block_type: unknown value 'post'",
        "train.global_batch_size: 8 is not a multiple of train.micro_batch_size = 3",
        "zero.stage: must be 0, 1, 2 or 3, got 5",
        "unknown section 'nosuch'",
        "--set 'badformat': expected section.key=value",
    ]
    for fragment in expected:
        assert fragment in text, f"missing {fragment!r} in:\n{text}"
    assert len(problems) == len(expected)


def test_unknown_size_and_ablation_names_are_checked_at_load():
    text = "\n".join(problems_of({"model": {"size": "huginn-7b", "injection_type": "sum", "norm_type": "layernorm",
                                           "sampling_scheme": "uniform"}}))
    assert "model.size: unknown size 'huginn-7b'" in text
    assert "model.injection_type: unknown value 'sum'" in text
    assert "model.norm_type: unknown value 'layernorm'" in text
    assert "model.sampling_scheme: unknown value 'uniform'" in text


def test_shape_problems():
    text = "\n".join(problems_of({"model": {"size": "debug", "hidden_size": 72, "num_heads": 12,
                                           "mean_recurrence": 0, "num_core_layers": -1}}))
    assert "head_dim = hidden_size / num_heads = 6" not in text  # 72/12 = 6 is even: fine
    assert "model.mean_recurrence: must be > 0, got 0" in text
    assert "model.num_core_layers: must be > 0, got -1" in text
    text = "\n".join(problems_of({"model": {"size": "debug", "hidden_size": 60, "num_heads": 4}}))
    assert "head_dim = hidden_size / num_heads = 15 must be even" in text


def test_type_errors_on_nested_values():
    text = "\n".join(problems_of({"optim": {"betas": [0.9]}, "model": "debug", "train": {"seed": True}}))
    assert "optim.betas: expected a list of 2 values, got 1" in text
    assert "model: a section must be a mapping of keys, got str" in text
    assert "train.seed: expected int, got bool True" in text


def test_bad_yaml_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  size: [debug\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in info.value.problems[0] and "not valid YAML" in info.value.problems[0]
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(path)


def test_saved_config_reloads_identically(tmp_path):
    config = config_from_dict({"model": {"size": "debug"}}, ["eval.depths=[1, 3]", "optim.betas=[0.8, 0.9]"])
    save_config(config, tmp_path / "ckpt")
    again = config_from_checkpoint(tmp_path / "ckpt")
    assert config_to_dict(again) == config_to_dict(config)
    assert again == config
    # a checkpoint's config written before the eval section existed still loads, its keys moved
    old = config_to_dict(config)
    old["train"].update(val_interval=7, val_depths=[2, 5], val_batches=3)
    del old["eval"]
    (tmp_path / "ckpt" / "config.yaml").write_text(yaml.safe_dump(old))
    moved = config_from_checkpoint(tmp_path / "ckpt")
    assert (moved.eval.interval, moved.eval.depths) == (7, [2, 5])
    assert moved.eval.rows == config.eval.rows  # val_batches meant micro-batches per rank: dropped, not moved


def test_cli_reports_every_problem_and_exits_2(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  size: debug\n  hidden_size: 65\n  mean_recurence: 3\n")
    assert main(["config", str(path), "--set", "train.precision=fp16"]) == 2
    err = capsys.readouterr().err
    assert f"3 configuration problem(s) in {path}" in err
    assert "did you mean 'mean_recurrence'" in err and "hidden_size: 65" in err and "train.precision" in err
    assert "Traceback" not in err


def test_cli_as_a_process(tmp_path, repo_root):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  lr: -1\n")
    done = subprocess.run([sys.executable, "-m", "rdhpc.cli", "config", str(path)], capture_output=True, text=True)
    assert done.returncode == 2
    assert "optim.lr: must be > 0, got -1" in done.stderr and "Traceback" not in done.stderr
    done = subprocess.run([sys.executable, "-m", "rdhpc.cli", "config", "configs/huginn-3.5b-frontier.yaml", "--quiet"],
                          capture_output=True, text=True, cwd=repo_root)
    assert done.returncode == 0, done.stderr
    assert "3,564,976,800 parameters" in done.stdout


@pytest.mark.parametrize("command", ["config", "train", "launch", "demo", "prep", "submit", "status", "eval",
                                     "generate", "export", "plan", "tensorboard"])
def test_every_subcommand_is_built_and_documented(command, capsys):
    with pytest.raises(SystemExit) as exit_status:
        main([command, "--help"])
    assert exit_status.value.code == 0
    assert "not built yet" not in capsys.readouterr().out
