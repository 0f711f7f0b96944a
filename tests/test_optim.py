"""LAMB against a numpy transcription of tensorflow-addons' update rule; parameter groups; schedules."""

from __future__ import annotations

import copy

import math

import numpy as np
import pytest
import torch
from torch import nn

from openalign import create_model
from openalign.train import Lamb, build_optimizer, lr_factor, parameter_groups


def tfa_lamb_reference(weights, grads_per_step, lr, beta1, beta2, eps, weight_decay, adapt):
    """tfa.optimizers.LAMB 0.12 _resource_apply_dense, step by step, in float64 numpy."""
    w = [np.array(x, dtype=np.float64) for x in weights]
    m = [np.zeros_like(x) for x in w]
    v = [np.zeros_like(x) for x in w]
    for t, grads in enumerate(grads_per_step, start=1):
        for i, g in enumerate(grads):
            m[i] = beta1 * m[i] + (1 - beta1) * g
            v[i] = beta2 * v[i] + (1 - beta2) * g * g
            update = (m[i] / (1 - beta1**t)) / (np.sqrt(v[i] / (1 - beta2**t)) + eps) + weight_decay * w[i]
            ratio = 1.0
            if adapt:
                w_norm, u_norm = np.linalg.norm(w[i]), np.linalg.norm(update)
                ratio = w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0
            w[i] = w[i] - ratio * lr * update
    return w


@pytest.mark.parametrize("weight_decay, adapt", [(0.01, True), (0.0, True), (0.01, False)])
def test_lamb_matches_tensorflow_addons(weight_decay, adapt):
    rng = np.random.default_rng(0)
    weights = [rng.normal(size=(4, 3)), rng.normal(size=5), np.zeros(3)]  # a zero tensor: ratio falls back to 1
    grads = [[rng.normal(size=w.shape) for w in weights] for _ in range(5)]
    params = [torch.tensor(w, dtype=torch.float64, requires_grad=True) for w in weights]
    optimizer = Lamb([{"params": params, "weight_decay": weight_decay, "trust_ratio": adapt}],
                     lr=0.05, betas=(0.9, 0.999), eps=1e-6)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = torch.tensor(g)
        optimizer.step()
    expected = tfa_lamb_reference(weights, grads, 0.05, 0.9, 0.999, 1e-6, weight_decay, adapt)
    for p, e in zip(params, expected):
        np.testing.assert_allclose(p.detach().numpy(), e, rtol=1e-10, atol=1e-12)


def test_lamb_state_round_trips_through_state_dict():
    """A LAMB restored from a state dict takes exactly the steps the original would have taken."""
    torch.manual_seed(0)
    grads = [torch.randn(3, 4) for _ in range(4)]
    param = nn.Parameter(torch.randn(3, 4))
    optimizer = Lamb([param], lr=0.1, weight_decay=0.01)
    for grad in grads[:2]:
        param.grad = grad.clone()
        optimizer.step()
    clone_param = nn.Parameter(param.detach().clone())
    clone = Lamb([clone_param], lr=0.1, weight_decay=0.01)
    clone.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # as if read back from disk
    for grad in grads[2:]:
        for p, o in ((param, optimizer), (clone_param, clone)):
            p.grad = grad.clone()
            o.step()
    assert torch.equal(param, clone_param)
    assert torch.equal(optimizer.state[param]["exp_avg_sq"], clone.state[clone_param]["exp_avg_sq"])


def test_lamb_groups_exclude_batch_norm_and_temperature_from_decay_and_trust_ratio():
    model = create_model("align-test")
    groups = parameter_groups(model, 1e-5, "lamb")
    exempt = {id(p) for p in groups[1]["params"]}
    names = {name for name, p in model.named_parameters() if id(p) in exempt}
    assert "log_temperature" in names
    assert "image_tower.embeddings.batchnorm.weight" in names
    assert "image_tower.encoder.blocks.0.projection.project_bn.bias" in names
    assert "text_tower.bert.embeddings.LayerNorm.weight" not in names  # tfa only excludes 'bn/'
    assert "text_projection.bias" not in names
    assert (groups[0]["weight_decay"], groups[0]["trust_ratio"]) == (1e-5, True)
    assert (groups[1]["weight_decay"], groups[1]["trust_ratio"]) == (0.0, False)


