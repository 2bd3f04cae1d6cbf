"""The recurrent-depth model against the published design (../shared/spec/recurrent-depth.md)."""

import ast
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rdhpc.model import MODEL_SIZES, ModelConfig, RecurrentDepthModel, model_config_from_size
from rdhpc.model.layers import SandwichBlock, rope_table


def build(size="debug", seed=0, **overrides):
    torch.manual_seed(seed)
    return RecurrentDepthModel(model_config_from_size(size, **overrides))


def meta_model(size, **overrides):
    with torch.device("meta"):
        return RecurrentDepthModel(model_config_from_size(size, **overrides))


# ---- shapes and parameter counts -----------------------------------------------------------------

def test_huginn_parameter_count_is_the_papers():
    counts = meta_model("huginn-3.5b").parameter_counts()
    assert counts["total"] == 3_564_976_800
    assert counts["core"] == 1_581_592_320 == 4 * 395_398_080
    assert counts["prelude"] + counts["coda"] == 1_581_592_320
    assert counts["adapter"] == 55_756_800
    assert counts["embedding"] == 346_030_080
    assert counts["lm_head"] == 0  # tied


@pytest.mark.parametrize("size", sorted(MODEL_SIZES))
def test_every_named_size_counts_what_its_shape_implies(size):
    c = model_config_from_size(size)
    h, i, heads = c.hidden_size, c.intermediate_size, c.num_heads
    block = 4 * h * h + 3 * h * i + 4 * h + (2 * h if c.qk_bias else 0)
    expected = (c.padded_vocab_size * h + block * c.num_stored_layers + 2 * h * h + h)
    assert meta_model(size).parameter_counts()["total"] == expected
    assert h % heads == 0


def test_named_sizes_are_what_their_names_say():
    total = {name: meta_model(name).parameter_counts()["total"] for name in MODEL_SIZES}
    assert total["debug"] < 1_000_000
    assert 120e6 < total["rd-150m"] < 180e6
    assert 0.85e9 < total["rd-1b"] < 1.15e9


def test_model_package_imports_no_distributed_code():
    root = Path(__file__).resolve().parents[1] / "rdhpc" / "model"
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert not name.startswith(("torch.distributed", "deepspeed")), f"{path.name} imports {name}"
    code = "import sys, rdhpc.model; print('deepspeed' in sys.modules, 'mpi4py' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


# ---- initialisation ------------------------------------------------------------------------------

def test_init_statistics_at_a_mid_size():
    model = build("rd-150m")
    c = model.config
    std, out_std = c.init_std, c.out_proj_init_std
    assert math.isclose(std, math.sqrt(2 / (5 * 896)))
    assert math.isclose(out_std, std / math.sqrt(2 * (2 + 4 * 16 + 2)))
    # A normal truncated at +-3 sigma has std 0.9866 sigma: well within the 5% asked for.
    groups = {
        "embedding": ([model.embedding.weight], std),
        "adapter": ([model.adapter.weight], std),
        "qkv": ([b.attn.qkv.weight for b in model.core], std),
        "mlp_fc": ([b.mlp.fc.weight for b in model.prelude], std),
        "attn_proj": ([b.attn.proj.weight for b in model.coda], out_std),
        "mlp_proj": ([b.mlp.proj.weight for b in model.core], out_std),
    }
    for name, (tensors, target) in groups.items():
        values = torch.cat([t.detach().flatten() for t in tensors])
        assert abs(values.std().item() / target - 1) < 0.05, name
        assert abs(values.mean().item()) < 0.01 * target, name
        assert values.abs().max().item() <= 3 * target * (1 + 1e-6), f"{name} not truncated at 3 std"
    for block in model.core:
        assert torch.all(block.norm_1.weight == 1) and torch.all(block.norm_4.weight == 1)
        assert torch.all(block.attn.qk_bias == 0)
    # the Huginn constants of the spec
    huginn = model_config_from_size("huginn-3.5b")
    assert huginn.effective_depth == 132
    assert abs(huginn.init_std - 8.704e-3) < 1e-6 and abs(huginn.out_proj_init_std - 5.357e-4) < 1e-7
    assert abs(huginn.embedding_scale - 72.66) < 0.01


