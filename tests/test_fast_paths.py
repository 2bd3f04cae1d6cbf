"""The speed and memory switches of the trainer, each against the plain path it replaces (NOTES.md,
"Training throughput"): same losses and gradients within float rounding."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rdhpc.config import ConfigError, load_config
from rdhpc.model import RecurrentDepthModel, model_config_from_size
from rdhpc.model.layers import RMSNorm, SandwichBlock, apply_rope, rope_table
from rdhpc.model.losses import linear_cross_entropy
from rdhpc.model.recurrent_depth import IGNORE_INDEX
from rdhpc.train.deepspeed_config import build_deepspeed_config
from rdhpc.train.engine import attention_kernels, compile_model
from rdhpc.train.optim import build_optimizer

DEBUG_YAML = Path(__file__).resolve().parents[1] / "configs" / "debug.yaml"


def build(seed=0, **overrides):
    torch.manual_seed(seed)
    return RecurrentDepthModel(model_config_from_size("debug", **overrides))


def loss_and_grads(model, x, labels, num_steps=(3, 2), compute=None):
    model.zero_grad(set_to_none=True)
    out = (compute or model)(x, num_steps=num_steps, labels=labels, init_scale=0, return_logits=False)
    out.loss.backward()
    return out.loss.detach(), {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters()}


def assert_same(reference, candidate, rtol=1e-5):
    (loss0, grads0), (loss1, grads1) = reference, candidate
    assert loss1.item() == pytest.approx(loss0.item(), rel=rtol)
    assert grads0.keys() == grads1.keys()
    for name, g0 in grads0.items():
        rel = ((grads1[name] - g0).norm() / g0.norm().clamp_min(1e-30)).item()
        assert rel <= rtol, f"{name}: relative difference {rel:.2e}"


def batch(seed=0, B=2, T=32, vocab=512):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (B, T), generator=g)
    labels = torch.randint(0, vocab, (B, T), generator=g)
    labels[0, :5] = IGNORE_INDEX  # padding the loss must skip
    return x, labels


# ---- (c) RMSNorm and RoPE with their own backward ---------------------------------------------------

def plain_rms_norm(x, weight, eps):
    x32 = x.to(torch.promote_types(x.dtype, torch.float32))
    out = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (out * weight.to(x32.dtype) if weight is not None else out).type_as(x)


def plain_rope(x, table):
    x2 = x.to(table.dtype).unflatten(-1, (-1, 2))
    cos, sin = table[None, :, None, :, 0], table[None, :, None, :, 1]
    return torch.stack([x2[..., 0] * cos - x2[..., 1] * sin, x2[..., 0] * sin + x2[..., 1] * cos], -1).flatten(-2).type_as(x)


@pytest.mark.parametrize("learnable", [True, False])
def test_rms_norm_and_rope_backward_equal_autograd_through_the_plain_ops(learnable):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 3, 16, generator=g, dtype=torch.float64, requires_grad=True)
    norm = RMSNorm(16, 1e-6, learnable).double()
    if learnable:
        norm.weight.data = torch.randn(16, generator=g, dtype=torch.float64)
    upstream = torch.randn(2, 7, 3, 16, generator=g, dtype=torch.float64)
    for ours, plain, params in (
            (norm, lambda t: plain_rms_norm(t, norm.weight, 1e-6), [x] + list(norm.parameters())),
            (lambda t: apply_rope(t, rope_table(16, 7, 50000.0, dtype=torch.float64)),
             lambda t: plain_rope(t, rope_table(16, 7, 50000.0, dtype=torch.float64)), [x])):
        expected = torch.autograd.grad((plain(x) * upstream).sum(), params)
        out = ours(x)
        torch.testing.assert_close(out, plain(x), rtol=1e-14, atol=0)
        for got, want in zip(torch.autograd.grad((out * upstream).sum(), params), expected):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_a_bf16_block_saves_no_float32_activation():
    """What backward keeps of one sandwich block in bf16: activations in bf16, float32 only for
    the per-row rsqrt of the norms (and the attention kernel's own statistics)."""
    torch.manual_seed(0)
    config = model_config_from_size("debug")
    block = SandwichBlock(config).to(torch.bfloat16)
    x = torch.randn(2, 32, 64, dtype=torch.bfloat16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        block(x, rope_table(16, 32, 50000.0))
    large_fp32 = [tuple(t.shape) for t in saved if t.dtype == torch.float32 and t.numel() >= 2 * 32 * 64]
    assert large_fp32 == [], large_fp32


# ---- (a) chunked linear + cross-entropy ----------------------------------------------------------

@pytest.mark.parametrize("chunk", [1, 7, 16, 64, 1000])
def test_chunked_linear_cross_entropy_equals_the_plain_loss_and_gradients(chunk):
    g = torch.Generator().manual_seed(chunk)
    x = torch.randn(64, 24, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 24, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (64,), generator=g)
    labels[::5] = IGNORE_INDEX
    plain = F.cross_entropy(F.linear(x, w), labels, ignore_index=IGNORE_INDEX)
    dx0, dw0 = torch.autograd.grad(3.0 * plain, (x, w))  # a non-unit upstream gradient
    fused = linear_cross_entropy(x, w, labels, chunk, IGNORE_INDEX)
    dx1, dw1 = torch.autograd.grad(3.0 * fused, (x, w))
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=0)
    torch.testing.assert_close(dx1, dx0, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(dw1, dw0, rtol=1e-10, atol=1e-14)


def test_chunked_loss_in_the_model_matches_the_plain_head_in_float32():
    x, labels = batch()
    plain = loss_and_grads(build(), x, labels)
    for chunk in (5, 64):
        assert_same(plain, loss_and_grads(build(loss_chunk_size=chunk), x, labels))
    # asked for logits, the model still returns them (and the same loss)
    model = build(loss_chunk_size=5)
    out = model(x, num_steps=(1, 1), labels=labels, init_scale=0, return_logits=True)
    assert out.logits.shape == (2, 32, 512)


def test_chunked_loss_under_autocast_computes_the_head_in_bf16():
    x, labels = batch()
    grads = {}
    for chunk in (0, 16):
        model = build(loss_chunk_size=chunk)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x, num_steps=(1, 1), labels=labels, init_scale=0, return_logits=False).loss
        loss.backward()
        grads[chunk] = (loss.item(), model.embedding.weight.grad)
    assert grads[16][1].dtype == torch.float32
    assert grads[16][0] == pytest.approx(grads[0][0], rel=1e-3)
    assert ((grads[16][1] - grads[0][1]).norm() / grads[0][1].norm()).item() < 2e-2


def test_chunked_loss_keeps_no_float32_logits():
    """The saved tensors of the head: with chunks, one (N, V) gradient in the model's dtype instead of
    the float32 log-softmax and logits."""
    x, labels = batch(T=64)

    def largest_saved(model):
        sizes = []

        def pack(t):
            sizes.append((t.numel(), t.dtype))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x, num_steps=(0, 1), labels=labels, init_scale=0, return_logits=False)
        return [s for s in sizes if s[0] >= 2 * 64 * 512]  # tensors as large as the (B*T, V) logits

    plain = largest_saved(build().to(torch.bfloat16))
    assert (2 * 64 * 512, torch.float32) in plain, plain  # the float32 log-softmax
    assert largest_saved(build(loss_chunk_size=16).to(torch.bfloat16)) == [(2 * 64 * 512, torch.bfloat16)]