def test_adamw_groups_also_exempt_biases_and_layer_norms():
    model = create_model("align-test")
    optimizer = build_optimizer(model, "adamw", 1e-3, 0.2, (0.9, 0.98), 1e-6, torch.device("cpu"))
    assert isinstance(optimizer, torch.optim.AdamW)
    decayed = {id(p) for p in optimizer.param_groups[0]["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (p.ndim >= 2), name


def big_vision_adafactor_step(w, g, state, step, lr, weight_decay, momentum=0.9, cap=0.999, eps=1e-30):
    """One step of shared spec clippo.md §4.1 read literally, in float32 numpy, from ``state`` (R, C
    or v, and m; none at the first step): β₂ = min(cap, 1 − (step+1)^−0.8); factored second moments
    R (the mean of g² over the largest dim) and C (over the second largest), v̂ = R·C / mean(R), as
    Adafactor defines it, when the second largest dim is >= 32, else v̂ = v; u = g / √v̂;
    m = 0.9·m + 0.1·u, where 0.9·m is taken in m's bfloat16 as JAX takes a Python float times a
    bfloat16 array: the float cast to bfloat16 (0.8984375), the product rounded to it (checked against
    optax 0.2.8's ema on JAX 0.10.2: equal to 2.4e-7); w ← w − lr·m − lr·wd·w. Returns the new
    weights and state (m unrounded)."""
    beta2 = np.float32(min(cap, 1 - (step + 1) ** -0.8))
    g2, new = g ** 2 + np.float32(eps), {}
    sizes = sorted(range(g.ndim), key=lambda d: (g.shape[d], d))
    if g.ndim >= 2 and g.shape[sizes[-2]] >= 32:
        largest, second = sizes[-1], sizes[-2]
        new["R"] = beta2 * state.get("R", 0) + (1 - beta2) * g2.mean(axis=largest, keepdims=True)
        new["C"] = beta2 * state.get("C", 0) + (1 - beta2) * g2.mean(axis=second, keepdims=True)
        v_hat = new["R"] * new["C"] / new["R"].mean(axis=second, keepdims=True)
    else:
        new["v"] = v_hat = beta2 * state.get("v", 0) + (1 - beta2) * g2
    factor = np.float32(torch.tensor(momentum, dtype=torch.bfloat16).item())
    decayed = torch.from_numpy(factor * state.get("m", np.zeros_like(g))).bfloat16().float().numpy()
    new["m"] = decayed + np.float32(1 - momentum) * (g / np.sqrt(v_hat))
    return w - np.float32(lr) * new["m"] - np.float32(lr * weight_decay) * w, new


def test_adafactor_matches_big_visions_update_factored_and_whole():
    """Each step against the reference from the same state (the optimiser's, before the step): the
    weights and second moments to float32 rounding, the bfloat16 momentum to its rounding."""
    from openalign.train.optim import BigVisionAdafactor

    rng = np.random.default_rng(0)
    # factored over (64, 48); kept whole (second dim 16 < 32); 3-D factored over its last two; a square
    # matrix (the later dim counts as the larger, as numpy's argsort orders it); a vector
    shapes = [(64, 48), (40, 16), (3, 64, 40), (48, 48), (10,)]
    params = [nn.Parameter(torch.from_numpy(rng.normal(size=shape).astype(np.float32))) for shape in shapes]
    optimizer = BigVisionAdafactor(params, lr=0.01, weight_decay=0.1)
    assert [BigVisionAdafactor.factored_dims(torch.Size(shape)) for shape in shapes] == \
        [(1, 0), None, (2, 1), (0, 1), None]
    for step in range(6):
        for param in params:
            grad = (rng.normal(size=param.shape) * rng.uniform(0.1, 3, size=param.shape)).astype(np.float32)
            state, dims = optimizer.state[param], BigVisionAdafactor.factored_dims(param.shape)
            rows, columns = dims or (None, None)
            before = {"m": state["momentum"].float().numpy()} if state else {}
            if "v" in state:
                before["v"] = state["v"].numpy().copy()
            elif state:
                before["R"] = state["v_row"].unsqueeze(columns).numpy().copy()
                before["C"] = state["v_col"].unsqueeze(rows).numpy().copy()
            want, after = big_vision_adafactor_step(param.detach().numpy().copy(), grad, before, step, 0.01, 0.1)
            param.grad = torch.from_numpy(grad)
            optimizer.step()
            # the step uses the momentum before its rounding to bfloat16: float32 rounding only
            np.testing.assert_allclose(param.detach().numpy(), want, rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(state["momentum"].float().numpy(), after["m"], rtol=2 ** -8, atol=1e-30)
            assert state["momentum"].dtype == torch.bfloat16
            if "v" in after:
                np.testing.assert_allclose(state["v"].numpy(), after["v"], rtol=1e-5)
            else:
                np.testing.assert_allclose(state["v_row"].unsqueeze(columns).numpy(), after["R"], rtol=1e-5)
                np.testing.assert_allclose(state["v_col"].unsqueeze(rows).numpy(), after["C"], rtol=1e-5)
            optimizer.zero_grad()
    assert optimizer.state[params[0]]["v_row"].shape == (48,) and optimizer.state[params[0]]["v_col"].shape == (64,)


def test_adafactor_factors_fused_attention_weights_per_head_as_big_visions_separate_kernels():
    """flax keeps q, k and v as three (D, H, Dh) kernels and the output as (H, Dh, D), factored per
    head; PyTorch fuses them into (3·H·Dh, D) and (D, H·Dh). Viewed in the head-split shapes, the
    first step (whose second moment is the gradient's square) is the same, element for element."""
    from openalign.train.optim import BigVisionAdafactor, attention_factoring_shapes

    D, H, Dh = 64, 2, 32
    attention = nn.MultiheadAttention(D, H)
    shapes = attention_factoring_shapes(attention)
    assert shapes[attention.in_proj_weight] == (3, H, Dh, D) and shapes[attention.out_proj.weight] == (D, H, Dh)
    rng = np.random.default_rng(0)
    kernels = [(rng.normal(size=(D, H, Dh)) * rng.uniform(0.1, 3, size=(D, H, Dh))).astype(np.float32)
               for _ in range(3)]  # flax's query, key, value gradients
    out = (rng.normal(size=(H, Dh, D)) * rng.uniform(0.1, 3, size=(H, Dh, D))).astype(np.float32)
    fused = torch.from_numpy(np.stack(kernels)).permute(0, 2, 3, 1).reshape(3 * H * Dh, D)  # row (i·H + h)·Dh + d
    projection = torch.from_numpy(out).permute(2, 0, 1).reshape(D, H * Dh)  # column h·Dh + d
    params = [attention.in_proj_weight, attention.out_proj.weight]
    before = [param.detach().clone() for param in params]
    optimizer = BigVisionAdafactor(params, lr=0.01, shapes=shapes)
    for param, grad in zip(params, (fused, projection)):
        param.grad = grad.clone()
    optimizer.step()
    moved = [(param.detach() - old).numpy() for param, old in zip(params, before)]
    # the reference's step from zero weights (no decay): the move, in flax's layouts
    wants = [big_vision_adafactor_step(np.zeros_like(g), g, {}, 0, 0.01, 0.0)[0] for g in (*kernels, out)]
    np.testing.assert_allclose(moved[0], np.stack(wants[:3]).transpose(0, 2, 3, 1).reshape(3 * H * Dh, D),
                               rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(moved[1], wants[3].transpose(2, 0, 1).reshape(D, H * Dh), rtol=1e-5, atol=1e-8)
    other = nn.Module()  # another module with those names, of another layout, keeps its own shapes
    other.num_heads, other.qkv, other.proj = 2, nn.Linear(D, 3 * D), nn.Linear(D, D)
    assert attention_factoring_shapes(other) == {}
    state = optimizer.state_dict()  # saved with another layout: named, not a broadcast error in the first step
    with pytest.raises(Exception, match=r"laid out as \(3, 2, 32, 64\), not \(192, 64\): it was saved by openalign "
                                        r"before attention weights were factored per head"):
        BigVisionAdafactor(params, lr=0.01).load_state_dict(state)
    model = create_model("clippo-test")  # timm's attention and MAP head: every fused weight is split
    names = {id(p): name for name, p in model.named_parameters()}
    split = {names[id(p)]: shape for p, shape in attention_factoring_shapes(model).items()}
    assert split["encoder.vit.blocks.0.attn.qkv.weight"] == (3, 2, 16, 32)
    assert split["encoder.vit.attn_pool.kv.weight"] == (2, 2, 16, 32)
    assert split["encoder.vit.attn_pool.proj.weight"] == (32, 2, 16)


def test_adafactor_state_round_trips_and_groups_decay_kernels_only():
    from openalign.train.optim import BigVisionAdafactor

    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):  # torch's loading would cast the state to the weights' dtype
        params = [nn.Parameter(torch.randn(40, 36, dtype=dtype)), nn.Parameter(torch.randn(12, dtype=dtype))]
        optimizer = BigVisionAdafactor(params, lr=0.1, weight_decay=0.01)
        grads = [[torch.randn(40, 36, dtype=dtype), torch.randn(12, dtype=dtype)] for _ in range(4)]
        for step_grads in grads[:2]:
            for param, grad in zip(params, step_grads):
                param.grad = grad.clone()
            optimizer.step()
        clones = [nn.Parameter(param.detach().clone()) for param in params]
        clone = BigVisionAdafactor(clones, lr=0.1, weight_decay=0.01)
        clone.load_state_dict(copy.deepcopy(optimizer.state_dict()))
        assert {key: value.dtype for key, value in clone.state[clones[0]].items() if key != "step"} == {
            "v_row": torch.float32, "v_col": torch.float32, "momentum": torch.bfloat16}
        for step_grads in grads[2:]:
            for group, opt in ((params, optimizer), (clones, clone)):
                for param, grad in zip(group, step_grads):
                    param.grad = grad.clone()
                opt.step()
        assert all(torch.equal(param, other) for param, other in zip(params, clones)), dtype
    from openalign.errors import ConfigError
    from openalign.recipe import load_recipe

    with pytest.raises(ConfigError, match=r"'train.eps' is 1e-06, LAMB's and AdamW's kind .* set train.eps=1e-30"):
        load_recipe("demo", ["train.optimizer=adafactor"])  # the demo's eps, 10^24 times big_vision's
    model = create_model("clippo-test")  # big_vision decays */kernel: not biases, norms, pos_embedding, probe, t
    optimizer = build_optimizer(model, "adafactor", 1e-3, 0.1, (0.9, 0.999), 1e-30, torch.device("cpu"))
    assert isinstance(optimizer, BigVisionAdafactor) and optimizer.param_groups[0]["momentum"] == 0.9
    decayed = {name for name, p in model.named_parameters() if any(p is q for q in optimizer.param_groups[0]["params"])}
    assert decayed == {name for name, p in model.named_parameters() if name.endswith(".weight") and p.ndim >= 2}


def test_log_temperature_moves_by_about_lr_per_step_under_lamb():
    """Spec §1.3: tfa LAMB makes τ's step multiplicative; log τ without trust ratio does the same."""
    model = create_model("align-test")
    optimizer = build_optimizer(model, "lamb", 0.01, 1e-5, (0.9, 0.999), 1e-6, torch.device("cpu"))
    before = model.log_temperature.item()
    for _ in range(3):
        optimizer.zero_grad()
        model.log_temperature.grad = torch.tensor(0.5)  # a consistent push towards lower τ
        optimizer.step()
    assert before - model.log_temperature.item() == pytest.approx(0.03, rel=1e-3)


@pytest.mark.parametrize("step, expected", [(0, 0.0), (5, 0.5), (10, 1.0), (55, 0.5), (100, 0.0), (120, 0.0)])
def test_linear_schedule_warms_up_from_zero_and_decays_to_zero(step, expected):
    assert lr_factor(step, "linear", warmup_steps=10, total_steps=100) == pytest.approx(expected)


@pytest.mark.parametrize("step, expected", [(10, 1.0), (55, 0.5), (100, 0.0), (32.5, 0.5 * (1 + math.cos(math.pi / 4)))])
def test_cosine_schedule(step, expected):
    assert lr_factor(step, "cosine", warmup_steps=10, total_steps=100) == pytest.approx(expected)


def test_constant_schedule_after_warmup():
    assert lr_factor(3, "constant", 4, 10) == 0.75 and lr_factor(9, "constant", 4, 10) == 1.0
