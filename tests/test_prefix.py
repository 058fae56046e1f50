"""Shared-prefix training: the prefix tree, and equality with the naive path (tiny llama, fp32).

The naive path (``TrainerConfig(shared_prefix=False)``) runs every row through the whole model with
logits at every position; the shared path computes each shared prefix once and the LM head only
where a log-prob is needed. Same data, same adapter: log-probs, losses, every LoRA gradient and the
weights after optimizer steps must agree to fp32 rounding.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from clora.config import DEFAULT_TARGET_MODULES, LoraConfig, LossConfig, OptimConfig, TrainerConfig
from clora.messages import Datum
from clora.rl import collate
from clora.trainer import FusedRequest, SlotRouting, TrainerCore, attach_lora, lora_layers
from clora.testing import store_state
from clora.trainer.prefix import PrefixRunner, naive_forward, prefix_unsupported
from clora.trainer.prefix_plan import plan_prefix_tree

VOCAB = 700
LORA = LoraConfig(rank=4, alpha=8.0, init_seed=7)
OPTIM = OptimConfig(lr=5e-3, weight_decay=0.01, grad_clip=0.5, eps=1e-3)
# fp32 rounding: a prefix computed once sends its rows' gradients back summed, through float32
# GEMMs of other shapes. Measured on this data: log-probs 8e-6; gradients <= 5.6e-6 of the largest
# gradient; weights after two Adam steps <= 1.5e-6. Adam's first steps turn a gradient rounding dg
# into a weight change of up to lr * dg / eps on near-zero gradient elements, so the optimizers
# here use eps 1e-3 (with eps 1e-5 the weights differed by up to 3e-5, from the same gradients).
# The float64 tests below show the two paths are the same function (1e-13).
LOGP_ATOL = 5e-5
GRAD_RTOL = 2e-5  # of the largest gradient of any tensor
WEIGHT_ATOL = 5e-6
# On CUDA (the GPU check runs the tests that take ``device``) GEMM and attention kernels round
# differently per shape, more than on CPU; not yet measured. 5e-5 on the weights is still 20x below
# an Adam update at these learning rates, the size a routing or gradient bug would get wrong.
CUDA_TOLERANCES = {"logp": 2e-4, "grad": 2e-4, "weight": 5e-5, "rel": 1e-4}
CPU_TOLERANCES = {"logp": LOGP_ATOL, "grad": GRAD_RTOL, "weight": WEIGHT_ATOL, "rel": 1e-5}


def tolerances(device: torch.device) -> dict[str, float]:
    return CUDA_TOLERANCES if device.type == "cuda" else CPU_TOLERANCES


def loss_keys(values: dict[str, float]) -> list[str]:
    """The loss metrics of a step's values (``kl`` only with a KL penalty)."""
    return [k for k in ("loss", "kl", "kl_sampler", "entropy", "clip_frac") if k in values]


# ---------------------------------------------------------------------------------------- plan


def _check_plan_invariants(rows: list[list[int]], slots: list[int], plan) -> None:
    """Every row's path covers [0, len) once, in order; a segment's tokens are every sharing row's
    tokens; parents run in earlier waves; leaves are the last wave, in row order."""
    wave_of = {s: w for w, members in enumerate(plan.waves) for s in members}
    assert plan.waves[-1] == tuple(path[-1] for path in plan.paths)
    for r, path in enumerate(plan.paths):
        position = 0
        for s in path:
            seg = plan.segments[s]
            assert seg.start == position and seg.stop > seg.start
            assert rows[seg.row][seg.start : seg.stop] == rows[r][seg.start : seg.stop]
            assert seg.slot == slots[r]
            if seg.parent is not None:
                assert wave_of[seg.parent] < wave_of[s]
            position = seg.stop
        assert position == len(rows[r])


