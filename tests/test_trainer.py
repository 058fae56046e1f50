"""TrainerCore on the tiny llama: isolation, equality with torch/peft, atomic steps, accumulation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from clora.config import LoraConfig, LossConfig, OptimConfig, TrainerConfig
from clora.errors import AdapterMismatchError, ConfigError, DuplicateTenantError, NonFiniteError, UnknownTenantError
from clora.trainer import TrainerCore
from clora.trainer.base_logprobs import base_logprobs
from clora.rl import collate, kl_k1_mean, loss_denominator, loss_numerator, token_logprobs, token_loss
from clora.testing import assert_same_state, make_data, store_state, with_nonfinite

LORA = LoraConfig(rank=4, alpha=8.0, init_seed=7)
OPTIM = OptimConfig(lr=5e-3, weight_decay=0.01, grad_clip=0.5)


@pytest.fixture(scope="module")
def core(tiny_model_dir: Path) -> TrainerCore:
    return TrainerCore.from_model_dir(tiny_model_dir, TrainerConfig(micro_batch_size=4))


@pytest.fixture(scope="module")
def device_core(tiny_model_dir: Path, device: torch.device) -> TrainerCore:
    """The tiny model on each test device (conftest's ``device``: these tests are the GPU check's)."""
    return TrainerCore.from_model_dir(tiny_model_dir, TrainerConfig(micro_batch_size=4, device=str(device)))


def test_version_zero_equals_the_base_model(core, tiny_model_dir):
    core.add_tenant("v0", LORA, OPTIM)
    data = make_data(3, seed=1)
    ours = core.compute_logprobs("v0", data)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    for d, row in zip(data, ours):
        with torch.no_grad():
            ids = torch.tensor([d.tokens])
            expected = token_logprobs(base(input_ids=ids).logits, ids)[0]
        assert len(row) == len(d.tokens)
        torch.testing.assert_close(torch.tensor(row), expected, rtol=0, atol=1e-5)


def test_training_one_tenant_leaves_another_bit_identical(device_core):
    device_core.add_tenant("iso-a", LORA, OPTIM)
    device_core.add_tenant("iso-b", LORA, OPTIM)
    device_core.train_step("iso-b", make_data(3, seed=2), LossConfig())  # B has real optimizer state
    before = store_state(device_core.store("iso-b"))
    a_before = store_state(device_core.store("iso-a"))
    for step in range(2):
        device_core.train_step("iso-a", make_data(5, seed=10 + step), LossConfig(kind="importance_sampling"))
    device_core.forward_backward("iso-a", make_data(2, seed=20), LossConfig())
    assert_same_state(store_state(device_core.store("iso-b")), before)
    assert device_core.store("iso-a").version == 2
    assert any(not torch.equal(t, a_before[f"params:{k}"]) for k, t in device_core.store("iso-a").params.items())


def _peft_model(base_dir: Path, adapter_dir: Path, trainable: bool) -> PeftModel:
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=trainable)


def _peft_lora_params(model: PeftModel) -> dict[str, torch.Tensor]:
    """peft parameter names -> tensors, renamed to the PEFT file names (no adapter name)."""
    return {
        n.replace(".default", ""): p for n, p in model.named_parameters() if "lora_" in n
    }


@pytest.mark.parametrize(
    "loss_cfg",
    [
        LossConfig(kind="ppo", kl_coef=0.1),  # k3 KL to the base model in the loss
        LossConfig(kind="cispo", clip_low=1.0, clip_high=0.5, kl_coef=0.2, kl_estimator="k1",
                   normalize="constant", normalize_constant=24.0),  # k1 in the advantages, Dr. GRPO normalisation
    ],
    ids=["ppo-k3", "cispo-k1-constant"],
)
def test_swap_path_equals_torch_adamw_on_a_peft_model(core, tiny_model_dir, tmp_path, loss_cfg):
    """Two steps through the store/swap path == peft model + the same loss (base log-probs from peft's
    disable_adapter, our model's come from the same weights routed off) + torch AdamW + clip."""
    tenant = f"vs-torch-{loss_cfg.kind}"
    core.add_tenant(tenant, LORA, OPTIM)
    core.export_adapter(tenant, tmp_path / "v0")
    ref = _peft_model(tiny_model_dir, tmp_path / "v0", trainable=True)
    ref_params = _peft_lora_params(ref)
    # in the store's order: the global grad norm then sums in the same order, so clipping agrees to
    # the bit (another order changes its last bit, and Adam's first update of A, whose gradient is
    # near eps, turns that into ~1e-5 differences of the weights)
    ordered = [ref_params[k] for k in core.snapshot(tenant).tensors]
    opt = torch.optim.AdamW(
        ordered, lr=OPTIM.lr, betas=(OPTIM.beta1, OPTIM.beta2), eps=OPTIM.eps, weight_decay=OPTIM.weight_decay,
    )
    for step in range(2):
        data = make_data(4, seed=30 + step)  # one micro-batch of 4
        batch = collate(data)
        with torch.no_grad(), ref.disable_adapter():
            base = token_logprobs(ref(input_ids=batch.tokens, attention_mask=batch.attention_mask).logits, batch.tokens)
        k1_sum, k1_weight = kl_k1_mean(batch.sampler_logprobs, base, batch.loss_mask)
        logits = ref(input_ids=batch.tokens, attention_mask=batch.attention_mask).logits
        logp = token_logprobs(logits, batch.tokens)
        parts = token_loss(loss_cfg, logp, batch.sampler_logprobs, batch.advantages, batch.loss_mask, base,
                           k1_sum / k1_weight)
        denominator = loss_denominator(batch.loss_mask, loss_cfg.normalize, loss_cfg.normalize_constant)
        loss = loss_numerator(parts.per_token, batch.loss_mask, loss_cfg.normalize) / denominator
        loss.backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(ordered, OPTIM.grad_clip)
        opt.step()
        opt.zero_grad()
        metrics = core.train_step(tenant, data, loss_cfg)
        assert metrics["loss"] == pytest.approx(loss.item(), rel=1e-5, abs=1e-6)
        assert metrics["grad_norm"] == pytest.approx(ref_norm.item(), rel=1e-5)
        expected_kl = float((parts.kl.detach() * batch.loss_mask).sum() / batch.loss_mask.sum())
        assert metrics["kl"] == pytest.approx(expected_kl, rel=1e-4, abs=1e-7)
    assert metrics["kl"] != 0.0  # after one step the adapter differs from the base model
    ours = core.snapshot(tenant).tensors
    assert ours.keys() == ref_params.keys()
    max_diff = max((ours[k] - ref_params[k].detach()).abs().max().item() for k in ours)
    assert max_diff < 1e-6, max_diff
    assert any(ours[k].abs().sum() > 0 for k in ours if "lora_B" in k)  # B moved away from zero


def test_trainer_logprobs_equal_peft_model_on_the_exported_adapter(core, tiny_model_dir, tmp_path):
    core.add_tenant("vs-peft", LORA, OptimConfig(lr=2e-2))
    for step in range(3):
        core.train_step("vs-peft", make_data(4, seed=40 + step), LossConfig(kind="importance_sampling"))
    core.export_adapter("vs-peft", tmp_path / "v3")
    peft_model = _peft_model(tiny_model_dir, tmp_path / "v3", trainable=False).eval()
    data = make_data(5, seed=50)
    ours = core.compute_logprobs("vs-peft", data)
    base_rows = []
    for d, row in zip(data, ours):
        ids = torch.tensor([d.tokens])
        with torch.no_grad():
            expected = token_logprobs(peft_model(input_ids=ids).logits, ids)[0]
            with peft_model.disable_adapter():
                base_rows.append(token_logprobs(peft_model(input_ids=ids).logits, ids)[0])
        torch.testing.assert_close(torch.tensor(row), expected, rtol=0, atol=1e-5)
    # the adapter really changes the policy, so the comparison above is not base vs base
    assert max((torch.tensor(r) - b).abs().max().item() for r, b in zip(ours, base_rows)) > 1e-3


def test_target_and_rank_mismatch_are_clear_errors(core, tmp_path):
    with pytest.raises(AdapterMismatchError, match="'qkv' does not exist in the base model"):
        core.add_tenant("bad-target", LoraConfig(target_modules=("q_proj", "qkv")), OPTIM)
    with pytest.raises(AdapterMismatchError, match="rank 512 is larger than"):
        core.add_tenant("bad-rank", LoraConfig(rank=512), OPTIM)
    assert "bad-target" not in core.stores and "bad-rank" not in core.stores
    core.add_tenant("src", LORA, OPTIM)
    core.train_step("src", make_data(3, seed=60), LossConfig())
    core.export_adapter("src", tmp_path / "src")
    with pytest.raises(AdapterMismatchError, match="rank mismatch: adapter r=4, tenant rank=8"):
        core.add_tenant("wrong-rank", LoraConfig(rank=8, alpha=8.0), OPTIM, init_from=tmp_path / "src")
    with pytest.raises(AdapterMismatchError, match="target modules mismatch"):
        core.add_tenant("wrong-targets", LoraConfig(rank=4, alpha=8.0, target_modules=("q_proj",)), OPTIM,
                        init_from=tmp_path / "src")
    copy = core.add_tenant("copy", LORA, OPTIM, init_from=tmp_path / "src")
    assert copy.version == 0
    data = make_data(2, seed=61)
    assert core.compute_logprobs("copy", data) == core.compute_logprobs("src", data)
    with pytest.raises(DuplicateTenantError):
        core.add_tenant("copy", LORA, OPTIM)
    with pytest.raises(UnknownTenantError, match="'nobody' is not registered"):
        core.train_step("nobody", data, LossConfig())


@pytest.mark.parametrize("how", ["nan_advantage", "inf_sampler_logprob"])
def test_non_finite_step_is_rejected_and_changes_nothing(device_core, how):
    tenant = f"nan-{how}"
    device_core.add_tenant(tenant, LORA, OPTIM)
    device_core.train_step(tenant, make_data(3, seed=70), LossConfig())
    before = store_state(device_core.store(tenant))
    bad = with_nonfinite(make_data(6, seed=71), how)  # the poison sits in the second micro-batch
    with pytest.raises(NonFiniteError, match=f"tenant '{tenant}'.*rejected, adapter stays at version 1"):
        device_core.train_step(tenant, bad, LossConfig())
    assert_same_state(store_state(device_core.store(tenant)), before)
    with pytest.raises(NonFiniteError):
        device_core.forward_backward(tenant, bad, LossConfig())
    assert_same_state(store_state(device_core.store(tenant)), before)
    assert device_core.train_step(tenant, make_data(3, seed=72), LossConfig())["version"] == 2.0


# FB(d1) + FB(d2) vs FB(d1 + d2) put the rows in different micro-batches, so the gradient sums run
# in a different order. Measured max |diff| / max |g|: up to 2.1e-6 on CPU; 1.00e-5 to 1.13e-5 on an
# H200 (2026-11-29, torch 2.11 + CUDA 13; 1 element of 1024 in a (256, 4) lora_B, 1.0e-7 to 1.6e-7
# absolute), where cuBLAS picks its reduction order by GEMM shape. CUDA gets 5e-5 (4x headroom); a
# wrongly weighted accumulation (d2's gradient scaled by 1.01, tried once) was off by 7.8e-3 of max |g|.
GRAD_ATOL_PER_MAX = {"cpu": 1e-5, "cuda": 5e-5}


@pytest.mark.parametrize("normalize", ["tokens", "sequences", "constant"])
def test_forward_backward_twice_then_optim_equals_one_train_step(device_core, device, normalize):
    """Accumulation is a mean weighted by the normalisation denominator (trained tokens, sequences,
    or sequences * constant), so FB(d1) + FB(d2) + OptimStep == TrainStep(d1 + d2) for each."""
    loss_cfg = LossConfig(kind="ppo", normalize=normalize, normalize_constant=32.0 if normalize == "constant" else None)
    optim = OptimConfig(lr=5e-3, eps=1e-6, grad_clip=0.5)  # eps bounds Adam's amplification of ~0 grads
    d1, d2 = make_data(3, seed=80), make_data(5, seed=81, max_len=60)
    split, joint, step_all = f"split-{normalize}", f"joint-{normalize}", f"step-{normalize}"
    for tenant in (split, joint, step_all):
        device_core.add_tenant(tenant, LORA, optim)
    device_core.forward_backward(split, d1, loss_cfg)
    fb2 = device_core.forward_backward(split, d2, loss_cfg)
    device_core.forward_backward(joint, d1 + d2, loss_cfg)
    assert fb2["version"] == 0.0 and device_core.store(split).grad_weight == device_core.store(joint).grad_weight > 0
    for k, g in device_core.store(joint).grads.items():  # the accumulated gradients agree to float rounding
        atol = GRAD_ATOL_PER_MAX[device.type] * g.abs().max().item()
        torch.testing.assert_close(device_core.store(split).grads[k], g, rtol=0, atol=atol)
    opt = device_core.optim_step(split)
    step = device_core.train_step(step_all, d1 + d2, loss_cfg)
    assert opt["version"] == step["version"] == 1.0
    assert opt["grad_norm"] == pytest.approx(step["grad_norm"], rel=1e-5)
    a, b = device_core.store(split), device_core.store(step_all)
    for k in a.params:
        torch.testing.assert_close(a.params[k], b.params[k], rtol=0, atol=optim.lr * 1e-2)
    assert all(not g.any() for g in a.grads.values()) and a.grad_normalize is None
    # the step did something: B left zero (A gets no gradient while B = 0)
    assert all(a.params[k].any() for k in a.params if k.endswith("lora_B"))


def test_accumulation_rules(device_core):
    device_core.add_tenant("acc", LORA, OPTIM)
    with pytest.raises(ConfigError, match="OptimStep without a ForwardBackward since version 0"):
        device_core.optim_step("acc")
    device_core.forward_backward("acc", make_data(2, seed=90), LossConfig(normalize="tokens"))
    with pytest.raises(ConfigError, match="cannot be mixed with normalize='sequences'"):
        device_core.forward_backward("acc", make_data(2, seed=91), LossConfig(normalize="sequences"))
    with pytest.raises(ConfigError, match="tenant 'acc': loss.normalize_constant: normalize='constant' needs it"):
        device_core.train_step("acc", make_data(2, seed=91), LossConfig(normalize="constant"))


def test_step_metrics_have_the_documented_keys(device_core):
    device_core.add_tenant("metrics", LORA, OPTIM)
    values = device_core.train_step("metrics", make_data(6, seed=95), LossConfig(kind="ppo", kl_coef=0.05))
    for key in ("loss", "grad_norm", "clip_frac", "kl", "kl_sampler", "entropy", "tokens", "lr", "version",
                "time/swap_in", "time/fwd_bwd", "time/base_fwd", "time/optim", "time/swap_out"):
        assert key in values, key
    assert values["tokens"] == sum(sum(d.loss_mask) for d in make_data(6, seed=95))
    assert values["kl"] >= 0 and values["kl_sampler"] >= 0 and 0 <= values["clip_frac"] <= 1 and values["entropy"] > 0
    plain = device_core.train_step("metrics", make_data(6, seed=96), LossConfig(kind="ppo"))
    assert "kl" not in plain and "time/base_fwd" not in plain and "kl_sampler" in plain  # no penalty, no base pass


# The base pass on the test device vs the fp32 reference model on CPU: up to 1.9e-6 apart on CPU
# (log-probs up to 14 in size). On an H200 (2026-11-29) one log-prob of 38 was 2.3e-5 off a value near
# -10 (2.3e-6 relative: fp32 rounding of other kernels), so CUDA adds rtol 1e-5 (~1.5e-4 allowed at 14).
# Base log-probs scaled by 1.0001 (tried once) were 1.3e-3 off; the adapter, which a routing bug would
# leak into the base pass, moves log-probs by 1.1 to 5.2 here.
BASE_LOGPROB_TOL = {"cpu": {"rtol": 0.0, "atol": 1e-5}, "cuda": {"rtol": 1e-5, "atol": 1e-5}}


def test_base_forward_runs_only_with_a_kl_penalty_and_is_the_base_model(device_core, device, tiny_model_dir):
    """kl_coef > 0 costs one extra trunk forward per micro-batch, with the adapter routed off (the base
    model's log-probs at the trained positions, though the adapter is trained); kl_coef = 0 costs none.
    (The data share no prefix, so the shared-prefix path runs one trunk forward per micro-batch too.)"""
    device_core.add_tenant("kl-base", LORA, OptimConfig(lr=2e-2))
    forwards = []
    hook = device_core.model.base_model.register_forward_hook(lambda *_: forwards.append(1))
    try:
        data = make_data(6, seed=150)  # micro-batches of 4: two of them
        device_core.train_step("kl-base", data, LossConfig(kind="importance_sampling"))
        assert len(forwards) == 2
        forwards.clear()
        device_core.train_step("kl-base", data, LossConfig(kind="importance_sampling", kl_coef=0.1))
        assert len(forwards) == 4
    finally:
        hook.remove()
    assert device_core.routing.active is None and device_core.routing.row_slots is None  # nothing left routed
    reference = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    rows = base_logprobs(device_core, data).rows
    trained = device_core.compute_logprobs("kl-base", data)
    for d, row, adapted in zip(data, rows, trained, strict=True):
        ids = torch.tensor([d.tokens])
        with torch.no_grad():
            expected = token_logprobs(reference(input_ids=ids).logits, ids)[0]
        trained_at = torch.tensor(d.loss_mask) != 0  # the positions the KL terms read
        torch.testing.assert_close(row.cpu()[trained_at], expected[trained_at], **BASE_LOGPROB_TOL[device.type])
        assert (torch.tensor(adapted) - expected).abs().max() > 1e-4  # the adapter does change the policy


def test_empty_training_call_is_rejected(core):
    core.add_tenant("empty", LORA, OPTIM)
    with pytest.raises(ConfigError, match="at least one datum"):
        core.train_step("empty", [], LossConfig())
    assert core.store("empty").version == 0


def test_import_adapter_replaces_weights_as_a_new_version(core, tmp_path):
    core.add_tenant("imp-src", LORA, OPTIM)
    for step in range(2):
        core.train_step("imp-src", make_data(3, seed=110 + step), LossConfig())
    core.export_adapter("imp-src", tmp_path / "src")
    core.add_tenant("imp-dst", LORA, OPTIM)
    core.train_step("imp-dst", make_data(3, seed=120), LossConfig())
    core.forward_backward("imp-dst", make_data(2, seed=121), LossConfig())  # pending gradient
    assert core.import_adapter("imp-dst", tmp_path / "src") == 2  # version 1 -> 2: a new version to publish
    dst = core.store("imp-dst")
    assert dst.adam_step == 0 and dst.grad_normalize is None
    assert all(not t.any() for t in (*dst.exp_avg.values(), *dst.exp_avg_sq.values(), *dst.grads.values()))
    data = make_data(2, seed=122)
    assert core.compute_logprobs("imp-dst", data) == core.compute_logprobs("imp-src", data)
    # the first step after the reset uses Adam's bias correction of step 1 again
    assert core.train_step("imp-dst", data, LossConfig())["version"] == 3.0 and dst.adam_step == 1
    before = store_state(dst)
    core.add_tenant("imp-r8", LoraConfig(rank=8, alpha=8.0), OPTIM)
    core.export_adapter("imp-r8", tmp_path / "r8")
    with pytest.raises(AdapterMismatchError, match="rank mismatch: adapter r=8, tenant rank=4"):
        core.import_adapter("imp-dst", tmp_path / "r8")
    assert_same_state(store_state(dst), before)


def test_a_store_trained_on_the_device_survives_a_checkpoint_round_trip(device_core, tiny_model_dir, tmp_path):
    """Train on the device (with a gradient still accumulated), checkpoint, restore into a fresh
    tenant: the same state bit for bit, the same policy, and the next step continues identically."""
    import random as stdlib_random

    from clora.checkpoint.format import (
        TenantProgress,
        base_model_identity,
        read_checkpoint,
        rng_state,
        state_digest,
        write_checkpoint,
    )

    core = device_core
    for tenant in ("ck-src", "ck-dst"):
        core.add_tenant(tenant, LORA, OPTIM)
    for step in range(2):
        core.train_step("ck-src", make_data(4, seed=130 + step), LossConfig())
    core.forward_backward("ck-src", make_data(2, seed=132), LossConfig())  # grads are part of the state
    state = core.store("ck-src").export_state()
    progress = TenantProgress(step=2, rng=rng_state(stdlib_random.Random(0)), accuracy_start=0.0, started_at=0.0,
                              tokens_sampled=0, records=[])
    write_checkpoint(tmp_path / "ck", state, progress, base_model_identity(tiny_model_dir))
    restored = read_checkpoint(tmp_path / "ck").state
    assert core.store("ck-dst").load_state(restored) == 2
    src, dst = core.store("ck-src"), core.store("ck-dst")
    assert_same_state(store_state(dst), store_state(src))
    assert state_digest(dst.export_state()) == state_digest(state)
    assert dst.pinned == src.pinned == core.pin_memory  # load_state writes into the store's own host memory
    data = make_data(3, seed=133)
    assert core.compute_logprobs("ck-dst", data) == core.compute_logprobs("ck-src", data)
    after = [core.train_step(t, make_data(4, seed=134), LossConfig()) for t in ("ck-src", "ck-dst")]
    assert after[0]["version"] == after[1]["version"] == 3.0
    # CUDA backward kernels may use atomics; a state lost in the round trip would be off by ~lr (5e-3)
    tol = 1e-5 if device_core.device.type == "cuda" else 0.0
    theirs = store_state(dst)
    for k, t in store_state(src).items():
        if isinstance(t, torch.Tensor):
            torch.testing.assert_close(theirs[k], t, rtol=0, atol=tol, msg=k)
        else:
            assert theirs[k] == t, k


def test_each_tenant_steps_at_its_own_scheduled_lr(device_core):
    """The LR of a step comes from the tenant's own schedule and its own step count, on both paths
    (TrainStep; ForwardBackward + OptimStep), and is what the step applies (lr 0 moves nothing)."""
    device_core.add_tenant("sched-lin", LORA, OptimConfig(lr=4e-3, lr_schedule="linear", warmup_steps=2, total_steps=4))
    device_core.add_tenant("sched-const", LORA, OptimConfig(lr=1e-3))
    lrs, const_lrs = [], []
    for i in range(4):
        if i == 2:
            device_core.forward_backward("sched-lin", make_data(2, seed=130 + i), LossConfig())
            lrs.append(device_core.optim_step("sched-lin")["lr"])
        else:
            lrs.append(device_core.train_step("sched-lin", make_data(2, seed=130 + i), LossConfig())["lr"])
        const_lrs.append(device_core.train_step("sched-const", make_data(2, seed=140 + i), LossConfig())["lr"])
    # warmup 4e-3 * 1/2, 2/2; then linear decay over steps 2..4: p = 0, 1/2
    assert lrs == pytest.approx([2e-3, 4e-3, 4e-3, 2e-3]) and const_lrs == [1e-3] * 4
    before = store_state(device_core.store("sched-lin"))
    assert device_core.train_step("sched-lin", make_data(2, seed=135), LossConfig())["lr"] == 0.0  # p = 1, floor 0
    after = store_state(device_core.store("sched-lin"))
    assert all(torch.equal(after[k], before[k]) for k in after if k.startswith("params:"))
    assert any(not torch.equal(after[k], before[k]) for k in after if k.startswith("exp_avg:"))


def test_decaying_schedule_without_total_steps_is_refused(core):
    with pytest.raises(ConfigError, match="tenant 'sched-bad': optim.total_steps: lr_schedule 'cosine'"):
        core.add_tenant("sched-bad", LORA, OptimConfig(lr_schedule="cosine"))
    assert "sched-bad" not in core.stores
    core.add_tenant("sched-warm-only", LORA, OptimConfig(warmup_steps=3))  # constant needs no length