def test_initial_state_statistics():
    model = build("debug")
    like = torch.empty(64, 128, model.config.hidden_size)
    state = model.initial_state(like)
    # std sqrt(2/(5h)) * sqrt(h) = sqrt(2/5), truncated at 3 sigma (std 0.9866 of that)
    assert abs(state.std().item() / (math.sqrt(2 / 5) * 0.9866) - 1) < 0.02
    assert state.abs().max().item() <= 3 * math.sqrt(2 / 5) + 1e-5
    assert torch.equal(model.initial_state(like, init_scale=0), torch.zeros_like(like))
    assert not torch.equal(model.initial_state(like), model.initial_state(like))  # fresh at every forward


def test_meta_build_then_init_on_a_real_device():
    """init_weights sets every parameter: nothing depends on what memory or default init held."""
    model = meta_model("debug").to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    reference = build("debug", seed=5)
    torch.manual_seed(0)
    reference.init_weights()
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name


# ---- truncated backpropagation -------------------------------------------------------------------

def test_no_gradient_reaches_the_core_without_grad_steps():
    model = build()
    x = torch.randint(0, 512, (2, 16))
    model(x, num_steps=(5, 0), labels=x).loss.backward()
    for p in list(model.core.parameters()) + [model.adapter.weight]:
        assert p.grad is None
    assert model.coda[0].mlp.fc.weight.grad is not None  # the coda still learns
    model.zero_grad(set_to_none=True)
    model(x, num_steps=(5, 3), labels=x).loss.backward()
    for p in list(model.core.parameters()) + [model.adapter.weight, model.prelude[0].attn.qkv.weight]:
        assert p.grad is not None and p.grad.abs().sum() > 0  # the prelude gets gradient through e


def saved_activation_bytes(model, x, num_steps):
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x, num_steps=num_steps, labels=x, init_scale=0)
    return total


def test_graph_holds_only_the_grad_iterations():
    model = build()
    x = torch.randint(0, 512, (2, 32))
    base = saved_activation_bytes(model, x, (5, 3))
    assert saved_activation_bytes(model, x, (20, 3)) == base  # no-grad steps keep nothing
    per_iteration = saved_activation_bytes(model, x, (5, 4)) - base
    assert per_iteration > 0
    assert saved_activation_bytes(model, x, (5, 6)) == base + 3 * per_iteration  # linear in k


def test_activation_checkpointing_gives_the_same_gradients_with_less_memory():
    x = torch.randint(0, 512, (2, 32))
    grads = []
    for checkpointing in (False, True):
        model = build(activation_checkpointing=checkpointing)
        model(x, num_steps=(2, 3), labels=x, init_scale=0).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    plain, ckpt = build(), build(activation_checkpointing=True)
    assert saved_activation_bytes(ckpt, x, (2, 6)) < saved_activation_bytes(plain, x, (2, 6)) / 2


def test_num_steps_conventions():
    model = build()
    k = model.config.mean_backprop_depth
    assert model.resolve_num_steps(None) == (model.config.mean_recurrence - k, k)
    assert model.resolve_num_steps(1) == (0, 1)
    assert model.resolve_num_steps(10) == (10 - k, k)
    assert model.resolve_num_steps((7, 0)) == (7, 0)
    assert model.resolve_num_steps(torch.tensor([3, 2])) == (3, 2)
    with pytest.raises(ValueError):
        model.resolve_num_steps((0, 0))