def test_plan_a_group_shares_its_prompt_and_the_step_shares_its_system_prompt():
    rng = random.Random(0)
    system = [rng.randrange(VOCAB) for _ in range(40)]
    questions = [[rng.randrange(VOCAB) for _ in range(12)] for _ in range(2)]
    rows = [system + q + [rng.randrange(VOCAB) for _ in range(5 + i)] for q in questions for i in range(3)]
    plan = plan_prefix_tree(rows, min_tokens=8)
    _check_plan_invariants(rows, [0] * 6, plan)
    assert len(plan.waves) == 3  # system prompt, one question per group, the six completions
    (root,) = plan.waves[0]
    assert (plan.segments[root].start, plan.segments[root].stop) == (0, 40)
    assert [(plan.segments[s].start, plan.segments[s].stop) for s in plan.waves[1]] == [(40, 52), (40, 52)]
    assert [plan.segments[s].start for s in plan.waves[2]] == [52] * 6
    assert plan.positions() == 40 + 2 * 12 + 6 * 7  # leaves padded to the longest completion (7)


def test_plan_shares_nothing_below_min_tokens_across_slots_or_the_last_token():
    rows = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 5, 6, 7, 8, 10], [1, 2, 3, 4, 9, 9, 9, 9, 9]]
    shared = plan_prefix_tree(rows, min_tokens=8)
    assert len(shared.waves) == 2 and shared.segments[shared.waves[0][0]].stop == 8
    assert plan_prefix_tree(rows, min_tokens=9).shared == 0  # 8 common tokens < 9
    assert plan_prefix_tree(rows, [0, 1, 0], min_tokens=8).shared == 0  # the two equal prefixes are other slots'
    twins = plan_prefix_tree([[5] * 10, [5] * 10], min_tokens=4)
    assert [(s.start, s.stop) for s in twins.segments] == [(0, 9), (9, 10), (9, 10)]  # each keeps its last token


def test_plan_invariants_on_random_trees():
    rng = random.Random(1)
    for _ in range(50):
        stems = [[rng.randrange(5) for _ in range(rng.randint(0, 12))] for _ in range(3)]
        rows, slots = [], []
        for _ in range(rng.randint(1, 9)):
            stem = rng.choice(stems)
            rows.append(stem[: rng.randint(0, len(stem))] + [rng.randrange(5) for _ in range(rng.randint(1, 6))])
            slots.append(rng.randrange(2))
        plan = plan_prefix_tree(rows, slots, min_tokens=rng.randint(1, 4))
        _check_plan_invariants(rows, slots, plan)


# ---------------------------------------------------------------------------------------- data


def rollout_data(
    rng: random.Random, *, groups: int, group_size: int, system_len: int = 40, question_len: int = 12,
    completion: tuple[int, int] = (6, 20),
) -> list[Datum]:
    """GRPO-shaped data: every group shares system prompt + its question; completions are ragged and
    multi-turn (a tool turn inside, masked out); one sampled advantage per sequence."""
    system = [rng.randrange(VOCAB) for _ in range(system_len)]
    data = []
    for _ in range(groups):
        prompt = system + [rng.randrange(VOCAB) for _ in range(question_len)]
        for _ in range(group_size):
            n = rng.randint(*completion)
            mask = [1.0] * n
            if n >= 12:  # assistant turn, tool turn (not trained), assistant turn
                tool = rng.randint(3, n - 6)
                mask[tool : tool + 4] = [0.0] * 4
            adv = rng.choice([-1.0, -0.5, 0.5, 1.0])
            loss_mask = [0.0] * len(prompt) + mask
            data.append(Datum(
                tokens=prompt + [rng.randrange(VOCAB) for _ in range(n)],
                loss_mask=loss_mask,
                advantages=[adv * m for m in loss_mask],
                sampler_logprobs=[(-6.6 + rng.uniform(-0.3, 0.3)) * m for m in loss_mask],
            ))
    return data


def lone_data(rng: random.Random, n: int) -> list[Datum]:
    """Sequences that share no prefix with anything."""
    data = []
    for _ in range(n):
        length, prompt = rng.randint(10, 30), rng.randint(2, 8)
        loss_mask = [0.0] * prompt + [1.0] * (length - prompt)
        data.append(Datum(
            tokens=[rng.randrange(VOCAB) for _ in range(length)], loss_mask=loss_mask,
            advantages=[1.0 * m for m in loss_mask], sampler_logprobs=[-6.6 * m for m in loss_mask],
        ))
    return data


