"""dmp.py: Table 1's parameter counts, exact identity at initialisation, Eq. 3 at every block for
every gate option, what each method trains, the balancing losses, every option, patch files and the
Fig. 5 gate weights."""
import copy
import math

import numpy as np
import pytest
import torch

import baselines
import dmp
import load
from model_dit import DIGITS_MODEL, DiT, DiT_models, get_2d_sincos_pos_embed


def tiny_dit(seed=0, **kwargs):
    """A small DiT with every weight random, so every block (and so every patch) changes the output."""
    torch.manual_seed(seed)
    config = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=2,
                  num_classes=10, class_dropout_prob=0.1)
    model = DiT(**{**config, **kwargs})
    for name, p in model.named_parameters():
        if name != "pos_embed":
            p.data.normal_(0, 0.3)
    return model.eval()


def batch(n=4, seed=1):
    """Latents, timesteps and labels for tiny_dit."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 4, 8, 8, generator=g), torch.randint(0, 1000, (n,), generator=g),
            torch.randint(0, 10, (n,), generator=g))


DMP_OPTIONS = [
    {}, dict(gate="attention"), dict(selection="hard"), dict(selection="hard", top_k=0.5),
    dict(prompt_selection="uniform"), dict(prompt_depth=1), dict(gate_cond="t+c"), dict(block_index="scalar"),
    dict(noisy_gate=True), dict(gate_lr_scale=10.0), dmp.AUTHORS_CODE,
    dict(selection="hard", hard_weights="one"), dict(gate_cond="none"),
]
METHOD_CASES = [("full", {}), ("prompt", {}), ("prompt", dict(time_bands=4)), ("lora", {}),
                ("lora", dict(rank=2, alpha=4)),
                ("lora", dict(rank="dmp")), ("difffit", {}),
                ("difffit", dict(gamma_fraction=1.0, train_labels=True)), ("bitfit", {}),
                ("bitfit", dict(lr_scale=10.0))] + [("dmp", o) for o in DMP_OPTIONS]
CASE_IDS = [f"{m}-{'-'.join(f'{k}={v}' for k, v in o.items()) or 'default'}" for m, o in METHOD_CASES]


@pytest.mark.parametrize("name, paper", [("DiT-B/2", 1.96), ("DiT-L/2", 1.43)])
def test_table1_parameter_overhead(name, paper):
    with torch.device("meta"):
        model = DiT_models[name](input_size=32, num_classes=1, class_dropout_prob=0.0)
    backbone = sum(p.numel() for p in model.parameters())
    groups = dmp.patch(model, "dmp")
    added = sum(p.numel() for g in groups for p in g["params"])
    print(f"{name}: backbone {backbone:,}, DMP {added:,} = {100 * added / backbone:.3f}% (paper {paper}%)")
    assert abs(100 * added / backbone - paper) <= 0.03


@pytest.mark.parametrize("method, options", METHOD_CASES, ids=CASE_IDS)
def test_patched_model_starts_equal_to_the_backbone(method, options):
    model = tiny_dit()
    x, t, y = batch()
    with torch.no_grad():
        before = model(x, t, y)
        dmp.patch(model, method, **options)
        after = model(x, t, y)
        model.train()  # the noisy gate draws noise in training; zero prompts still add nothing
        model.y_embedder.dropout_prob = 0.0
        after_train = model(x, t, y)
    assert torch.equal(before, after) and torch.equal(before, after_train)


# Eq. 3 and its ablations, each worked by hand below: (method, options)
EQ3_CASES = [
    ("dmp", {}),                                             # Eq. 3: softmax(G([t; i])), one-hot i
    ("dmp", dict(block_index="scalar")),                     # the authors' scalar i
    ("dmp", dict(prompt_selection="uniform")),               # Table 4c: G(t), no block index
    ("dmp", dict(gate_cond="t+c")),                          # Table 9: the gate reads t + c
    ("dmp", dict(gate_cond="none")),                         # blind to t: G([i]) = W_i e_i + b
    ("dmp", dict(gate="attention")),                         # Table 4a
    ("dmp", dict(selection="hard", top_k=0.5)),              # Table 4b, the authors' softmax
    ("dmp", dict(selection="hard", top_k=0.5, hard_weights="one")),  # Table 4b, weight 1
    ("dmp", dict(position="prepend", num_prompts=5)),        # Table 4d
    ("dmp", dict(gate="attention", position="prepend", num_prompts=5)),
    ("dmp", dict(prompt_depth=2)),                           # Fig. 4: the first 2 of 4 blocks
    ("prompt", {}),                                          # Eq. 2: naive prompt tuning
]


def softmax(z):
    """softmax over the last axis, in numpy."""
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def eq3_by_hand(mop, x, i, t, y):
    """
    What block i receives, worked in float64 numpy from the gate's parameters and the prompts:
    x_i + g * p_i with g = softmax(W c + b + (block-index columns)) (Eq. 3), its top-k or attention
    variants, or the prompts prepended (Table 4d); x_i itself past the prompted depth (Fig. 4).
    """
    if i >= mop.depth:
        return x.double().numpy()
    params = {k: v.detach().double().numpy() for k, v in mop.named_parameters()}
    x, c = x.double().numpy(), t.double().numpy()
    if mop.gate_cond == "t+c":
        c = c + y.double().numpy()
    if mop.gate_cond == "none":                                    # the gate reads no conditioning
        c = c[:, :0]
    p_i = params["prompts"][i]                                     # (N, D)
    N = p_i.shape[0]
    if mop.gate_type is None:                                      # Eq. 2
        prompt = np.broadcast_to(p_i, (len(x), *p_i.shape))
    elif mop.gate_type == "attention":                             # Table 4a
        q = p_i @ params["w_q.weight"].T                           # (N, D)
        k = c @ params["w_k.weight"].T                             # (B, D)
        g = softmax(k @ q.T / math.sqrt(q.shape[-1]))              # (B, N)
        prompt = g[:, :, None] * (c @ params["w_v.weight"].T)[:, None, :]
    else:
        logits = c @ params["gate.weight"].T + params["gate.bias"]  # (B, N)
        if mop.distinct and mop.block_index == "onehot":
            logits = logits + params["gate_index"][:, i]
        elif mop.distinct:
            logits = logits + i * params["gate_index"][:, 0]
        if mop.selection == "soft":
            g = softmax(logits)
        else:                                                      # Table 4b: the top k of N
            keep = np.argsort(-logits, axis=-1)[:, : max(1, int(0.5 * N))]
            kept = np.take_along_axis(logits, keep, -1)
            g = np.zeros_like(logits)
            weights = softmax(kept) if mop.hard_weights == "softmax" else np.ones_like(kept)
            np.put_along_axis(g, keep, weights, -1)
        prompt = g[:, :, None] * p_i[None]
    if mop.position == "add":
        return x + prompt
    return np.concatenate([prompt, x[:, N if i > 0 else 0:]], axis=1)


@pytest.mark.parametrize("method, options", EQ3_CASES,
                         ids=[f"{m}-{'-'.join(f'{k}={v}' for k, v in o.items()) or 'default'}"
                              for m, o in EQ3_CASES])
def test_every_block_input_is_eq3_worked_by_hand(method, options):
    """
    With random non-zero prompts and gate weights, block_input(x, i, mixture) at every block equals
    Eq. 3 (or the ablation's variant) worked by hand from the gate's parameters, and DiT.forward
    hands every block exactly that: the previous block's output with block i's prompts.
    """
    model = tiny_dit(depth=4)
    dmp.patch(model, method, **options)
    model.eval()  # no gate noise
    mop = model.block_input
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in mop.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (1.0 if p is mop.prompts else 0.3))
    x, t, y = batch()
    t_emb, y_emb = model.t_embedder(t), model.y_embedder(y, False)
    tokens = 16 + (mop.num_prompts if mop.position == "prepend" else 0)
    with torch.no_grad():
        mixture = mop.condition(t_emb, y_emb, t)  # once, as DiT.forward asks it
        for i in range(4):  # block_input itself, called in order as DiT.forward calls it
            h = torch.randn(4, 16 if i == 0 else tokens, 32, generator=g)
            out = mop(h, i, mixture)
            expected = torch.from_numpy(eq3_by_hand(mop, h, i, t_emb, y_emb)).float()
            assert torch.allclose(out, expected, rtol=1e-5, atol=1e-5), i
            if mop.position == "add" and i < mop.depth:
                assert (out - h).abs().max() > 0.1  # every prompted block adds something
        inputs, outputs = [], []
        for block in model.blocks:
            block.register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
            block.register_forward_hook(lambda m, args, out: outputs.append(out))
        model(x, t, y)
        previous = [model.x_embedder(x) + model.pos_embed] + outputs[:-1]
    for i in range(4):
        expected = torch.from_numpy(eq3_by_hand(mop, previous[i], i, t_emb, y_emb)).float()
        assert torch.allclose(inputs[i], expected, rtol=1e-5, atol=1e-5), i


@pytest.mark.parametrize("method, options", METHOD_CASES, ids=CASE_IDS)
def test_gradients_reach_exactly_the_trained_parameters_and_the_backbone_stays_frozen(method, options):
    model = tiny_dit().train()
    groups = dmp.patch(model, method, **options)
    base = copy.deepcopy(model.state_dict())
    trained = {id(p) for g in groups for p in g["params"]}
    opt = torch.optim.AdamW([dict(params=g["params"], lr=1e-2 * g["lr_scale"]) for g in groups], weight_decay=0)
    x, t, y = batch()
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        mixtures = []
        loss = model(x, t, y, mixtures=mixtures).square().mean()
        importance, load = dmp.balancing_losses(mixtures)
        (loss + importance + load).backward()
        for name, p in model.named_parameters():
            assert (p.grad is not None) == (id(p) in trained), name
        opt.step()
    state = model.state_dict()
    changed = [k for k in base if not torch.equal(base[k], state[k])]
    frozen_changed = [k for k in changed if k not in dmp.trainable_state_dict(model)]
    assert not frozen_changed
    # What the method trains moves (DMP's gate once its prompts are non-zero, after the first step).
    assert changed and (method not in ("prompt", "dmp") or "block_input.prompts" in changed)


def test_one_learning_rate_rule_with_explicit_multipliers():
    """The DMP paper's rule, the same lr for every method; each multiplier only when asked for."""
    for method in dmp.METHODS:
        assert {g["lr_scale"] for g in dmp.patch(tiny_dit(), method)} == {1.0}, method
    groups = dmp.patch(tiny_dit(), "dmp", gate_lr_scale=10.0, lr_scale=0.5)
    assert [g["lr_scale"] for g in groups] == [0.5, 5.0]
    assert [g["lr_scale"] for g in dmp.patch(tiny_dit(), "difffit", lr_scale=10.0)] == [10.0]
    assert [g["lr_scale"] for g in dmp.patch(tiny_dit(), "prompt", lr_scale=1 / 16)] == [1 / 16]


def test_lora_at_dmps_parameter_budget():
    """rank='dmp': the rank whose LoRA count is nearest DMP's (digits DiT: 4,096 a rank; 5,200)."""
    model = DiT(input_size=8, in_channels=1, num_classes=1, class_dropout_prob=0.0,
                **DIGITS_MODEL)
    # 4 blocks x 16 prompts x 64 channels + the gate's (64 + 1) x 16 and 16 x 4 block columns
    assert dmp.dmp_parameter_count(model) == 5200
    groups = dmp.patch(model, "lora", rank="dmp")
    # a rank of 4 blocks' qkv, proj, fc1, fc2: 4 * (64 + 192 + 64 + 64 + 64 + 256 + 256 + 64)
    assert sum(p.numel() for p in groups[0]["params"]) == 4096
    assert model.patch_options["rank"] == 1  # the patch file records the rank it resolved to
    with torch.device("meta"):
        b2 = DiT_models["DiT-B/2"](input_size=32, num_classes=1, class_dropout_prob=0.0)
    assert dmp.dmp_parameter_count(b2) == 2_559_232 and baselines.lora_rank_matching(b2, 2_559_232) == 17


def test_balancing_losses_equal_hand_computed_values():
    model = tiny_dit()
    dmp.patch(model, "dmp")
    g = np.array([[[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]],      # sample 0: block 0, block 1
                  [[1 / 3, 1 / 3, 1 / 3], [0.2, 0.4, 0.4]]])  # sample 1
    importance, load = dmp.balancing_losses([dmp.Mixture(torch.tensor(g), torch.zeros(2, 32))])
    expected = []
    for sample in g:  # Eqs. 12-13 by hand
        g_tilde = sample.sum(axis=0)
        mu = g_tilde.mean()
        sigma = ((g_tilde - mu) ** 2).mean()
        expected.append(sigma / (mu ** 2 + 1e-5))
    assert importance.item() == pytest.approx(np.mean(expected), rel=1e-12)
    # Eq. 11 counts the negative weights, (1/L) sum_i sum_n I(g_n^i < 0): one in 2 blocks. (A
    # softmax has none, so on a DMP gate the load is identically zero; see balancing_losses.)
    gates = torch.tensor([[[-0.1, 0.6, 0.5], [0.2, 0.2, 0.6]]])
    assert dmp.balancing_losses([dmp.Mixture(gates, torch.zeros(1, 32))])[1].item() == pytest.approx(0.5)
    assert dmp.balancing_losses([]) == (0, 0)  # no prompts (the other methods): zeros


def test_hard_selection_keeps_exactly_k_and_passes_the_task_gradient_to_the_gate():
    """
    Table 4b as the authors' code: the top k logits, a softmax over them, scattered back. A zero
    gate ties every logit, and exactly k (12 of 16) are still kept; the task loss alone moves the
    gate; the load is smooth.
    """
    model = tiny_dit()
    model.y_embedder.dropout_prob = 0.0
    dmp.patch(model, "dmp", selection="hard", top_k=0.75)
    model.eval()
    mop = model.block_input
    x, t, y = batch()
    mixtures = []
    model(x, t, y, mixtures=mixtures)  # eval: no noise, a zero gate: all 16 logits tie
    gates = mixtures[-1].weights
    assert ((gates > 0).sum(-1) == 12).all()
    assert torch.allclose(gates.sum(-1), torch.ones(4, 3))
    assert torch.equal(gates.unique(), torch.tensor([0.0, 1 / 12]))
    with torch.no_grad():
        mop.prompts.normal_()
        mop.gate.weight.normal_()
    out = model(x, t, y, mixtures=mixtures)
    g = mixtures[-1].weights
    assert ((g > 0).sum(-1) == 12).all()
    logits = mop.gate_logits(model.t_embedder(t))
    kept = logits.topk(12, dim=-1)
    assert torch.allclose(g.gather(-1, kept.indices), torch.softmax(kept.values, -1), atol=1e-6)
    out.square().mean().backward()  # the task loss only: no balancing loss
    assert mop.gate.weight.grad.abs().sum() > 0 and mop.gate_index.grad.abs().sum() > 0
    one = tiny_dit()
    dmp.patch(one, "dmp", selection="hard", hard_weights="one")
    one.eval()
    with torch.no_grad():
        one.block_input.prompts.normal_()
        one.block_input.gate.weight.normal_()
    one(x, t, y, mixtures=mixtures).square().mean().backward()  # the paper's "weight 1": no task gradient
    assert set(mixtures[-1].weights.unique().tolist()) == {0.0, 1.0}
    grad = one.block_input.gate.weight.grad
    assert grad is None or grad.abs().sum() == 0
    model.train()
    model.zero_grad()
    model(x, t, y, mixtures=mixtures)
    _, load = dmp.balancing_losses(mixtures)
    load.backward()
    assert mop.w_noise.grad.abs().sum() > 0 and mop.gate.weight.grad.abs().sum() > 0


def test_hard_selection_load_validates_nothing(monkeypatch):
    """
    Shazeer's smooth load, Phi((clean - threshold) / std), without torch.distributions' check of
    its argument: that check ends in `if not valid.all()`, a host sync every forward on a GPU. The
    load is the standard normal's cdf, 0.5 (1 + erf(z / sqrt 2)), exactly (Normal.cdf's formula).
    """
    checks = []
    monkeypatch.setattr(torch.distributions.Distribution, "_validate_sample",
                        lambda self, value: checks.append(value))
    model = tiny_dit()
    model.y_embedder.dropout_prob = 0.0  # the gate's noise is the forward's one draw
    dmp.patch(model, "dmp", selection="hard", top_k=0.75, noisy_gate=True)
    mop = model.block_input
    with torch.no_grad():
        mop.gate.weight.normal_()
        mop.w_noise.normal_()
    model.train()
    x, t, y = batch()
    c = model.t_embedder(t)
    torch.manual_seed(0)
    mixtures = []
    model(x, t, y, mixtures=mixtures)
    assert checks == [] and mixtures[-1].load.shape == (3, 16)
    torch.manual_seed(0)
    clean = mop.gate_logits(c)
    std = (torch.nn.functional.softplus(c @ mop.w_noise) + 1e-2)[:, None, :]
    noisy = clean + torch.randn_like(clean) * std
    top = noisy.topk(13, dim=-1).values
    threshold = torch.where(noisy > top[..., 12:13], top[..., 12:13], top[..., 11:12])
    z = (clean - threshold) / std
    assert torch.equal(mixtures[-1].load, (0.5 * (1 + torch.erf(z / math.sqrt(2)))).sum(0))


def test_gate_movement_and_the_logged_clean_mixture():
    uniform = torch.full((3, 10, 4), 0.25)
    assert dmp.gate_movement(uniform, time_axis=1) == dict(
        gate_dev_max=0.0, gate_dev_mean=0.0, gate_entropy_min=1.0, gate_entropy_mean=1.0,
        gate_tv_t=0.0)
    w = torch.tensor([[0.4, 0.2, 0.2, 0.2], [0.25, 0.25, 0.25, 0.25]])
    m = dmp.gate_movement(w)
    entropy = -(0.4 * np.log(0.4) + 3 * 0.2 * np.log(0.2)) / np.log(4)
    assert m["gate_dev_max"] == pytest.approx(0.6)
    assert m["gate_dev_mean"] == pytest.approx((0.6 + 3 * 0.2) / 8)
    assert m["gate_entropy_min"] == pytest.approx(entropy)
    assert m["gate_entropy_mean"] == pytest.approx((entropy + 1) / 2)
    assert "gate_tv_t" not in m
    assert dmp.gate_movement(w, time_axis=0)["gate_tv_t"] == pytest.approx(0.15 / 2)
    static = torch.tensor([0.4, 0.2, 0.2, 0.2]).expand(5, 4)  # moved, but the same at every t
    assert dmp.gate_movement(static, time_axis=0)["gate_tv_t"] == 0.0
    model = tiny_dit().train()
    model.y_embedder.dropout_prob = 0.0
    dmp.patch(model, "dmp", noisy_gate=True)
    mixtures = []
    assert dmp.logged_gate_movement(mixtures) == {}
    x, t, y = batch()
    model(x, t, y, mixtures=mixtures)  # training: noisy weights for the loss, the clean (uniform) ones for the log
    gates = mixtures[-1].weights
    assert not torch.allclose(gates, torch.full_like(gates, 1 / 16))
    logged = dmp.logged_gate_movement(mixtures)
    assert logged["gate_dev_max"] == 0.0 == logged["gate_tv_t"]
    prompt = tiny_dit()
    dmp.patch(prompt, "prompt")
    prompt(x, t, y, mixtures=mixtures)
    assert dmp.logged_gate_movement(mixtures) == {}


def test_importance_loss_alone_makes_the_mixture_more_even():
    model = tiny_dit()
    dmp.patch(model, "dmp", prompt_init="random")
    params = [p for n, p in model.block_input.named_parameters() if n != "prompts"]
    opt = torch.optim.Adam(params, lr=1e-2)
    x, t, y = batch(16)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        mixtures = []
        model(x, t, y, mixtures=mixtures)
        importance, _ = dmp.balancing_losses(mixtures)
        importance.backward()
        opt.step()
        losses.append(importance.item())
    print(f"importance loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    assert losses[-1] < 0.2 * losses[0]


def test_prepend_adds_tokens_that_leave_before_the_final_layer():
    model = tiny_dit()
    dmp.patch(model, "dmp", position="prepend", num_prompts=5)
    seen = []
    model.blocks[1].register_forward_hook(lambda m, args, out: seen.append(out.shape))
    x, t, y = batch()
    assert model(x, t, y).shape == (4, 8, 8, 8) and seen == [torch.Size([4, 16 + 5, 32])]
    assert model.block_input.prompts.shape == (3, 5, 32)
    with pytest.raises(ValueError):
        dmp.patch(tiny_dit(), "dmp", num_prompts=5)  # added prompts need one per token


def test_prompt_depth_touches_only_the_first_blocks():
    model = tiny_dit()
    dmp.patch(model, "dmp", prompt_depth=1)
    assert model.block_input.prompts.shape[0] == 1
    model.block_input.prompts.data.normal_()
    inputs = []
    model.blocks[1].register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
    x, t, y = batch()
    model(x, t, y)
    inputs_1 = inputs.pop()
    model.block_input.prompts.data.zero_()
    model(x, t, y)  # with block 0's prompt gone, block 1's input changes: it went through block 0 only
    assert not torch.equal(inputs_1, inputs.pop())


def test_difffit_on_dit_xl2_trains_what_its_paper_defines():
    """
    DiffFit's final setting on DiT-XL/2 (meta device): gamma on the attention, MLP and QKV outputs
    of blocks 0-13 and on the final layer, every bias, the label table frozen (further-training on
    ImageNet's own labels).
    """
    with torch.device("meta"):
        model = DiT_models["DiT-XL/2"](input_size=32)
    groups = dmp.patch(model, "difffit")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    count = sum(p.numel() for g in groups for p in g["params"])
    per_block = ["adaLN_modulation.1.bias", "attn.proj.bias", "attn.qkv.bias", "mlp.fc1.bias",
                 "mlp.fc2.bias"]
    gammas = ["attn.gamma", "attn.qkv.gamma", "mlp.gamma"]
    expected = (["x_embedder.proj.bias", "t_embedder.mlp.0.bias", "t_embedder.mlp.2.bias"]
                + [f"blocks.{i}.{n}" for i in range(28) for n in per_block + gammas * (i < 14)]
                + ["final_layer.linear.bias", "final_layer.linear.gamma",
                   "final_layer.adaLN_modulation.1.bias"])
    assert sorted(names) == sorted(expected)
    biases = 1152 * 3 + 28 * (6912 + 1152 + 3456 + 4608 + 1152) + 32 + 2304
    assert count == biases + 14 * (1152 + 3456 + 1152) + 32 == 570_304
    labels = 102 * 1152  # Food-101's table (101 classes and the null label), DiffFit's Table 4 data
    print(f"DiffFit on DiT-XL/2: {count / 1e6:.2f}M trainable ({100 * count / 675_210_304:.3f}%); "
          f"the paper's 0.83M includes a downstream label table (Food-101's: "
          f"+{labels / 1e6:.2f}M = {(count + labels) / 1e6:.2f}M)")
    with torch.device("meta"):
        labelled = dmp.patch(DiT_models["DiT-XL/2"](input_size=32), "difffit", train_labels=True)
    assert sum(p.numel() for g in labelled for p in g["params"]) == count + 1001 * 1152


def test_difffit_positional_trick_halves_the_grid():
    model = tiny_dit(input_size=16)  # an 8x8 token grid
    dmp.patch(model, "difffit", pos_scale=0.5)
    table = model.pos_embed[0].reshape(8, 8, 32)
    small = torch.from_numpy(get_2d_sincos_pos_embed(32, 4)).float().reshape(4, 4, 32)
    assert torch.allclose(table[::2, ::2], small, atol=1e-6)  # the 512 grid at (2i, 2j) is the 256 grid at (i, j)
    assert "pos_embed" in dmp.trainable_state_dict(model)


@pytest.mark.parametrize("method, options", [("dmp", {}), ("dmp", dict(gate="attention")), ("lora", {}),
                                             ("difffit", dict(pos_scale=0.5)), ("prompt", {}), ("bitfit", {}),
                                             ("prompt", dict(time_bands=4))])
def test_patch_file_round_trip(tmp_path, method, options):
    base = tiny_dit()
    torch.save(base.state_dict(), tmp_path / "base.pt")
    model = copy.deepcopy(base)
    groups = dmp.patch(model, method, **options)
    for g in groups:
        for p in g["params"]:
            p.data.add_(torch.randn_like(p) * 0.1)  # as if trained
    size, backbone = load.save_patch(model, tmp_path / "patch.pt", base=tmp_path / "base.pt")
    assert 0 < size < backbone
    x, t, y = batch()
    restored = load.apply_patch(copy.deepcopy(base), tmp_path / "patch.pt", base=tmp_path / "base.pt")
    with torch.no_grad():
        assert torch.equal(model(x, t, y), restored(x, t, y))
        assert not torch.equal(base(x, t, y), restored(x, t, y))
    saved = torch.load(tmp_path / "patch.pt", weights_only=True)
    assert saved["method"] == method and len(saved["base"]["sha256"]) == 64


def test_a_patch_file_with_the_older_option_names_loads(tmp_path):
    """
    Patch files written before DMPOptions record prompt_depth, prompt_init and prompt_grid as depth,
    init and grid: they load under the new names (dmp.RENAMED), to the same model.
    """
    base = tiny_dit()
    torch.save(base.state_dict(), tmp_path / "base.pt")
    model = copy.deepcopy(base)
    dmp.patch(model, "dmp", prompt_depth=2, prompt_init="random")
    model.patch_options = dict(depth=2, init="random")  # as the older code recorded them
    load.save_patch(model, tmp_path / "old.pt", base=tmp_path / "base.pt")
    restored = load.apply_patch(copy.deepcopy(base), tmp_path / "old.pt", base=tmp_path / "base.pt")
    assert restored.patch_options == dict(prompt_depth=2, prompt_init="random")
    assert restored.block_input.depth == 2
    x, t, y = batch()
    with torch.no_grad():
        assert torch.equal(model(x, t, y), restored(x, t, y))
    unet = tiny_unet()
    dmp.patch(unet, "dmp", grid=4)
    assert unet.block_input.grid == 4 and unet.patch_options == dict(prompt_grid=4)


def test_time_bands_are_prompt_tuning_with_one_prompt_set_a_band():
    """
    time_bands K (the study's positive control): prompt tuning with K prompt sets, a sample's set
    the band t K // 1000 of its timestep. At timesteps in band k the model is exactly plain prompt
    tuning whose prompts are set k; a batch in band k trains set k only; K times prompt tuning's
    parameters; a respaced sampler still hands the model the original timesteps; a gate,
    prepended prompts, the UNet and a K outside 1..1000 are refused.
    """
    K = 4
    model, plain = tiny_dit(), tiny_dit()
    groups, plain_groups = dmp.patch(model, "prompt", time_bands=K), dmp.patch(plain, "prompt")
    prompts = model.block_input.prompts
    assert prompts.shape == (K, 3, 16, 32)
    assert sum(p.numel() for g in groups for p in g["params"]) == K * 3 * 16 * 32 == K * sum(
        p.numel() for g in plain_groups for p in g["params"])
    with torch.no_grad():
        prompts.normal_(0, 0.3, generator=torch.Generator().manual_seed(2))
    x, _, y = batch()
    t = torch.tensor([0, 249, 250, 999])  # bands 0, 0, 1, 3: the edges
    for k in range(K):
        with torch.no_grad():
            plain.block_input.prompts.copy_(prompts[k])
            out, expected = model(x, t, y), plain(x, t, y)
        rows = (t * K // 1000 == k).nonzero().flatten().tolist()
        assert rows == {0: [0, 1], 1: [2], 2: [], 3: [3]}[k]
        assert all(torch.equal(out[j], expected[j]) for j in rows)
        assert all(not torch.equal(out[j], expected[j]) for j in range(4) if j not in rows)
    model.train()
    model(x, torch.tensor([500, 600, 700, 740]), y).square().mean().backward()  # band 2 only
    grad = prompts.grad.flatten(1).abs().sum(1)
    assert grad[2] > 0 and grad[[0, 1, 3]].tolist() == [0, 0, 0]
    from diffusion import create_diffusion
    seen, respaced = [], create_diffusion("ddim25", "linear")

    def record(x, t):
        seen.append(t)
        return x
    respaced._model(record, x, torch.tensor([24]), None)  # its last step: the original t
    assert seen[0].item() == respaced.timestep_map[-1] > 750  # band 3 of 4, not step 24's band 0
    for method, options in [("dmp", {}), ("prompt", dict(position="prepend")),
                            ("prompt", dict(time_bands=0)), ("prompt", dict(time_bands=1001))]:
        with pytest.raises(ValueError, match="time bands|time_bands"):
            dmp.patch(tiny_dit(), method, time_bands=options.pop("time_bands", 2), **options)
    with pytest.raises(ValueError, match="time bands"):
        dmp.patch(tiny_unet(), "prompt", time_bands=2)


def test_a_patch_on_an_official_base_records_its_cached_file(tmp_path, monkeypatch):
    """An official name resolves through the download cache, when the patch is made and later."""
    monkeypatch.setenv("DMP_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    cached = tmp_path / "cache" / "DiT-XL-2-256x256.pt"
    torch.save(tiny_dit().state_dict(), cached)  # as if downloaded once
    monkeypatch.chdir(tmp_path)
    model = load.load_model("DiT-XL-2-256x256.pt", num_heads=2)  # a width no official DiT has
    dmp.patch(model, "dmp")
    with torch.no_grad():
        model.block_input.prompts.normal_(0, 0.3, generator=torch.Generator().manual_seed(2))
    load.save_patch(model, tmp_path / "patch.pt", base="DiT-XL-2-256x256.pt")
    recorded = torch.load(tmp_path / "patch.pt", weights_only=True)["base"]
    assert recorded == dict(name="DiT-XL-2-256x256.pt", path=str(cached),
                            sha256=load.file_sha256(cached))
    x, t, y = batch()
    with torch.no_grad():
        assert torch.equal(load.load_model(tmp_path / "patch.pt")(x, t, y), model(x, t, y))
        torch.save(tiny_dit(seed=5).state_dict(), cached)  # another model under the official name
        with pytest.raises(load.CheckpointError, match="was trained on a base with sha256"):
            load.load_model(tmp_path / "patch.pt")


def test_dmp_patch_of_dit_l2_is_tens_of_megabytes():
    with torch.device("meta"):
        model = DiT_models["DiT-L/2"](num_classes=1, class_dropout_prob=0.0)
    dmp.patch(model, "dmp")
    patch_bytes = sum(v.numel() * 4 for v in dmp.trainable_state_dict(model).values())
    backbone_bytes = sum(p.numel() * 4 for n, p in model.named_parameters() if not n.startswith("block_input"))
    print(f"DiT-L/2: DMP patch {patch_bytes / 2**20:.1f} MiB, backbone {backbone_bytes / 2**30:.2f} GiB")
    assert 10 * 2**20 < patch_bytes < 50 * 2**20 and backbone_bytes > 1.6 * 2**30


@pytest.mark.parametrize("options", [{}, dict(gate="attention"), dict(gate_cond="t+c")])
def test_fig5_gate_weights_are_the_gates_of_a_forward(options):
    """
    gate_weights (what Fig. 5 draws, study_report.draw_gate_heatmap) at timesteps t: the weights the
    gate gives block i in a forward at those timesteps (label 0), for each timestep.
    """
    model = tiny_dit()
    model.y_embedder.dropout_prob = 0.0
    dmp.patch(model, "dmp", prompt_init="random", **options)
    timesteps = range(0, 1000, 100)
    w = dmp.gate_weights(model, timesteps=timesteps)
    assert w.shape == (3, 10, 16) and np.allclose(w.sum(-1), 1.0, atol=1e-6)
    x, mixtures = torch.randn(10, 4, 8, 8), []
    with torch.no_grad():
        model(x, torch.tensor(list(timesteps)), torch.zeros(10, dtype=torch.long), mixtures=mixtures)
    assert np.allclose(w, mixtures[-1].weights.permute(1, 0, 2).numpy(), atol=1e-6)


#################################################################################
#                            The SD UNet (model_unet)                           #
#################################################################################

from model_unet import SD15, SD_TINY, UNetModel  # noqa: E402

UNET_SMALL = dict(SD_TINY, channel_mult=[1], num_res_blocks=1, attention_resolutions=[1])  # 5 blocks, 3 attentions
UNET_CASES = [("full", {}), ("prompt", {}), ("lora", dict(rank=2)), ("difffit", {}), ("bitfit", {}),
              ("dmp", {}), ("dmp", dict(gate_cond="t+c", prompt_grid=4, noisy_gate=True, prompt_depth=3,
                                        block_index="scalar"))]
UNET_IDS = [f"{m}-{'-'.join(f'{k}={v}' for k, v in o.items()) or 'default'}" for m, o in UNET_CASES]


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    model = UNetModel(**UNET_SMALL)
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    return model.eval()


def unet_batch(n=2, seed=1):
    """Latents, timesteps and text context for tiny_unet."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 4, 8, 8, generator=g), torch.randint(0, 1000, (n,), generator=g),
            torch.randn(n, 5, 32, generator=g))


def test_unet_dmp_parameter_overhead_on_sd15():
    """The design note in model_unet.UNetMixtureOfPrompts: +0.98% on SD 1.5 (paper: +0.32%), counted on
    the meta device."""
    with torch.device("meta"):
        model = UNetModel(**SD15)
    base = sum(p.numel() for p in model.parameters())
    groups = dmp.patch(model, "dmp", gate_cond="t+c")
    counts = {g["name"]: sum(p.numel() for p in g["params"]) for g in groups}
    assert counts == dict(prompts=256 * sum(c for c, _ in model.block_shapes), gate=(1280 + 768 + 25) * 256 + 256)
    assert counts == dict(prompts=7_865_344, gate=530_944) and base == 859_520_964  # +0.98%
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == sum(counts.values())


@pytest.mark.parametrize("method,options", UNET_CASES, ids=UNET_IDS)
def test_unet_methods_start_equal_train_only_their_parameters(method, options, one_thread):
    model = tiny_unet()
    x, t, context = unet_batch()
    with torch.no_grad():
        ref = model(x, t, context)
    before = copy.deepcopy(model.state_dict())
    groups = dmp.patch(model, method, **options)
    with torch.no_grad():
        assert torch.equal(model(x, t, context), ref)  # zero prompts, zero LoRA B, gamma 1: the backbone exactly
    trained = {id(p) for g in groups for p in g["params"]}
    assert trained == {id(p) for p in model.parameters() if p.requires_grad} and trained
    model.train()
    with torch.no_grad():  # move every trained tensor off its initial value, then check the gradient reaches them
        for g in groups:
            for p in g["params"]:
                p.add_(torch.randn_like(p))
    out = model(x, t, context)
    assert (out - ref).abs().max() > 1e-4
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for g in groups for p in g["params"])
    assert all(p.grad is None for p in model.parameters() if id(p) not in trained)
    state = model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in before.items() if k in state and not any(
        id(p) in trained for n, p in model.named_parameters() if n == k))


def test_unet_dmp_prompts_follow_eq3_and_the_patch_file_round_trips(tmp_path, one_thread):
    model = tiny_unet()
    dmp.patch(model, "dmp", prompt_grid=4, gate_cond="t+c")
    mop = model.block_input
    with torch.no_grad():
        for p in mop.prompts:
            p.normal_()
        mop.gate.weight.normal_()
    x, t, context = unet_batch()
    h = torch.zeros(2, 4, 8, 8)
    emb = torch.randn(2, 128)
    out = mop(h, 0, mop.condition(emb, context, t)) - h
    c = torch.cat([emb, context.mean(1)], -1)
    g = torch.softmax(mop.gate(c) + mop.gate_index[:, 0], -1)                     # Eq. 3 at block 0, by hand
    by_hand = (g[:, :, None] * mop.prompts[0][None]).reshape(2, 4, 4, 4).permute(0, 3, 1, 2)
    assert torch.allclose(out, by_hand.repeat_interleave(2, 2).repeat_interleave(2, 3), atol=1e-6)
    with torch.no_grad():
        ref = model(x, t, context)
    load.save_patch(model, tmp_path / "patch.pt")
    fresh = load.apply_patch(tiny_unet(), tmp_path / "patch.pt")
    with torch.no_grad():
        assert torch.equal(fresh(x, t, context), ref)
    with pytest.raises(ValueError, match="linear gate"):
        dmp.patch(tiny_unet(), "dmp", gate="attention")


@pytest.mark.parametrize("method, options", METHOD_CASES, ids=CASE_IDS)
def test_every_trained_parameter_gets_a_gradient_from_one_step(method, options):
    """DDP's requirement (a parameter with no gradient stops it at the second step), on CPU."""
    model = tiny_dit().train()
    groups = dmp.patch(model, method, **options)
    x, t, y, mixtures = *batch(), []
    loss = model(x, t, y, mixtures=mixtures).square().mean() + sum(dmp.balancing_losses(mixtures))
    loss.backward()
    names = {id(p): n for n, p in model.named_parameters()}
    assert [names[id(p)] for g in groups for p in g["params"] if p.grad is None] == []


@pytest.mark.parametrize("options", [dict(gate="attention", noisy_gate=True),
                                     dict(gate="attention", selection="hard"),
                                     dict(selection="hard", hard_weights="one", top_k=1.0)])
def test_combinations_that_would_train_nothing_are_refused(options):
    with pytest.raises(ValueError):
        dmp.patch(tiny_dit(), "dmp", **options)


def test_gate_weights_are_fp32_under_autocast():
    """CUDA autocast makes a softmax fp32 and CPU's keeps bf16: the gate runs in fp32 on both."""
    model = tiny_dit().train()
    dmp.patch(model, "dmp", selection="hard")
    x, t, y, mixtures = *batch(), []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x, t, y, mixtures=mixtures)
    assert mixtures[-1].weights.dtype == torch.float32


def test_unet_prompt_term_is_added_in_fp32_under_bf16_autocast():
    """
    A 1e-4 prompt term on unit-scale bf16 activations: what the block reads differs from its input
    by the term to one fp32 rounding of the sum (2^-24 of it), as without autocast; added in bf16
    it would round to a multiple of 2^-8 (nothing, or 40x the term).
    """
    from model_unet import SD_TINY, UNetModel
    torch.manual_seed(0)
    unet = UNetModel(**SD_TINY)
    dmp.patch(unet, "dmp", prompt_grid=4)
    mop = unet.block_input
    for p in mop.prompts:
        p.data.fill_(1e-4 * mop.num_prompts)  # g = 1/N at the zero gate: a term of 1e-4
    c_in = unet.block_shapes[3][0]
    x = torch.randn(2, c_in, 4, 4).bfloat16()
    emb, context = torch.randn(2, unet.time_embed[-1].out_features), torch.randn(2, 5, 32)
    t = torch.tensor([1, 500])
    ref = mop(x.float(), 3, mop.condition(emb, context, t)).double() - x.double()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mop(x, 3, mop.condition(emb, context, t))  # the gate's weights, for every block
    assert out.dtype == torch.float32
    effect = out.double() - x.double()
    bound = 2.0 ** -24 * (x.double().abs().max() + 1e-4)
    assert (effect - ref).abs().max() <= bound and ref.abs().min() > 0.9e-4


def test_the_t_blind_gate_mixes_alike_at_every_timestep():
    """
    gate_cond 'none' (the study's control for mixing by timestep): the gate reads only its bias and
    the block index, so with the same random parameters its weights are one mixture per block at
    every t, where the default gate's vary with t; it trains (bias and block-index columns) and
    keeps no parameter of the conditioning's width.
    """
    mixtures = {}
    for cond in ("t", "none"):
        model = tiny_dit(depth=4)
        groups = dmp.patch(model, "dmp", gate_cond=cond)
        mop = model.block_input
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for p in mop.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        mixtures[cond] = dmp.gate_weights(model, timesteps=[0, 250, 999])  # (blocks, t, prompts)
        trained = sum(p.numel() for grp in groups for p in grp["params"])
        if cond == "none":
            assert mop.gate.weight.numel() == 0 and trained == 4 * 16 * 32 + 16 + 16 * 4
    assert np.abs(mixtures["t"][:, 0] - mixtures["t"][:, 2]).max() > 0.01
    assert np.array_equal(mixtures["none"][:, 0], mixtures["none"][:, 2])
    assert np.abs(mixtures["none"][0, 0] - mixtures["none"][1, 0]).max() > 0.01  # per block
    unet = tiny_unet()
    dmp.patch(unet, "dmp", prompt_grid=4, gate_cond="none")
    with torch.no_grad():
        for p in unet.block_input.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        x, _, context = unet_batch()
        mixtures = []
        unet(x[:1].expand(2, -1, -1, -1), torch.tensor([0, 999]), context[:1].expand(2, -1, -1),
             mixtures=mixtures)
    weights = mixtures[-1].weights  # (B, L, N): the two timesteps' mixtures at every block
    assert torch.equal(weights[0], weights[1]) and (weights[0] - 1 / 16).abs().max() > 0.01
    with pytest.raises(ValueError, match="cannot be blind to t"):
        dmp.patch(tiny_dit(), "dmp", gate="attention", gate_cond="none")