# ---- (e) the iterations without gradient under inference mode -------------------------------------

def test_inference_mode_iterations_give_the_same_gradients():
    x, labels = batch()
    reference = loss_and_grads(build(), x, labels)
    model = build(no_grad_mode="inference_mode")
    assert_same(reference, loss_and_grads(model, x, labels), rtol=0)  # bit-identical
    out = model(x, num_steps=(3, 1), labels=labels, init_scale=0)
    assert not out.latent_state.is_inference() and not out.previous_state.is_inference()
    # every split of a depth, none without grad included, and validation (no grad at all)
    for steps in ((0, 2), (4, 0), (1, 1)):
        model(x, num_steps=steps, labels=labels).loss.backward() if steps[1] else None
    with torch.no_grad():
        model(x, num_steps=4, labels=labels)


def test_the_state_leaving_inference_mode_is_a_normal_tensor():
    """A tensor made under inference mode can never be saved for backward nor changed in place
    outside it; iterate() hands out copies, so every caller may use the state as before."""
    model = build(no_grad_mode="inference_mode")
    e = torch.randn(1, 8, 64, requires_grad=True)
    rope = model.rope(8, "cpu")
    w = torch.ones(64, requires_grad=True)
    with torch.inference_mode():
        state = model.core_iteration(torch.zeros(1, 8, 64), e, rope)
    with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
        (state * w).sum().backward()
    state, previous = model.iterate(torch.zeros(1, 8, 64), e, rope, (3, 0))
    assert not state.is_inference() and not previous.is_inference()
    (state * w + previous * w).sum().backward()
    state.add_(1)


# ---- the loop-invariant half of the adapter ---------------------------------------------------------

def test_hoisted_injection_gives_the_same_gradients():
    x, labels = batch()
    reference = loss_and_grads(build(), x, labels)
    assert_same(reference, loss_and_grads(build(hoist_injection=True), x, labels))
    assert_same(reference, loss_and_grads(build(hoist_injection=True, activation_checkpointing=True), x, labels))
    torch._dynamo.reset()
    compiled = compile_model(build(hoist_injection=True, no_grad_mode="inference_mode"), "core", backend="aot_eager")
    assert_same(reference, loss_and_grads(compiled, x, labels))
    additive = dict(injection_type="add", norm_type="rmsnorm-parameter-free")  # no adapter: nothing to hoist
    assert_same(loss_and_grads(build(**additive), x, labels), loss_and_grads(build(hoist_injection=True, **additive),
                                                                              x, labels), rtol=0)
    with pytest.raises(ConfigError, match="hoist_injection"):
        load_config(DEBUG_YAML, ["model.hoist_injection=true", "zero.stage=3"])


# ---- selective activation checkpointing: the core blocks' MLPs ---------------------------------------

