"""Export and conversion: ZeRO checkpoints of every stage consolidated on the CPU, one safetensors
file with its config, the released Huginn layout both ways, initial weights for continued pretraining."""

import json

import pytest
import torch

import trained_runs
from rdhpc.cli import main
from rdhpc.export import (ExportError, consolidated_state_dict, load_checkpoint,
                          load_initial_weights, resolve_deepspeed)
from rdhpc.model import RecurrentDepthModel, load_huginn, model_config_from_size


def module_weights(run_dir):
    folder, tag = resolve_deepspeed(run_dir)
    files = sorted((folder / tag).glob("*mp_rank_00_model_states.pt"))
    return torch.load(files[0], map_location="cpu", weights_only=True)["module"]


def test_every_zero_stage_consolidates_to_the_same_weights():
    runs = {stage: trained_runs.trained_run(2, stage, "fp32") for stage in (0, 1, 2, 3)}
    states = {stage: consolidated_state_dict(*resolve_deepspeed(run)) for stage, run in runs.items()}
    torch.manual_seed(0)  # train.seed of the debug config: the initial weights
    initial = RecurrentDepthModel(load_checkpoint(runs[0]).run_config.model).state_dict()
    for stage in (1, 2):  # the module copy in the files is complete for stages 0-2: exactly the masters
        module = module_weights(runs[stage])
        assert all(torch.equal(states[stage][k], module[k].float()) for k in module)
    for stage in (1, 2, 3):  # the same data and seed give the same training, whatever the sharding
        assert states[stage].keys() == states[0].keys()
        for name, tensor in states[0].items():
            torch.testing.assert_close(states[stage][name], tensor, rtol=0, atol=1e-5)
    assert any(not torch.equal(states[3][k], initial[k]) for k in initial)  # two steps moved the weights


def test_bf16_checkpoints_give_their_float32_master_weights():
    run = trained_runs.trained_run(2, 2, "bf16")
    state = consolidated_state_dict(*resolve_deepspeed(run))
    module = module_weights(run)
    assert all(t.dtype == torch.float32 for t in state.values())
    assert all(module[k].dtype == torch.bfloat16 for k in module)
    # the bf16 module copy is the masters rounded; the masters carry more bits than bf16 holds
    for k in module:
        torch.testing.assert_close(state[k].to(torch.bfloat16), module[k], rtol=0, atol=0)
    assert any(not torch.equal(state[k], module[k].float()) for k in module)


def test_only_weights_are_unpickled(monkeypatch):
    run = trained_runs.trained_run(2, 3, "fp32")
    calls = []
    original = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    consolidated_state_dict(*resolve_deepspeed(run))
    consolidated_state_dict(*resolve_deepspeed(trained_runs.trained_run(2, 0, "fp32")))
    assert calls and all(c is True for c in calls)


def test_export_round_trips_through_every_format(tmp_path, capsys):
    run = trained_runs.trained_run(2, 3, "fp32")
    probe = torch.randint(0, 512, (2, 16))
    source = load_checkpoint(run / "checkpoints")
    expected = source.model(probe, num_steps=3, init_scale=0).logits

    assert main(["export", str(run / "checkpoints"), "--out", str(tmp_path / "model.safetensors")]) == 0
    assert "(step 2)" in capsys.readouterr().out
    assert main(["export", str(tmp_path / "model.safetensors"), "--format", "huginn", "--out", str(tmp_path / "hf")]) == 0
    assert main(["export", str(tmp_path / "hf"), "--out", str(tmp_path / "back.safetensors")]) == 0

    single = load_checkpoint(tmp_path / "model.safetensors")
    assert single.kind == "safetensors" and single.step == 2 and single.run_config.zero.stage == 3
    assert single.tokenizer == source.tokenizer
    released = load_huginn(tmp_path / "hf")  # the released loader, nothing of ours in between
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "huginn_raven" and config["n_embd"] == 64
    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == open(source.tokenizer, "rb").read()
    back = load_checkpoint(tmp_path / "back.safetensors")
    for model in (single.model, released, back.model):
        assert torch.equal(model(probe, num_steps=3, init_scale=0).logits, expected)

    assert main(["export", str(run), "--out", str(tmp_path / "half.safetensors"), "--dtype", "bf16"]) == 0
    half = load_checkpoint(tmp_path / "half.safetensors").model
    assert next(half.parameters()).dtype == torch.bfloat16


def test_errors_name_the_path(tmp_path, capsys):
    assert main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert f"{tmp_path / 'missing'}: no such file or folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["export", str(tmp_path / "empty"), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "not a checkpoint" in capsys.readouterr().err
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    assert main(["export", str(tmp_path / "foreign.safetensors"), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "rdhpc.model_config" in capsys.readouterr().err
    run = trained_runs.trained_run(2, 0, "fp32")
    assert main(["export", str(run), "--out", str(tmp_path / "x.bin")]) == 2
    assert "should end in .safetensors" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "mp_rank_00_model_states.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ExportError, match="broken/rdhpc/config.yaml: not found"):
        load_checkpoint(broken)
    import shutil

    folder, tag = resolve_deepspeed(run)
    shutil.copytree(folder / tag / "rdhpc", broken / "rdhpc")
    with pytest.raises(ExportError, match="broken: cannot consolidate this ZeRO stage-0 checkpoint"):
        load_checkpoint(broken)


def test_released_weights_start_a_run(tmp_path):
    from rdhpc.config import config_from_dict

    torch.manual_seed(7)
    released = RecurrentDepthModel(model_config_from_size("debug"))
    from rdhpc.model import save_huginn

    save_huginn(released, tmp_path / "huginn")
    run = config_from_dict({"model": {"size": "debug", "mean_recurrence": 8}},
                           [f"checkpoint.init_from={tmp_path / 'huginn'}"])
    assert run.checkpoint.init_from == str(tmp_path / "huginn")
    model = RecurrentDepthModel(run.model)  # what the trainer builds, with its own (different) depth settings
    loaded = load_initial_weights(model, run.checkpoint.init_from, log=lambda *a: None)
    assert loaded.kind == "huginn"
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), released.state_dict().values()))
    assert model.config.mean_recurrence == 8  # the run's depth settings stay

    wider = RecurrentDepthModel(model_config_from_size("debug", hidden_size=128))
    with pytest.raises(ExportError, match=r"(?s)checkpoint.init_from = .*huginn.*model.hidden_size: run has 128, "
                                          r"checkpoint has 64"):
        load_initial_weights(wider, tmp_path / "huginn")
    with pytest.raises(ExportError, match="checkpoint.init_from = .*nowhere: .*no such file"):
        load_initial_weights(model, tmp_path / "nowhere")
