"""save_huginn / load_huginn against the released checkpoint layout of the spec."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from rdhpc.model import CheckpointError, RecurrentDepthModel, load_huginn, model_config_from_size, save_huginn
from rdhpc.model.huginn import released_config, released_name


def build(seed=0, **overrides):
    torch.manual_seed(seed)
    model = RecurrentDepthModel(model_config_from_size("debug", **overrides))
    with torch.no_grad():  # non-trivial norms and qk_bias, so a dropped tensor would show
        for name, p in model.named_parameters():
            if "norm" in name or "qk_bias" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def test_round_trip_gives_identical_logits(tmp_path):
    model = build()
    save_huginn(model, tmp_path / "export")
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["config.json", "model.safetensors"]
    again = load_huginn(tmp_path / "export")
    x = torch.randint(0, 512, (2, 24))
    assert torch.equal(model(x, num_steps=5, init_scale=0).logits, again(x, num_steps=5, init_scale=0).logits)
    assert again.config.to_dict() == model.config.to_dict()


def test_bf16_export_loads_as_bf16(tmp_path):
    model = build()
    save_huginn(model, tmp_path, dtype=torch.bfloat16)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    again = load_huginn(tmp_path, dtype=torch.bfloat16)
    assert again.embedding.weight.dtype == torch.bfloat16
    assert torch.equal(again.embedding.weight, model.embedding.weight.to(torch.bfloat16))


def test_names_and_shapes_are_the_released_ones():
    with torch.device("meta"):
        model = RecurrentDepthModel(model_config_from_size("huginn-3.5b"))
    shapes = {released_name(n): tuple(t.shape) for n, t in model.state_dict().items()}
    h = 5280
    expected = {
        "transformer.wte.weight": (65536, h),
        "transformer.adapter.weight": (h, 2 * h),
        "transformer.ln_f.weight": (h,),
    }
    for stack, count in (("prelude", 2), ("core_block", 4), ("coda", 2)):
        for i in range(count):
            p = f"transformer.{stack}.{i}."
            expected.update({p + f"norm_{j}.weight": (h,) for j in range(1, 5)})
            expected.update({p + "attn.Wqkv.weight": (3 * h, h), p + "attn.qk_bias": (2, 1, 55, 96),
                             p + "attn.proj.weight": (h, h), p + "mlp.fc.weight": (2 * 17920, h),
                             p + "mlp.proj.weight": (h, 17920)})
    assert shapes == expected  # no lm_head.weight: tied

    config = released_config(model.config, torch.bfloat16)
    for field in ("model_type", "n_embd", "n_heads", "n_layers", "block_size", "vocab_size", "padding_multiple",
                  "tie_embeddings", "intermediate_size", "bias", "norm_eps", "n_layers_in_prelude",
                  "n_layers_in_recurrent_block", "n_layers_in_coda", "mean_recurrence", "mean_backprop_depth",
                  "qk_bias", "rope_base", "injection_type", "block_class_name", "norm_class_name", "mlp_class_name",
                  "nonlin_name", "state_init", "sampling_scheme", "init_strategy"):
        assert field in config, field
    assert (config["model_type"], config["n_embd"], config["n_heads"], config["n_layers"]) == ("huginn_raven", h, 55, 8)
    assert (config["block_class_name"], config["injection_type"], config["mlp_class_name"]) == \
        ("SandwichBlock", "linear", "GatedMLP")
    assert config["rope_base"] == 50000 and config["vocab_size"] == 65536 and config["head_dim"] == 96


def write_released_style(model, folder, mutate_config=None, mutate_tensors=None):
    """A checkpoint as the released model ships it: lm_head omitted, freqs_cis present, an extra
    (wrong) head_dim and the num_attention_heads spelling in config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {released_name(n): t.detach().clone() for n, t in model.state_dict().items()}
    tensors["freqs_cis"] = torch.randn(128, 8, 2)
    config = released_config(model.config, torch.float32)
    config.pop("rdhpc")
    config["num_attention_heads"] = config.pop("n_heads")
    config["head_dim"] = 7  # the released config can get derived fields wrong: must be ignored
    if mutate_config:
        mutate_config(config)
    if mutate_tensors:
        mutate_tensors(tensors)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_released_style_checkpoint_loads(tmp_path):
    model = build()
    folder = write_released_style(model, tmp_path / "released")
    again = load_huginn(folder)
    assert again.config.num_heads == 4 and again.config.head_dim == 16
    x = torch.randint(0, 512, (1, 16))
    assert torch.equal(model(x, num_steps=3, init_scale=0).logits, again(x, num_steps=3, init_scale=0).logits)


def test_untied_head_round_trips(tmp_path):
    model = build(tie_embeddings=False)
    save_huginn(model, tmp_path)
    assert "lm_head.weight" in load_file(str(tmp_path / "model.safetensors"))
    again = load_huginn(tmp_path)
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)


@pytest.mark.parametrize("case, message", [
    ("missing_tensor", "missing tensors ['transformer.coda.0.attn.Wqkv.weight']"),
    ("wrong_shape", "tensor 'transformer.adapter.weight' has shape (64, 64), config.json implies (64, 128)"),
    ("unexpected", "unexpected tensor 'transformer.core_block.7.attn.proj.weight'"),
    ("bad_model_type", "model_type is 'llama'"),
    ("missing_field", "missing field 'n_embd'"),
    ("bad_block", "block_class_name = 'PostNormBlock' is not supported"),
    ("untied_head_differs", "lm_head.weight differs from transformer.wte.weight"),
])
def test_bad_checkpoints_name_the_file_and_the_fault(tmp_path, case, message):
    model = build()
    mutate_config = mutate_tensors = None
    if case == "missing_tensor":
        mutate_tensors = lambda t: t.pop("transformer.coda.0.attn.Wqkv.weight")  # noqa: E731
    elif case == "wrong_shape":
        mutate_tensors = lambda t: t.update({"transformer.adapter.weight": torch.zeros(64, 64)})  # noqa: E731
    elif case == "unexpected":
        mutate_tensors = lambda t: t.update({"transformer.core_block.7.attn.proj.weight": torch.zeros(2)})  # noqa: E731
    elif case == "bad_model_type":
        mutate_config = lambda c: c.update(model_type="llama")  # noqa: E731
    elif case == "missing_field":
        mutate_config = lambda c: c.pop("n_embd")  # noqa: E731
    elif case == "bad_block":
        mutate_config = lambda c: c.update(block_class_name="PostNormBlock")  # noqa: E731
    elif case == "untied_head_differs":
        mutate_tensors = lambda t: t.update({"lm_head.weight": torch.zeros(512, 64)})  # noqa: E731
    folder = write_released_style(model, tmp_path / case, mutate_config, mutate_tensors)
    with pytest.raises(CheckpointError) as info:
        load_huginn(folder)
    assert message in str(info.value)
    assert str(folder) in str(info.value)


def test_corrupted_or_missing_files(tmp_path):
    with pytest.raises(CheckpointError, match="config.json: not found"):
        load_huginn(tmp_path)
    folder = save_huginn(build(), tmp_path / "ok")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])  # truncated
    with pytest.raises(CheckpointError, match="model.safetensors: cannot read"):
        load_huginn(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        load_huginn(folder)


def test_weights_are_never_unpickled(tmp_path, monkeypatch):
    folder = save_huginn(build(), tmp_path)
    import pickle

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    load_huginn(folder)