def mixed_data(seed: int) -> list[Datum]:
    """Groups of 4 with a shared prompt, then sequences without one, then one more group."""
    rng = random.Random(seed)
    return rollout_data(rng, groups=2, group_size=4) + lone_data(rng, 3) + rollout_data(rng, groups=1, group_size=3)


# ---------------------------------------------------------------------------------------- float64


@pytest.fixture
def f64(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch):
    """The tiny llama in float64 end to end, with LoRA layers (no adapter bound yet)."""
    from transformers import AutoModelForCausalLM
    from transformers.models.llama import modeling_llama

    def rms_norm(self, hidden):  # the stock norm computes in float32 whatever its input's dtype
        return self.weight * (hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", rms_norm)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float64).eval()
    model.requires_grad_(False)
    routing = SlotRouting()
    attach_lora(model, DEFAULT_TARGET_MODULES, routing)
    return model, routing


def bind_random(model: torch.nn.Module, slot: int, seed: int, rank: int) -> list[torch.Tensor]:
    """A random float64 adapter (B != 0) in ``slot`` of every LoRA layer; returns its leaf tensors."""
    g = torch.Generator().manual_seed(seed)
    leaves = []
    for layer in lora_layers(model).values():
        a = (0.1 * torch.randn(rank, layer.in_features, generator=g, dtype=torch.float64)).requires_grad_()
        b = (0.1 * torch.randn(layer.out_features, rank, generator=g, dtype=torch.float64)).requires_grad_()
        layer.set_slot(slot, a, b, 2.0)
        leaves += [a, b]
    return leaves


def run_both(
    model, routing, data: list[Datum], slots: list[int], leaves: list[torch.Tensor], *, every: bool, chunk: int,
    budget: int,
):
    """Per micro-batch of ``chunk`` rows: log-probs and entropies (where needed: trained positions, or
    ``every`` position), and the summed gradients of sum(w * logp), from the naive and the shared path
    (prefixes shared across micro-batches when they fit ``budget`` positions)."""
    spans = [range(i, min(i + chunk, len(data))) for i in range(0, len(data), chunk)]
    out = []
    for shared in (False, True):
        runner = PrefixRunner(
            model, [d.tokens for d in data], slots, [len(span) for span in spans], budget=budget,
            device=torch.device("cpu"), pad_id=0, autocast=False, routing=routing, min_tokens=8, grad=True,
        ) if shared else None
        if runner is not None:
            assert runner.per_call == (budget > 0)
        per_batch = []
        for index, span in enumerate(spans):
            cpu = collate([data[r] for r in span])
            need = cpu.attention_mask.bool() if every else cpu.loss_mask != 0
            need[:, 0] = False
            if runner is not None:
                forward = runner.forward(index, need)
            else:
                routing.use_rows(torch.tensor([slots[r] for r in span]))
                forward = naive_forward(model, cpu.tokens, cpu.attention_mask, autocast=False,
                                        slots=[slots[r] for r in span])
            assert forward.logp.dtype == torch.float64
            weights = torch.randn(need.shape, generator=torch.Generator().manual_seed(index), dtype=torch.float64)
            (forward.logp * weights * need).sum().backward()
            per_batch.append((forward.logp.detach() * need, forward.entropy() * need))
            if runner is not None:
                runner.done(index)
        grads = [leaf.grad.clone() for leaf in leaves]
        for leaf in leaves:
            leaf.grad = None
        out.append((per_batch, grads))
    return out


def assert_same_function(naive, shared) -> None:
    for (logp_a, entropy_a), (logp_b, entropy_b) in zip(naive[0], shared[0], strict=True):
        torch.testing.assert_close(logp_b, logp_a, rtol=0, atol=1e-12)
        torch.testing.assert_close(entropy_b, entropy_a, rtol=0, atol=1e-12)
    scale = max(float(g.abs().max()) for g in naive[1])
    for i, (a, b) in enumerate(zip(naive[1], shared[1], strict=True)):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-12 * scale, msg=f"gradient {i}")