def test_zero_initial_state_is_deterministic_and_input_states_are_used():
    model = build().eval()
    x = torch.randint(0, 512, (2, 16))
    a = model(x, num_steps=4, init_scale=0)
    b = model(x, num_steps=4, init_scale=0)
    assert torch.equal(a.logits, b.logits)
    # Continuing from the state after 2 iterations for 2 more equals 4 iterations from zero.
    half = model(x, num_steps=2, init_scale=0).latent_state
    resumed = model(x, num_steps=2, input_states=half)
    torch.testing.assert_close(resumed.logits, a.logits, rtol=1e-5, atol=1e-5)
    assert not torch.equal(model(x, num_steps=4).logits, a.logits)  # random state by default


def test_ablations_build_and_train():
    x = torch.randint(0, 512, (2, 16))
    for overrides in ({"block_type": "prenorm"}, {"injection_type": "add", "norm_type": "rmsnorm-parameter-free"}):
        model = build(**overrides)
        out = model(x, num_steps=(1, 2), labels=x)
        out.loss.backward()
        assert torch.isfinite(out.loss)
    prenorm = build(block_type="prenorm")
    assert not hasattr(prenorm.core[0], "norm_3")
    additive = build(injection_type="add", norm_type="rmsnorm-parameter-free")
    assert additive.adapter is None and additive.core[0].norm_1.weight is None


# ---- mixed precision and compilation -------------------------------------------------------------

def gradients(model, x, autocast):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x, num_steps=(3, 2), labels=x, init_scale=0)
    out.loss.backward()
    return {name.removeprefix("_orig_mod."): p.grad.float().clone() for name, p in model.named_parameters()}


def assert_bf16_close(reference, candidate):
    """Within bf16 noise, for every parameter, and the core in particular (what the paper saw break)."""
    assert reference.keys() == candidate.keys()
    for name, ref in reference.items():
        got = candidate[name]
        assert got is not None, f"{name}: no gradient under bf16"
        rel = ((got - ref).norm() / ref.norm()).item()
        cos = F.cosine_similarity(got.flatten(), ref.flatten(), dim=0).item()
        assert rel < 0.05 and cos > 0.998, f"{name}: relative error {rel:.4f}, cosine {cos:.5f}"


def test_bf16_truncated_backprop_gradients_match_fp32_eager_and_compiled():
    torch._dynamo.reset()
    model = build(seed=1)
    x = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(0))
    reference = gradients(model, x, autocast=False)
    assert_bf16_close(reference, gradients(model, x, autocast=True))

    # The whole model traced by dynamo + AOTAutograd (no-grad and grad iterations in one graph).
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    assert_bf16_close(reference, gradients(compiled, x, autocast=True))

    # The core iteration compiled by inductor, the real code generator, as training compiles it.
    inductor_model = build(seed=1)
    inductor_model.core_iteration = torch.compile(inductor_model.core_iteration, fullgraph=True)
    assert_bf16_close(reference, gradients(inductor_model, x, autocast=True))


def test_block_and_core_iteration_compile_without_graph_breaks():
    torch._dynamo.reset()
    model = build()
    x, e = torch.randn(2, 16, 64), torch.randn(2, 16, 64)
    rope = rope_table(16, 16, 50000.0)
    for fn, args in ((model.core[0], (x, rope)), (model.core_iteration, (x, e, rope))):
        explanation = torch._dynamo.explain(fn)(*args)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1


# ---- the published layout, computed by hand ------------------------------------------------------