def test_checkpointed_core_mlps_give_the_same_gradients_and_keep_less():
    x, labels = batch()
    reference = loss_and_grads(build(), x, labels)
    model = build(checkpoint_core_mlp=True)
    assert all(block.checkpoint_mlp for block in model.core)
    assert not any(block.checkpoint_mlp for block in (*model.prelude, *model.coda))
    assert_same(reference, loss_and_grads(model, x, labels), rtol=0)  # recomputed exactly on the CPU
    torch._dynamo.reset()
    compiled = compile_model(build(checkpoint_core_mlp=True), "core", backend="aot_eager")
    assert_same(reference, loss_and_grads(compiled, x, labels))

    def saved_bytes(m):
        total = 0

        def pack(t):
            nonlocal total
            if not isinstance(t, torch.nn.Parameter):
                total += t.numel() * t.element_size()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            m(x, num_steps=(3, 2), labels=labels, init_scale=0, return_logits=False).loss.backward()
        return total
    # the MLP's (tokens, 2 x intermediate) and (tokens, intermediate) tensors are no longer kept
    c = model.config
    tokens = x.numel()
    fewer = saved_bytes(build()) - saved_bytes(build(checkpoint_core_mlp=True))
    per_block = tokens * 4 * (2 * c.intermediate_size + c.intermediate_size)
    assert fewer >= per_block * c.num_core_layers * 2  # at least the two tensors, x 2 iterations with grad
    with pytest.raises(ConfigError, match="checkpoint_core_mlp: redundant"):
        load_config(DEBUG_YAML, ["model.checkpoint_core_mlp=true", "model.activation_checkpointing=true"])


# ---- (b) compile scopes, (d) attention kernels -----------------------------------------------------

@pytest.mark.parametrize("scope", ["core", "model"])
def test_compiled_scopes_give_the_eager_gradients(scope):
    """aot_eager: dynamo's graph capture and AOTAutograd's joint graph, without inductor's code
    generation (minutes on these CPUs); the chunked loss's autograd.Function is traced too."""
    torch._dynamo.reset()
    x, labels = batch()
    reference = loss_and_grads(build(loss_chunk_size=16), x, labels)
    model = compile_model(build(loss_chunk_size=16), scope, backend="aot_eager")
    assert_same(reference, loss_and_grads(model, x, labels))
    assert_same(reference, loss_and_grads(model, x, labels))  # the cached graphs, second call
    names = [n for n, _ in model.named_parameters()]
    assert names == [n for n, _ in build().named_parameters()]  # checkpoints keep their keys


def test_compiled_core_under_inference_mode():
    torch._dynamo.reset()
    x, labels = batch()
    reference = loss_and_grads(build(), x, labels)
    model = compile_model(build(no_grad_mode="inference_mode"), "core", backend="aot_eager")
    assert_same(reference, loss_and_grads(model, x, labels))


@pytest.mark.parametrize("backend", ["math", "flash"])
def test_attention_kernel_choice_keeps_the_loss(backend):
    x, labels = batch()
    reference = loss_and_grads(build(), x, labels)
    with attention_kernels(backend):
        assert_same(reference, loss_and_grads(build(), x, labels), rtol=1e-4)


# ---- the config of the switches --------------------------------------------------------------------

def test_switches_are_validated_when_the_config_loads():
    assert load_config(DEBUG_YAML).train.compile_scope is None
    assert load_config(DEBUG_YAML, ["train.compile=true"]).train.compile_scope == "core"
    assert load_config(DEBUG_YAML, ["train.compile=model"]).train.compile_scope == "model"
    with pytest.raises(ConfigError) as err:
        load_config(DEBUG_YAML, ["train.compile=everything", "train.sdpa_backend=fast", "model.no_grad_mode=x",
                                           "model.loss_chunk_size=-1", "optim.name=adam-atan2", "optim.fused=true",
                                           "train.bf16_immediate_grad_update=true", "train.compile=3"])
    text = str(err.value)
    for key in ("train.compile: expected bool or str", "train.sdpa_backend", "model.no_grad_mode",
                "model.loss_chunk_size", "optim.fused", "train.bf16_immediate_grad_update"):
        assert key in text, key
    with pytest.raises(ConfigError, match="zero.stage 3"):
        load_config(DEBUG_YAML, ["train.compile=core", "zero.stage=3"])


def test_deepspeed_config_of_the_switches():
    run = load_config(DEBUG_YAML, ["train.precision=bf16", "train.bf16_immediate_grad_update=true"])
    assert build_deepspeed_config(run, 2)["bf16"] == {"enabled": True, "immediate_grad_update": True}
    assert build_deepspeed_config(load_config(DEBUG_YAML), 2)["bf16"] == {"enabled": False}


def test_fused_adamw_on_gpus_by_default():
    model = build()
    run = load_config(DEBUG_YAML)
    assert build_optimizer(model, run.optim, "cuda").defaults["fused"] is True
    assert build_optimizer(model, run.optim, "cpu").defaults["foreach"] is False
    run = load_config(DEBUG_YAML, ["optim.fused=true"])
    assert build_optimizer(model, run.optim, "cpu").defaults["fused"] is True