@pytest.mark.parametrize("budget", [10**6, 0], ids=["once_per_call", "per_micro_batch"])
def test_float64_training_positions_are_the_same_function(f64, budget):
    """Groups with a shared prompt (ragged, multi-turn completions), lone sequences: the shared path's
    log-probs, entropies and every LoRA gradient equal the naive path's to float64 rounding, with the
    prefixes computed once per call (backward through them after the last micro-batch) or per micro-batch."""
    model, routing = f64
    leaves = bind_random(model, 0, seed=1, rank=4)
    data = mixed_data(3)  # micro-batches of 5 rows split the groups of 4
    assert_same_function(*run_both(model, routing, data, [0] * len(data), leaves, every=False, chunk=5,
                                   budget=budget))


def test_float64_every_position_and_two_slots_are_the_same_function(f64):
    """Every log-prob asked for (prompt positions too, computed once in the shared segments), and two
    adapters (slots) on identical tokens, as in a fused step: no prefix is shared across slots."""
    model, routing = f64
    leaves = bind_random(model, 0, seed=1, rank=4) + bind_random(model, 1, seed=2, rank=8)
    data = rollout_data(random.Random(4), groups=2, group_size=3)
    data = data + data[:4]
    assert_same_function(*run_both(model, routing, data, [0] * 6 + [1] * 4, leaves, every=True, chunk=4,
                                   budget=10**6))


# ---------------------------------------------------------------------------------------- equality


@pytest.fixture(scope="module")
def pair(tiny_model_dir: Path, device: torch.device) -> dict[bool, TrainerCore]:
    """Two cores on the same model and test device: the naive reference (False) and the shared-prefix
    path (True). Micro-batches of 5 rows split the groups of 4."""
    cores = {
        mode: TrainerCore.from_model_dir(
            tiny_model_dir, TrainerConfig(micro_batch_size=5, shared_prefix=mode, device=str(device))
        )
        for mode in (False, True)
    }
    assert not cores[False].shared_prefix and cores[True].shared_prefix
    return cores


def add_both(pair: dict[bool, TrainerCore], tenant: str, lora: LoraConfig = LORA, optim: OptimConfig = OPTIM) -> None:
    for core in pair.values():
        core.add_tenant(tenant, lora, optim)


def assert_grads_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float = GRAD_RTOL) -> None:
    assert a.keys() == b.keys()
    scale = max(float(t.abs().max()) for t in a.values())
    assert scale > 0
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=rtol * scale, msg=k)


def test_logprobs_equal_the_naive_path(pair, device):
    add_both(pair, "lp")
    for core in pair.values():  # a trained adapter (B != 0), so the prefix's keys/values depend on it
        core.train_step("lp", mixed_data(0), LossConfig())
    data = mixed_data(1)
    naive, shared = (pair[m].compute_logprobs("lp", data) for m in (False, True))
    for d, a, b in zip(data, naive, shared, strict=True):
        assert len(a) == len(b) == len(d.tokens) and b[0] == 0.0
        torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=0, atol=tolerances(device)["logp"])