def reference_forward(sd, config, ids, num_steps):
    """An independent transcription of the spec for one sequence, written with complex-number RoPE
    (the released model's formulation), explicit RMSNorm and explicit causal softmax attention."""
    h, H = config.hidden_size, config.num_heads
    D = h // H
    eps = config.norm_eps
    T = ids.shape[0]

    def rms(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w

    freqs = 1.0 / (config.rope_base ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    angles = torch.outer(torch.arange(T, dtype=torch.float64), freqs)
    rot = torch.polar(torch.ones_like(angles), angles)  # (T, D/2), pairs (2i, 2i+1)

    def rope(x):  # x: (T, H, D)
        xc = torch.view_as_complex(x.reshape(T, H, D // 2, 2).contiguous())
        return torch.view_as_real(xc * rot[:, None, :]).reshape(T, H, D)

    def block(x, p):
        def attn(z):
            qkv = z @ sd[p + "attn.qkv.weight"].T
            q, k, v = qkv[:, :h], qkv[:, h:2 * h], qkv[:, 2 * h:]
            q = q.reshape(T, H, D) + sd[p + "attn.qk_bias"][0, 0]
            k = k.reshape(T, H, D) + sd[p + "attn.qk_bias"][1, 0]
            q, k, v = rope(q), rope(k), v.reshape(T, H, D)
            scores = torch.einsum("thd,shd->hts", q, k) / math.sqrt(D)
            scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
            out = torch.einsum("hts,shd->thd", scores.softmax(-1), v).reshape(T, h)
            return out @ sd[p + "attn.proj.weight"].T

        def mlp(z):
            hidden = z @ sd[p + "mlp.fc.weight"].T
            gate, up = hidden[:, :config.intermediate_size], hidden[:, config.intermediate_size:]
            return (F.silu(gate) * up) @ sd[p + "mlp.proj.weight"].T

        y = rms(x + attn(rms(x, sd[p + "norm_1.weight"])), sd[p + "norm_2.weight"])
        return rms(y + mlp(rms(y, sd[p + "norm_3.weight"])), sd[p + "norm_4.weight"])

    x = sd["embedding.weight"][ids] * math.sqrt(h)
    for i in range(config.num_prelude_layers):
        x = block(x, f"prelude.{i}.")
    e, s = x, torch.zeros_like(x)
    for _ in range(num_steps):
        s = torch.cat([s, e], dim=-1) @ sd["adapter.weight"].T  # state first, then e
        for i in range(config.num_core_layers):
            s = block(s, f"core.{i}.")
    x = rms(s, sd["final_norm.weight"])
    for i in range(config.num_coda_layers):
        x = block(x, f"coda.{i}.")
    return rms(x, sd["final_norm.weight"]) @ sd["embedding.weight"].T


def test_tiny_model_matches_the_spec_computed_by_hand():
    config = ModelConfig(vocab_size=32, padding_multiple=16, hidden_size=8, num_heads=2, intermediate_size=12,
                         num_prelude_layers=1, num_core_layers=2, num_coda_layers=1, max_seq_len=16,
                         mean_recurrence=3, mean_backprop_depth=2)
    torch.manual_seed(3)
    model = RecurrentDepthModel(config).double().eval()
    with torch.no_grad():  # make every norm weight and qk_bias matter, so a wrong order shows
        for name, p in model.named_parameters():
            if "norm" in name or "qk_bias" in name:
                p.copy_(torch.rand_like(p) + 0.5 if "norm" in name else torch.randn_like(p))
    ids = torch.randint(0, 32, (7,), generator=torch.Generator().manual_seed(1))
    sd = {k: v.double() for k, v in model.state_dict().items()}
    expected = reference_forward(sd, config, ids, num_steps=3)
    got = model(ids[None], num_steps=3, init_scale=0).logits[0]
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)

    # The check is sharp: the reference with the adapter's inputs swapped, or a single final norm,
    # or rotate-half RoPE, would differ.
    swapped = dict(sd)
    a = sd["adapter.weight"]
    swapped["adapter.weight"] = torch.cat([a[:, 8:], a[:, :8]], dim=1)
    assert not torch.allclose(reference_forward(swapped, config, ids, 3), got, atol=1e-6)
    scaled = dict(sd)
    scaled["final_norm.weight"] = sd["final_norm.weight"] * 1.5
    assert not torch.allclose(reference_forward(scaled, config, ids, 3), got, atol=1e-6)


def test_rope_rotates_adjacent_pairs():
    from rdhpc.model.layers import apply_rope

    D = 8
    x = torch.zeros(1, 3, 1, D)
    x[..., 0] = 1.0  # the first pair (0, 1) only
    out = apply_rope(x, rope_table(D, 3, 50000.0))
    # position 2, pair 0 has frequency 1: (cos 2, sin 2) lands in dims 0 and 1, nothing elsewhere
    torch.testing.assert_close(out[0, 2, 0, :2], torch.tensor([math.cos(2.0), math.sin(2.0)]))
    assert torch.all(out[..., 2:] == 0)


def test_sandwich_block_order():
    config = model_config_from_size("debug")
    torch.manual_seed(0)
    block = SandwichBlock(config)
    x = torch.randn(1, 5, 64)
    rope = rope_table(16, 5, 50000.0)
    with torch.no_grad():
        block.norm_2.weight.fill_(2.0)
        block.norm_4.weight.fill_(3.0)
    out = block(x, rope)
    # the last operation is norm_4: the output's rms per position is its weight, 3
    rms = out.pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.full_like(rms, 3.0), rtol=1e-4, atol=1e-4)


def test_bf16_autocast_keeps_the_state_in_float32():
    """The paper's precision: float32 weights under bf16 autocast. Matrix products run in bf16, but
    every norm's output (and so the residual stream and the latent state s_i) is float32, as the
    released RMSNorm's `norm(x.float()).type_as(x) * weight` gives; bf16 weights give a bf16 state."""
    torch.manual_seed(0)
    model = RecurrentDepthModel(model_config_from_size("debug"))
    x = torch.randint(0, 500, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, num_steps=4, labels=x, init_scale=0)
        assert model.adapter(torch.zeros(1, 128)).dtype == torch.bfloat16  # the products are bf16
    assert out.latent_state.dtype == torch.float32 and out.logits.dtype == torch.bfloat16
    reference = model(x, num_steps=4, labels=x, init_scale=0)
    assert abs(float(out.loss) - float(reference.loss)) < 2e-2
    half = RecurrentDepthModel(model_config_from_size("debug")).to(torch.bfloat16)
    assert half(x, num_steps=4).latent_state.dtype == torch.bfloat16


def test_keyed_initial_state_noise_depends_on_the_row_only():
    """state_seeds: row b's s_0 comes from a generator seeded with its own seed, whatever else is in
    the batch and whatever the global generator holds (the run then does not depend on how rows are
    spread over ranks); the statistics are the paper's (std sqrt(2/5), cut at 3 sigma)."""
    from rdhpc.model.sampling import TRAIN_NOISE, VALIDATION_NOISE, row_noise_seeds

    model = RecurrentDepthModel(model_config_from_size("debug"))
    like = torch.empty(3, 16, 64)
    seeds = row_noise_seeds(0, 5, [10, 11, 12])
    torch.manual_seed(1)
    together = model.initial_state(like, 1.0, seeds)
    torch.manual_seed(2)
    alone = model.initial_state(like[1:2], 1.0, seeds[1:2])
    assert torch.equal(together[1], alone[0]) and not torch.equal(together[0], together[1])
    big = model.initial_state(torch.empty(1, 4096, 64), 1.0, row_noise_seeds(0, 0, [0]))
    std = math.sqrt(2 / (5 * 64)) * math.sqrt(64)
    assert float(big.std()) == pytest.approx(std * 0.986, rel=0.02)  # a normal cut at 3 sigma: 0.986 sigma
    assert float(big.abs().max()) <= 3 * std + 1e-6
    # a function of (seed, stream, step, row) only
    assert row_noise_seeds(0, 5, [11]) == seeds[1:2] and row_noise_seeds(1, 5, [11]) != seeds[1:2]
    assert row_noise_seeds(0, 6, [11]) != seeds[1:2]
    assert row_noise_seeds(0, 5, [11], VALIDATION_NOISE) != row_noise_seeds(0, 5, [11], TRAIN_NOISE)
    with pytest.raises(ValueError, match="2 state seeds for a batch of 3 rows"):
        model.initial_state(like, 1.0, seeds[:2])
