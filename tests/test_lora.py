"""LoRA layer, attachment, AdapterStore, AdamW and PEFT files on a tiny in-memory llama."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from clora.config import LoraConfig, OptimConfig
from clora.errors import AdapterMismatchError, ConfigError, ModelNotFoundError
from clora.trainer import (
    AdapterStore,
    LoRALinear,
    SlotRouting,
    adamw_step_,
    attach_lora,
    check_lora_fits,
    clip_grads_,
    export_peft,
    find_targets,
    global_grad_norm,
    import_peft,
    initial_lora_params,
    layer_shapes,
    lora_key,
    peft_config_dict,
    peft_state_dict,
    scheduled_lr,
    swap_in,
    write_back,
)


def small_llama(seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


# ----------------------------------------------------------------------------- layer


def test_lora_linear_zero_b_and_no_slot_equal_base():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    routing = SlotRouting()
    layer = LoRALinear(base, routing)
    x = torch.randn(2, 3, 6)  # (B, T, in)
    expected = base(x)
    assert torch.equal(layer(x), expected)  # nothing routed
    layer.set_slot(0, torch.randn(2, 6), torch.zeros(5, 2), scaling=2.0)
    routing.use_slot(0)
    assert torch.equal(layer(x), expected)  # B = 0
    assert not any(p.requires_grad for p in layer.parameters())


def test_lora_linear_rows_use_their_own_slot_and_rank():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    routing = SlotRouting()
    layer = LoRALinear(base, routing)
    a0, b0 = torch.randn(2, 6), torch.randn(5, 2)
    a1, b1 = torch.randn(4, 6), torch.randn(5, 4)  # another rank
    layer.set_slot(0, a0, b0, scaling=0.5)
    layer.set_slot(1, a1, b1, scaling=2.0)
    x = torch.randn(3, 7, 6)  # (B, T, in)
    routing.use_rows(torch.tensor([1, -1, 0]))
    mixed = layer(x)  # (3, 7, 5)
    torch.testing.assert_close(mixed[0], base(x[0]) + (x[0] @ a1.T @ b1.T) * 2.0)
    torch.testing.assert_close(mixed[1], base(x[1]))
    torch.testing.assert_close(mixed[2], base(x[2]) + (x[2] @ a0.T @ b0.T) * 0.5)


def test_lora_linear_rejects_wrong_shapes():
    layer = LoRALinear(nn.Linear(6, 5), SlotRouting())
    with pytest.raises(ValueError, match="do not fit"):
        layer.set_slot(0, torch.zeros(2, 7), torch.zeros(5, 2), 1.0)
    with pytest.raises(ValueError, match="rank mismatch"):
        layer.set_slot(0, torch.zeros(2, 6), torch.zeros(5, 3), 1.0)


# ----------------------------------------------------------------------------- attach


def test_attach_wraps_targets_idempotently_and_keeps_outputs():
    model = small_llama()
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    routing = SlotRouting()
    layers = attach_lora(model, ("q_proj", "down_proj"), routing)
    assert sorted(layers) == [
        "model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj",
        "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.q_proj",
    ]
    again = attach_lora(model, ("q_proj", "v_proj"), routing)
    assert len(again) == 6 and again["model.layers.0.self_attn.q_proj"] is layers["model.layers.0.self_attn.q_proj"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)
    assert layer_shapes(find_targets(model, ("k_proj",)))["model.layers.0.self_attn.k_proj"] == (32, 16)


def test_unknown_target_module_is_a_clear_error():
    model = small_llama()
    with pytest.raises(AdapterMismatchError, match="'qkv_proj' does not exist in the base model.*q_proj"):
        check_lora_fits(model, LoraConfig(target_modules=("q_proj", "qkv_proj")))
    with pytest.raises(AdapterMismatchError, match="not a linear layer"):
        check_lora_fits(model, LoraConfig(target_modules=("mlp",)))


def test_rank_larger_than_a_layer_is_a_clear_error():
    model = small_llama()
    with pytest.raises(AdapterMismatchError, match="rank 20 is larger than .*k_proj allows \\(32->16, at most 16\\)"):
        check_lora_fits(model, LoraConfig(rank=20, target_modules=("k_proj",)))
    assert check_lora_fits(model, LoraConfig(rank=16, target_modules=("k_proj",)))


# ----------------------------------------------------------------------------- store


SHAPES = {"m.layers.0.q": (6, 5), "m.layers.0.v": (6, 3)}


def test_initial_params_seeded_kaiming_a_and_zero_b():
    lora = LoraConfig(rank=2, init_seed=3)
    first, again = initial_lora_params(SHAPES, lora), initial_lora_params(SHAPES, lora)
    other = initial_lora_params(SHAPES, LoraConfig(rank=2, init_seed=4))
    a = first[lora_key("m.layers.0.q", "A")]
    assert a.shape == (2, 6) and first[lora_key("m.layers.0.q", "B")].shape == (5, 2)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(a, other[lora_key("m.layers.0.q", "A")])
    assert a.abs().max() <= 1 / 6**0.5  # kaiming-uniform(a=sqrt(5)) bound is 1/sqrt(fan_in)
    assert all(not t.any() for k, t in first.items() if k.endswith("lora_B"))


def test_store_starts_at_version_zero_with_empty_state():
    store = AdapterStore.create("t", LoraConfig(rank=2), OptimConfig(), SHAPES)
    assert store.version == 0 and store.grad_normalize is None
    assert store.num_params() == 2 * 6 + 5 * 2 + 2 * 6 + 3 * 2
    assert all(not t.any() for t in (*store.exp_avg.values(), *store.exp_avg_sq.values(), *store.grads.values()))
    assert not store.pinned  # no CUDA on this machine


def test_working_copy_is_independent_until_written_back(device):
    pinned = device.type == "cuda"  # host stores are pinned where CUDA exists: non-blocking swap-in
    store = AdapterStore.create("t", LoraConfig(rank=2), OptimConfig(), SHAPES, pin_memory=pinned)
    assert all(t.is_pinned() == pinned for t in (*store.params.values(), *store.exp_avg.values()))
    before = {k: t.clone() for k, t in store.params.items()}
    work = swap_in(store, device, trainable=True, optim_state=True, grads=True)
    assert all(t.device.type == device.type and t.requires_grad for t in work.params.values())
    assert all(t.device.type == device.type for t in (*work.exp_avg.values(), *work.grads.values()))
    key = lora_key("m.layers.0.q", "B")
    with torch.no_grad():
        work.params[key].add_(1.0)
    work.step = 1
    assert torch.equal(store.params[key], before[key]) and store.version == 0
    write_back(store, work, params=True, optim_state=True, grads=True)
    assert torch.equal(store.params[key], before[key] + 1.0) and store.version == 1
    assert all(t.is_pinned() == pinned and t.device.type == "cpu" for t in store.params.values())


def test_trainer_core_pins_host_stores_where_cuda_exists(device):
    """TrainerCore keeps every store in host memory, pinned when CUDA exists; swap_in returns
    complete device copies (the non-blocking copies are synchronised before it returns)."""
    from clora.trainer import TrainerCore

    core = TrainerCore(small_llama(), device=device, pad_token_id=0)
    store = core.add_tenant("t", LoraConfig(rank=4, alpha=8.0, target_modules=("q_proj", "down_proj")), OptimConfig())
    assert core.pin_memory == store.pinned == torch.cuda.is_available()
    for part in (store.params, store.exp_avg, store.exp_avg_sq, store.grads):
        assert all(t.device.type == "cpu" and t.is_pinned() == store.pinned for t in part.values())
    expected = {k: t.clone() for k, t in store.params.items()}
    work = swap_in(store, core.device, trainable=True, optim_state=True, grads=True)
    for t in store.params.values():
        t.fill_(float("nan"))  # a copy still in flight would now read NaN
    assert all(w.device.type == device.type for w in work.params.values())
    for k, w in work.params.items():
        assert torch.equal(w.detach().cpu(), expected[k]), k


def test_store_rejects_initial_tensors_of_another_rank():
    wrong = initial_lora_params(SHAPES, LoraConfig(rank=3))
    with pytest.raises(AdapterMismatchError, match="expected \\(2, 6\\)"):
        AdapterStore.create("t", LoraConfig(rank=2), OptimConfig(), SHAPES, initial=wrong)


# ----------------------------------------------------------------------------- adam


@pytest.mark.parametrize("weight_decay,grad_clip", [(0.0, 0.0), (0.1, 0.05)])
def test_adamw_equals_torch_optim(weight_decay, grad_clip):
    optim = OptimConfig(lr=1e-2, beta1=0.8, beta2=0.95, eps=1e-7, weight_decay=weight_decay, grad_clip=grad_clip)
    torch.manual_seed(0)
    ref = [nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(5))]
    ours = [p.detach().clone() for p in ref]
    m = [torch.zeros_like(p) for p in ours]
    v = [torch.zeros_like(p) for p in ours]
    torch_opt = torch.optim.AdamW(
        ref, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps, weight_decay=weight_decay
    )
    for step in range(1, 5):
        grads = [torch.randn_like(p) for p in ref]
        for p, g in zip(ref, grads):
            p.grad = g.clone()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(ref, grad_clip)
        torch_opt.step()
        ours_grads = [g.clone() for g in grads]
        if grad_clip > 0:
            assert clip_grads_(ours_grads, grad_clip, global_grad_norm(ours_grads))
        adamw_step_(ours, ours_grads, m, v, step, optim)
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b.detach(), rtol=0, atol=0)


def test_adamw_fused_branch_equals_torch_fused_adamw(monkeypatch):
    """The CUDA branch (fused kernel, step counters on the device) run on the CPU's fused kernel:
    equal to torch.optim.AdamW(fused=True) over several steps with changing lr."""
    import clora.trainer.optimizer as adam

    monkeypatch.setattr(adam, "use_fused", lambda device: True)
    optim = OptimConfig(lr=1e-2, beta1=0.8, beta2=0.95, eps=1e-7, weight_decay=0.1)
    torch.manual_seed(0)
    ref = [nn.Parameter(torch.randn(40, 24)), nn.Parameter(torch.randn(33))]
    ours = [p.detach().clone() for p in ref]
    m, v = [torch.zeros_like(p) for p in ours], [torch.zeros_like(p) for p in ours]
    torch_opt = torch.optim.AdamW(ref, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps,
                                  weight_decay=optim.weight_decay, fused=True)
    for step in range(1, 6):
        lr = optim.lr / step
        grads = [torch.randn_like(p) for p in ref]
        for p, g in zip(ref, grads):
            p.grad = g.clone()
        torch_opt.param_groups[0]["lr"] = lr
        torch_opt.step()
        adam.adamw_step_(ours, [g.clone() for g in grads], m, v, step, optim, lr=lr)
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b.detach(), rtol=0, atol=0)


def test_adamw_on_the_device_equals_torch_optim_adamw(device):
    """On the test device (CUDA: our fused branch against torch.optim.AdamW(fused=True); CPU: the
    foreach path against torch's default), with a cosine schedule setting each step's lr."""
    fused = device.type == "cuda"
    optim = OptimConfig(lr=1e-2, beta2=0.95, eps=1e-7, weight_decay=0.1, lr_schedule="cosine", warmup_steps=2,
                        total_steps=6, min_lr_ratio=0.1)
    torch.manual_seed(0)
    ref = [nn.Parameter(torch.randn(64, 48, device=device)), nn.Parameter(torch.randn(33, device=device))]
    ours = [p.detach().clone() for p in ref]
    m, v = [torch.zeros_like(p) for p in ours], [torch.zeros_like(p) for p in ours]
    torch_opt = torch.optim.AdamW(ref, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps,
                                  weight_decay=optim.weight_decay, fused=fused or None)
    for n in range(6):
        grads = [torch.randn_like(p) for p in ref]
        for p, g in zip(ref, grads):
            p.grad = g.clone()
        lr = scheduled_lr(optim, n)
        torch_opt.param_groups[0]["lr"] = lr
        torch_opt.step()
        adamw_step_(ours, [g.clone() for g in grads], m, v, n + 1, optim, lr=lr)
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b.detach(), rtol=0, atol=0)


def test_scheduled_lr_by_hand():
    """lr 1, warmup 2, total 6, floor 0.1: warmup (n + 1) / 2, then decay over n = 2..6 (p = (n - 2) / 4)."""
    common = dict(lr=1.0, warmup_steps=2, total_steps=6, min_lr_ratio=0.1)
    expected = {
        "constant": [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
        # 0.1 + 0.9 * (1 - p)
        "linear": [0.5, 1.0, 1.0, 0.775, 0.55, 0.325, 0.1, 0.1],
        # 0.1 + 0.45 * (1 + cos(pi p)): cos(pi/4) = 0.70710678
        "cosine": [0.5, 1.0, 1.0, 0.86819805, 0.55, 0.23180195, 0.1, 0.1],
    }
    for kind, values in expected.items():
        optim = OptimConfig(lr_schedule=kind, **common)
        got = [scheduled_lr(optim, n) for n in (0, 1, 2, 3, 4, 5, 6, 9)]  # 9: past total_steps, at the floor
        assert got == pytest.approx(values, abs=1e-8), kind
    assert scheduled_lr(OptimConfig(lr=2e-3), 1000) == 2e-3  # defaults: constant, no warmup
    assert scheduled_lr(OptimConfig(lr=1.0, lr_schedule="linear", total_steps=4), 0) == 1.0  # no warmup: starts at lr
    with pytest.raises(ConfigError, match="optim.total_steps: lr_schedule 'cosine'"):
        scheduled_lr(OptimConfig(lr_schedule="cosine"), 0)


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_adamw_with_schedule_equals_torch_optim_and_lr_schedulers(kind):
    """Our AdamW at scheduled_lr(step) == torch.optim.AdamW driven by torch's own LR schedulers
    (LinearLR warmup, then CosineAnnealingLR / LinearLR decay to the floor)."""
    warmup, total, floor = 2, 7, 0.1
    optim = OptimConfig(lr=1e-2, beta2=0.95, weight_decay=0.1, lr_schedule=kind, warmup_steps=warmup,
                        total_steps=total, min_lr_ratio=floor)
    torch.manual_seed(0)
    ref = [nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(5))]
    ours = [p.detach().clone() for p in ref]
    m, v = [torch.zeros_like(p) for p in ours], [torch.zeros_like(p) for p in ours]
    torch_opt = torch.optim.AdamW(ref, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps,
                                  weight_decay=optim.weight_decay)
    warm = torch.optim.lr_scheduler.LinearLR(torch_opt, start_factor=1 / warmup, total_iters=warmup - 1)
    if kind == "cosine":
        decay = torch.optim.lr_scheduler.CosineAnnealingLR(torch_opt, T_max=total - warmup, eta_min=optim.lr * floor)
    else:
        decay = torch.optim.lr_scheduler.LinearLR(torch_opt, start_factor=1.0, end_factor=floor,
                                                  total_iters=total - warmup)
    torch_sched = torch.optim.lr_scheduler.SequentialLR(torch_opt, [warm, decay], milestones=[warmup])
    lrs = []
    for n in range(total):
        grads = [torch.randn_like(p) for p in ref]
        for p, g in zip(ref, grads):
            p.grad = g.clone()
        torch_lr = torch_opt.param_groups[0]["lr"]
        torch_opt.step()
        torch_sched.step()
        lr = scheduled_lr(optim, n)
        assert lr == pytest.approx(torch_lr, rel=1e-12), n
        adamw_step_(ours, [g.clone() for g in grads], m, v, n + 1, optim, lr=lr)
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b.detach(), rtol=1e-6, atol=1e-9)
        lrs.append(lr)
    assert lrs[0] == optim.lr / 2 and max(lrs) == pytest.approx(optim.lr) and lrs[-1] < optim.lr / 2  # warmup, decay


# ----------------------------------------------------------------------------- peft files


def _trained_store(lora: LoraConfig) -> AdapterStore:
    model = small_llama()
    shapes = layer_shapes(check_lora_fits(model, lora))
    store = AdapterStore.create("t", lora, OptimConfig(), shapes)
    torch.manual_seed(1)
    for t in store.params.values():
        t.add_(torch.randn_like(t) * 0.1)  # B != 0
    return store


def test_peft_export_import_roundtrip(tmp_path):
    lora = LoraConfig(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))
    store = _trained_store(lora)
    export_peft(peft_state_dict(store), peft_config_dict(lora, "/models/tiny-llama"), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (4, 8.0, ["q_proj", "v_proj"])
    back = import_peft(tmp_path, lora, store.shapes, base_model_name="/elsewhere/tiny-llama")
    assert set(back) == set(store.params)
    assert all(torch.equal(back[k], store.params[k]) for k in back)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in peft_state_dict(store)


@pytest.mark.parametrize(
    "tenant_lora,base_name,match",
    [
        (LoraConfig(rank=8, alpha=8.0, target_modules=("q_proj", "v_proj")), "tiny-llama", "rank mismatch: adapter r=4, tenant rank=8"),
        (LoraConfig(rank=4, alpha=8.0, target_modules=("q_proj",)), "tiny-llama", "target modules mismatch"),
        (LoraConfig(rank=4, alpha=16.0, target_modules=("q_proj", "v_proj")), "tiny-llama", "alpha mismatch"),
        (LoraConfig(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj")), "SmolLM2-135M", "base model mismatch"),
    ],
)
def test_peft_import_names_the_mismatch(tmp_path, tenant_lora, base_name, match):
    lora = LoraConfig(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))
    store = _trained_store(lora)
    export_peft(peft_state_dict(store), peft_config_dict(lora, "tiny-llama"), tmp_path)
    shapes = layer_shapes(check_lora_fits(small_llama(), tenant_lora))
    with pytest.raises(AdapterMismatchError, match=match):
        import_peft(tmp_path, tenant_lora, shapes, base_model_name=base_name)


def test_peft_import_checks_tensor_shapes_and_refuses_pickle(tmp_path):
    lora = LoraConfig(rank=4, alpha=8.0, target_modules=("q_proj",))
    store = _trained_store(lora)
    tensors = peft_state_dict(store)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    tensors[key] = torch.zeros(16, 4)  # wrong out_features
    export_peft(tensors, peft_config_dict(lora, None), tmp_path / "bad")
    with pytest.raises(AdapterMismatchError, match="lora_B has shape \\(16, 4\\), expected \\(32, 4\\)"):
        import_peft(tmp_path / "bad", lora, store.shapes, None)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text(json.dumps(peft_config_dict(lora, None)))
    (pickled / "adapter_model.bin").write_bytes(b"not read")
    with pytest.raises(ModelNotFoundError, match="only safetensors"):
        import_peft(pickled, lora, store.shapes, None)