LOSSES = {
    # KL to the base model: the base forward (adapter routed off) takes the shared path too
    "ppo_kl_k3": LossConfig(kind="ppo", kl_coef=0.1),
    "is_sequences": LossConfig(kind="importance_sampling", normalize="sequences"),
    "cispo_kl_k1_constant": LossConfig(kind="cispo", clip_low=1.0, clip_high=2.0, kl_coef=0.05, kl_estimator="k1",
                                       normalize="constant", normalize_constant=40.0),
    "cross_entropy": LossConfig(kind="cross_entropy"),
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_forward_backward_and_steps_equal_the_naive_path(pair, device, name):
    """Every loss kind and normalisation, with and without the KL penalty to the base model: the
    shared path's metrics, gradients and weights after optimizer steps equal the naive path's."""
    loss, tol = LOSSES[name], tolerances(device)
    tenant = f"fb-{name}"
    add_both(pair, tenant)
    for step in range(2):  # the second step has a non-zero B and Adam moments
        data = mixed_data(10 + step)
        got = {m: pair[m].forward_backward(tenant, data, loss) for m in (False, True)}
        assert loss_keys(got[True]) == loss_keys(got[False])
        assert ("kl" in got[True]) == (loss.kl_coef > 0) and ("time/base_fwd" in got[True]) == (loss.kl_coef > 0)
        for key in loss_keys(got[False]):
            assert got[True][key] == pytest.approx(got[False][key], rel=tol["rel"], abs=1e-6), key
        assert got[True]["tokens"] == got[False]["tokens"]
        assert got[True]["tokens_computed"] < 0.7 * got[False]["tokens_computed"]
        assert_grads_close(pair[False].store(tenant).grads, pair[True].store(tenant).grads, tol["grad"])
        for core in pair.values():
            core.optim_step(tenant)
        naive, shared = store_state(pair[False].store(tenant)), store_state(pair[True].store(tenant))
        for k in naive:
            if isinstance(naive[k], torch.Tensor):
                torch.testing.assert_close(shared[k], naive[k], rtol=0, atol=tol["weight"], msg=k)
            else:
                assert shared[k] == naive[k], k


def test_train_step_on_groups_without_any_shared_prefix(pair, device):
    """Nothing to share: the shared path still skips the LM head on prompt positions."""
    add_both(pair, "lone")
    data = lone_data(random.Random(5), 7)
    got = {m: pair[m].train_step("lone", data, LossConfig(kind="ppo")) for m in (False, True)}
    assert got[True]["loss"] == pytest.approx(got[False]["loss"], rel=tolerances(device)["rel"])
    assert got[True]["tokens_lm_head"] == got[True]["tokens"] < got[False]["tokens_lm_head"]
    for k, t in pair[False].store("lone").params.items():
        torch.testing.assert_close(pair[True].store("lone").params[k], t, rtol=0,
                                   atol=tolerances(device)["weight"], msg=k)


def test_an_adapter_that_leaves_prefix_outputs_without_grad(pair, device):
    """LoRA on q_proj and v_proj only: the first layer's prefix keys do not depend on the adapter (no
    grad_fn), though the rows below send gradient to their leaf copies; the shared path must skip
    them in its backward and still equal the naive path."""
    lora = LoraConfig(rank=4, alpha=8.0, init_seed=5, target_modules=("q_proj", "v_proj"))
    add_both(pair, "qv", lora)
    data = rollout_data(random.Random(11), groups=2, group_size=3)
    got = {m: pair[m].train_step("qv", data, LossConfig(kind="ppo", kl_coef=0.1)) for m in (False, True)}
    assert got[True]["loss"] == pytest.approx(got[False]["loss"], rel=tolerances(device)["rel"])
    for k, t in pair[False].store("qv").params.items():
        torch.testing.assert_close(pair[True].store("qv").params[k], t, rtol=0,
                                   atol=tolerances(device)["weight"], msg=k)


def _unmasked(data: list[Datum]) -> list[Datum]:
    """The same rows with no loss position at all (a step whose every token is prompt or tool output)."""
    return [Datum(tokens=d.tokens, loss_mask=[0.0] * len(d.loss_mask), advantages=[0.0] * len(d.loss_mask),
                  sampler_logprobs=d.sampler_logprobs) for d in data]


def test_micro_batches_without_a_loss_position_under_constant_normalisation(pair, device):
    """normalize='constant' divides by rows x constant, so a micro-batch (or a whole call) with no
    trained token has a positive denominator and a loss without grad on the shared path (no log-prob
    was needed): it contributes nothing, as on the naive path, instead of failing in backward."""
    loss = LossConfig(kind="ppo", normalize="constant", normalize_constant=16.0)
    add_both(pair, "nomask")
    data = mixed_data(20)  # micro-batches of 5: the first two hold only unmasked rows
    data = _unmasked(data[:10]) + data[10:]
    got = {m: pair[m].forward_backward("nomask", data, loss) for m in (False, True)}
    assert got[True]["loss"] == pytest.approx(got[False]["loss"], rel=tolerances(device)["rel"])
    assert_grads_close(pair[False].store("nomask").grads, pair[True].store("nomask").grads, tolerances(device)["grad"])
    add_both(pair, "nomask-all")
    for core in pair.values():
        metrics = core.forward_backward("nomask-all", _unmasked(mixed_data(21)), loss)
        assert metrics["loss"] == 0.0 and metrics["tokens"] == 0.0
        assert all(float(g.abs().max()) == 0.0 for g in core.store("nomask-all").grads.values())
        core.optim_step("nomask-all")
    for k, t in pair[False].store("nomask-all").params.items():  # weight decay only, the same on both paths
        torch.testing.assert_close(pair[True].store("nomask-all").params[k], t, rtol=0,
                                   atol=tolerances(device)["weight"], msg=k)


@pytest.mark.parametrize("kl_coef", [0.0, 0.1], ids=["no_kl", "kl"])
def test_lm_head_runs_only_where_a_log_prob_is_needed(pair, kl_coef):
    add_both(pair, f"head-{kl_coef}")
    core = pair[True]
    rows_seen: list[int] = []
    hook = core.model.get_output_embeddings().register_forward_hook(
        lambda _m, args, _out: rows_seen.append(args[0].shape[0])
    )
    try:
        data = rollout_data(random.Random(7), groups=1, group_size=4)  # one micro-batch
        values = core.forward_backward(f"head-{kl_coef}", data, LossConfig(kl_coef=kl_coef))
    finally:
        hook.remove()
    trained = sum(sum(1 for m in d.loss_mask if m) for d in data)
    # one LM head call on 2-D hidden states: every trained position once, except that the prompt's
    # last position predicts every row's first completion token (computed once for the group); with
    # the KL penalty the base model's forward (adapter off) runs the same way first
    calls = 2 if kl_coef > 0 else 1
    assert rows_seen == [trained - 3] * calls and values["tokens_lm_head"] == trained - 3
    core.optim_step(f"head-{kl_coef}")


def test_tokens_computed_counts_each_shared_prefix_once(pair):
    add_both(pair, "count")
    rng = random.Random(9)
    data = rollout_data(rng, groups=1, group_size=5, system_len=30, question_len=10, completion=(8, 8))
    got = {m: pair[m].forward_backward("count", data, LossConfig()) for m in (False, True)}
    assert got[False]["tokens_computed"] == 5 * 48  # every row, every position
    assert got[True]["tokens_computed"] == 40 + 5 * 8  # the prompt once (one segment), then each completion
    assert got[True]["tokens_lm_head"] == got[True]["tokens"] - 4


def test_bf16_autocast_runs_and_stays_near_fp32(pair):
    add_both(pair, "bf16")
    core = pair[True]
    data = mixed_data(20)
    fp32 = core.compute_logprobs("bf16", data)
    core.autocast_bf16 = True
    try:
        bf16 = core.compute_logprobs("bf16", data)
        values = core.train_step("bf16", data, LossConfig(kind="ppo"))
    finally:
        core.autocast_bf16 = False
    assert all(torch.isfinite(torch.tensor(v)) for v in (values["loss"], values["grad_norm"]))
    diff = max(abs(a - b) for ra, rb in zip(fp32, bf16, strict=True) for a, b in zip(ra, rb, strict=True))
    assert 0 < diff < 0.5  # bf16 rounding, not a different function


def test_unsupported_models_fall_back_to_the_naive_path(tiny_model_dir):
    core = TrainerCore.from_model_dir(tiny_model_dir, TrainerConfig())
    assert core.shared_prefix and prefix_unsupported(core.model) is None
    core.model.config.final_logit_softcapping = 30.0
    assert "final_logit_softcapping" in prefix_unsupported(core.model)
    model = core.model
    del core
    assert not TrainerCore(model).shared_prefix


# ---------------------------------------------------------------------------------------- fused


TENANTS = {
    "A": (LoraConfig(rank=2, alpha=4.0, init_seed=1), OptimConfig(lr=5e-3, eps=1e-3),
          LossConfig(kind="ppo", kl_coef=0.1)),
    "B": (LoraConfig(rank=8, alpha=32.0, init_seed=2, target_modules=("q_proj", "v_proj", "down_proj")),
          OptimConfig(lr=1e-2, eps=1e-3),
          LossConfig(kind="cispo", clip_low=1.0, clip_high=2.0, kl_coef=0.05, kl_estimator="k1",
                     normalize="sequences")),
}


def test_fused_step_equals_the_naive_fused_step(tiny_model_dir, device):
    """Two tenants fused, both with a KL penalty to the base model (PPO + k3, CISPO + k1); B's data
    repeats A's prompts exactly, so a plan that merged prefixes across slots (tenants) would give B
    A's keys/values and fail."""
    tol = tolerances(device)
    cores = {
        m: TrainerCore.from_model_dir(
            tiny_model_dir, TrainerConfig(micro_batch_size=9, shared_prefix=m, device=str(device))
        )
        for m in (False, True)
    }
    for core in cores.values():
        for name, (lora, optim, _) in TENANTS.items():
            core.add_tenant(name, lora, optim)
    for step in range(2):
        a = rollout_data(random.Random(30 + step), groups=2, group_size=3)
        b = [Datum(tokens=d.tokens, loss_mask=d.loss_mask, advantages=[-x for x in d.advantages],
                   sampler_logprobs=d.sampler_logprobs) for d in a[:3]]  # one micro-batch: A's 6 rows, B's 3
        requests = [FusedRequest("A", a, TENANTS["A"][2]), FusedRequest("B", b, TENANTS["B"][2])]
        got = {m: cores[m].train_steps_fused(requests) for m in (False, True)}
        for name, naive, shared in zip(TENANTS, got[False], got[True], strict=True):
            assert isinstance(shared, dict) and isinstance(naive, dict), (naive, shared)
            assert shared["fused"] == naive["fused"] == 2.0
            assert "kl" in shared and loss_keys(shared) == loss_keys(naive)
            for key in [*loss_keys(naive), "grad_norm"]:
                assert shared[key] == pytest.approx(naive[key], rel=tol["rel"], abs=1e-6), (name, key)
            assert shared["tokens_computed"] < naive["tokens_computed"]
            # a group's prompt-end position predicts each sample's first token once: A 2 groups of 3, B 1
            assert shared["tokens_lm_head"] == shared["tokens"] - {"A": 4, "B": 2}[name] < naive["tokens_lm_head"]
            for k, t in cores[False].store(name).params.items():
                torch.testing.assert_close(
                    cores[True].store(name).params[k], t, rtol=0, atol=tol["weight"], msg=f"{name} {k}"
                )


def test_a_fused_tenant_without_a_loss_position_under_constant_normalisation(pair):
    """In a fused step, a tenant whose rows carry no trained token (normalize='constant': a positive
    denominator, a loss without grad on the shared path) adds nothing to the backward; the other
    tenant's step equals its naive one."""
    loss = LossConfig(kind="ppo", normalize="constant", normalize_constant=16.0)
    for name in ("fa", "fb"):
        add_both(pair, name)
    a = rollout_data(random.Random(40), groups=1, group_size=5)  # micro-batches of 5: the second holds only B's rows
    b = _unmasked(rollout_data(random.Random(41), groups=1, group_size=2))
    got = {m: pair[m].train_steps_fused([FusedRequest("fa", a, loss), FusedRequest("fb", b, loss)]) for m in (False, True)}
    for naive, shared in zip(got[False], got[True], strict=True):
        assert isinstance(shared, dict) and isinstance(naive, dict), (naive, shared)
        assert shared["loss"] == pytest.approx(naive["loss"], rel=1e-4, abs=1e-6)
    assert got[True][1]["loss"] == 0.0 and got[True][1]["tokens"] == 0.0
    for k, t in pair[False].store("fa").params.items():
        torch.testing.assert_close(pair[True].store("fa").params[k], t, rtol=0, atol=1e-5, msg=k)
