"""The unlearning methods of the seeds and peers (docs/design.md §7): idk, dpo and rmu against
float64 hand computations, the refusal relabelling, every optimiser (adamw, sgd, sophiag) under
exact masks with exact resume, and their mistakes as one-line user errors."""

from __future__ import annotations

import copy
import json
import math
import re
import warnings
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from soir.data import collate, encode, pad_id
from soir.errors import UserError
from soir.mask import Mask
from soir.models import ModelSettings, save_model
from soirlab.cli import main
from tests.conftest import neuron_selection
from tests.test_objectives import (
    Table,
    TableReference,
    V,
    X,
    make_batch,
    mean_nll,
    token_logprobs,
)
from unlearn.loop import Trainer, TrainSettings
from unlearn.objectives import (
    IDK_STREAM,
    OBJECTIVES,
    ObjectiveSettings,
    get_objective,
    gnb_loss,
    refusal_for,
    refusals,
    unlearns,
    with_refusals,
)
from unlearn.optimizers import OPTIMIZERS, SophiaG
from unlearn.reference import make_reference
from unlearn.unlearning import UnlearnSettings, unlearn, unlearn_model

pytestmark = pytest.mark.usefixtures("one_thread")

# ---------------------------------------------------------------- fixed logits, by hand


def random_logits(batch, seed, scale=2.0):
    """float64 logits (test_objectives' are float32): these tests compare to 1e-9 or tighter."""
    generator = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*batch["labels"].shape, V, generator=generator, dtype=torch.float64)).requires_grad_()


# the same prompts (x) with the original answer (y_l) and a refusal (y_w) of other lengths
FORGET = make_batch([[X, X, 3, 1, 4, X], [X, 2, 6, X, X, X]], seed=1)
IDK = make_batch([[X, X, 5, 5, X, X], [X, 2, 0, 1, 3, X]], seed=3)
RETAIN = make_batch([[X, 5, 0, 2], [X, X, X, 1], [X, 4, X, X]], seed=2)
BATCHES = {"forget": FORGET, IDK_STREAM: IDK, "retain": RETAIN}


def log_sigmoid(z):
    return -math.log1p(math.exp(-z)) if z > 0 else z - math.log1p(math.exp(z))


@pytest.fixture
def tables():
    logits = {name: random_logits(batch, 10 + i) for i, (name, batch) in enumerate(BATCHES.items())}
    ref = {name: random_logits(batch, 20 + i).detach() for i, (name, batch) in enumerate(BATCHES.items())}
    model = Table([(BATCHES[n]["input_ids"], logits[n]) for n in BATCHES])
    reference = TableReference([(BATCHES[n]["input_ids"], ref[n]) for n in BATCHES])
    return SimpleNamespace(model=model, reference=reference, logits=logits, ref=ref)


S = ObjectiveSettings(w_forget=0.7, w_retain=1.3, beta=0.5)


def run(name, tables, settings=S):
    objective = get_objective(name, settings)
    loss, parts = objective(tables.model, {k: BATCHES[k] for k in objective.streams}, tables.reference)
    assert loss.requires_grad and all(not v.requires_grad for v in parts.values())
    return float(loss.detach()), {k: float(v) for k, v in parts.items()}


def test_idk_is_the_refusal_nll_plus_the_retain_nll(tables):
    loss, parts = run("idk", tables)
    idk, retain = mean_nll(tables.logits[IDK_STREAM], IDK["labels"]), mean_nll(tables.logits["retain"], RETAIN["labels"])
    assert parts == pytest.approx({"idk_nll": idk, "retain_nll": retain}, rel=1e-9)
    assert loss == pytest.approx(0.7 * idk + 1.3 * retain, rel=1e-9)
    assert OBJECTIVES["idk"].streams == (IDK_STREAM, "retain") and not OBJECTIVES["idk"].needs_reference


def test_dpo_prefers_the_refusal_against_the_reference(tables):
    loss, parts = run("dpo", tables)
    beta = 0.5
    win_cur, win_ref = token_logprobs(tables.logits[IDK_STREAM], IDK["labels"]), token_logprobs(tables.ref[IDK_STREAM], IDK["labels"])
    lose_cur, lose_ref = token_logprobs(tables.logits["forget"], FORGET["labels"]), token_logprobs(tables.ref["forget"], FORGET["labels"])
    margins = [(sum(wc) - sum(wr)) - (sum(lc) - sum(lr)) for wc, wr, lc, lr in zip(win_cur, win_ref, lose_cur, lose_ref)]
    assert all(abs(m) > 0.1 for m in margins)
    dpo = -(2 / beta) * sum(log_sigmoid(beta * m) for m in margins) / len(margins)
    assert parts["dpo"] == pytest.approx(dpo, rel=1e-9)
    assert parts["forget_nll"] == pytest.approx(mean_nll(tables.logits["forget"], FORGET["labels"]), rel=1e-9)
    assert parts["idk_nll"] == pytest.approx(mean_nll(tables.logits[IDK_STREAM], IDK["labels"]), rel=1e-9)
    assert loss == pytest.approx(0.7 * dpo + 1.3 * mean_nll(tables.logits["retain"], RETAIN["labels"]), rel=1e-9)
    # the gradient raises the refusal and lowers the forget answer
    objective = get_objective("dpo", ObjectiveSettings(w_retain=0.0, beta=beta))
    objective(tables.model, BATCHES, tables.reference)[0].backward()
    assert tables.logits[IDK_STREAM].grad[0, 1, 5] < 0 and tables.logits["forget"].grad[0, 1, 3] > 0


def test_dpo_at_its_reference_is_2_over_beta_log_2(tables):
    same = TableReference([(BATCHES[n]["input_ids"], tables.logits[n].detach()) for n in BATCHES])
    objective = get_objective("dpo", ObjectiveSettings(w_retain=0.0, beta=0.25))
    loss, _ = objective(tables.model, BATCHES, same)
    assert float(loss) == pytest.approx(2 / 0.25 * math.log(2), rel=1e-12)
    with pytest.raises(ValueError, match="reference"):
        objective(tables.model, BATCHES, None)


# ---------------------------------------------------------------- refusal relabelling


def test_refusals_are_shipped_and_chosen_per_row_reproducibly(qa_frame, tokenizer):
    choices = refusals()
    assert 20 <= len(choices) <= 100 and len(set(choices)) == len(choices) and "I don't know." in choices
    relabelled = with_refusals(qa_frame, seed=3)
    assert list(relabelled["input"]) == list(qa_frame["input"]) and list(relabelled["id"]) == list(qa_frame["id"])
    assert list(qa_frame["output"])[0] == " 555-0142"  # the original frame is untouched
    for row in relabelled.itertuples():
        assert row.output == " " + refusal_for(row.id, 3) and row.output.strip() in choices
    # a pure function of (seed, id): the same in another order, another run; other seeds differ somewhere
    assert list(with_refusals(qa_frame.iloc[::-1], seed=3)["output"])[::-1] == list(relabelled["output"])
    many = [refusal_for(f"row{i}", 0) for i in range(400)]
    assert len(set(many)) > len(choices) // 2 and many != [refusal_for(f"row{i}", 1) for i in range(400)]
    # encoded: the prompt tokens are kept and unlabelled, the refusal and one EOS labelled
    original, idk = encode(qa_frame, tokenizer), encode(relabelled, tokenizer)
    for i in range(len(qa_frame)):
        p = original.prompt_lengths[i]
        assert idk.prompt_lengths[i] == p and idk.input_ids[i][:p] == original.input_ids[i][:p]
        answer = tokenizer(relabelled["output"][i], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert idk.input_ids[i][p:] == answer and idk.labels[i] == [X] * p + answer


def test_the_idk_stream_holds_the_forget_rows_at_every_step(make_model, tokenizer, qa_frame):
    """dpo compares each forget answer with its own prompt's refusal: the streams stay aligned."""
    seen = []

    class Spy:
        streams = ("forget", IDK_STREAM, "retain")
        needs_reference = False

        def __call__(self, model, batches, reference=None):
            seen.append((batches["forget"], batches[IDK_STREAM]))
            return get_objective("idk", ObjectiveSettings())(model, batches)

    OBJECTIVES.register("spy-idk", lambda settings: Spy())
    try:
        unlearn_model(make_model("olmo"), tokenizer, qa_frame, qa_frame, None, objective="spy-idk",
                      train=TrainSettings(steps=5, batch_size=3, lr=1e-3, progress=False))
    finally:
        OBJECTIVES.unregister("spy-idk")
    assert len(seen) == 5
    for forget, idk in seen:
        for i in range(len(forget["input_ids"])):
            p = int((forget["labels"][i] == X).long().cumprod(0).sum())  # the prompt: the leading unlabelled run
            assert torch.equal(forget["input_ids"][i, :p], idk["input_ids"][i, :p]) and (idk["labels"][i, :p] == X).all()


# ---------------------------------------------------------------- rmu, by hand on a float64 model


@pytest.fixture
def rmu_setup(make_model, tokenizer, qa_frame):
    model = make_model("olmo", dtype=torch.float64)
    data = encode(qa_frame, tokenizer)
    forget = collate(data.input_ids[:3], data.labels[:3], pad_id(tokenizer))
    retain = collate(data.input_ids[1:], data.labels[1:], pad_id(tokenizer))
    assert (forget["attention_mask"] == 0).any() and (retain["attention_mask"] == 0).any()  # padding must not count
    mask = Mask.from_names(model, ["model.layers.0.mlp.up_proj.weight", "model.layers.0.self_attn.v_proj.weight"])
    original = copy.deepcopy(model).eval()
    reference = make_reference(model, mask)
    return SimpleNamespace(model=model, original=original, mask=mask, reference=reference, batches={"forget": forget, "retain": retain})


def block_states(model, batch, layer):
    """Block `layer`'s output through `output_hidden_states` (entry layer + 1), not the hook."""
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True).hidden_states[layer + 1]


def mean_squared_distance(h, target, attention_mask):
    """mean over rows of (1/|x|) Σ_t Σ_d (h − target)², one entry at a time in float64."""
    rows = []
    for i in range(h.shape[0]):
        tokens = [t for t in range(h.shape[1]) if attention_mask[i, t]]
        total = 0.0
        for t in tokens:
            goal = target[i, t] if target.dim() == 3 else target
            total += sum((float(h[i, t, d]) - float(goal[d])) ** 2 for d in range(h.shape[2]))
        rows.append(total / len(tokens))
    return sum(rows) / len(rows)


def test_rmu_equals_a_hand_computation(rmu_setup):
    s = rmu_setup
    settings = ObjectiveSettings(w_forget=0.6, rmu_alpha=40.0, steering_coeff=3.0)
    objective = get_objective("rmu", settings)
    objective.prepare(s.model, s.mask, seed=5)
    assert objective.layer == 0  # the deepest block the mask selects
    u = objective.direction
    assert float(u.norm()) == pytest.approx(1.0, abs=1e-12) and (u >= 0).all() and u.shape == (32,)
    with torch.no_grad():  # move the selected tensors away from the original, so the retain term is not zero
        weight = dict(s.model.named_parameters())["model.layers.0.mlp.up_proj.weight"]
        weight.add_(0.1 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0), dtype=weight.dtype))
    loss, parts = objective(s.model, s.batches, s.reference)
    forget, retain = s.batches["forget"], s.batches["retain"]
    expected_forget = mean_squared_distance(block_states(s.model, forget, 0), 3.0 * u, forget["attention_mask"])
    expected_retain = mean_squared_distance(block_states(s.model, retain, 0), block_states(s.original, retain, 0), retain["attention_mask"])
    assert expected_retain > 1e-4
    assert float(parts["rmu_forget"]) == pytest.approx(expected_forget, rel=1e-10)
    assert float(parts["rmu_retain"]) == pytest.approx(expected_retain, rel=1e-10)
    assert float(loss) == pytest.approx(0.6 * expected_forget + 40.0 * expected_retain, rel=1e-10)
    loss.backward()
    assert dict(s.model.named_parameters())["model.layers.0.mlp.up_proj.weight"].grad.abs().sum() > 0
    assert dict(s.model.named_parameters())["model.layers.1.mlp.up_proj.weight"].grad is None or \
        not dict(s.model.named_parameters())["model.layers.1.mlp.up_proj.weight"].grad.any()  # above block 0: no gradient


def test_rmu_layer_direction_and_reference(rmu_setup):
    s = rmu_setup
    objective = get_objective("rmu", ObjectiveSettings(rmu_layer=1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every selected tensor is at or below block 1: no warning
        objective.prepare(s.model, s.mask, seed=5)
    assert objective.layer == 1
    again = get_objective("rmu", ObjectiveSettings())
    again.prepare(s.model, s.mask, seed=5)
    assert torch.equal(again.direction, objective.direction)  # seeded: a resumed run steers to the same u
    other = get_objective("rmu", ObjectiveSettings())
    other.prepare(s.model, s.mask, seed=6)
    assert not torch.allclose(other.direction, objective.direction)
    # at the start the model is its reference: the retain term is exactly zero
    _, parts = objective(s.model, s.batches, s.reference)
    assert float(parts["rmu_retain"]) == 0.0 and float(parts["rmu_forget"]) > 0
    # a layer-1 mask with rmu at block 0 warns that those tensors cannot move it
    above = Mask.from_names(s.model, ["model.layers.1.mlp.up_proj.weight"])
    with pytest.warns(UserWarning, match="above it"):
        get_objective("rmu", ObjectiveSettings(rmu_layer=0)).prepare(s.model, above, seed=0)
    with pytest.raises(ValueError, match="prepare"):
        get_objective("rmu", ObjectiveSettings())(s.model, s.batches, s.reference)


def test_rmu_bad_layers_are_one_line_user_errors(rmu_setup):
    s = rmu_setup
    with pytest.raises(UserError, match=r"--rmu-layer 2 is out of range: this model has 2 blocks, give 0 to 1"):
        get_objective("rmu", ObjectiveSettings(rmu_layer=2)).prepare(s.model, s.mask)
    with pytest.raises(UserError, match="negative"):
        get_objective("rmu", ObjectiveSettings(rmu_layer=-1))
    with pytest.raises(UserError, match="steering_coeff=0.0 must be > 0"):
        get_objective("rmu", ObjectiveSettings(steering_coeff=0.0))
    with pytest.raises(UserError, match="sum to zero"):
        get_objective("rmu", ObjectiveSettings(w_forget=0.0, rmu_alpha=0.0))


# ---------------------------------------------------------------- SophiaG on a quadratic, by hand


def sophia_by_hand(theta, a, sampled, steps, k, lr, betas, rho, eps, decay, batch):
    """f(θ) = ½ Σ a_i θ_i²; ĥ = B·ĝ² from the given sampled gradients every k steps; lists of floats."""
    m, h, hit = [0.0] * len(theta), [0.0] * len(theta), {"clipped": 0, "free": 0}
    history = []
    for t in range(steps):
        if t % k == 0:
            g_hat = sampled[t // k]
            h = [betas[1] * hi + (1 - betas[1]) * batch * gi * gi for hi, gi in zip(h, g_hat)]
        grad = [ai * x for ai, x in zip(a, theta)]
        theta = [x * (1 - lr * decay) for x in theta]
        m = [betas[0] * mi + (1 - betas[0]) * g for mi, g in zip(m, grad)]
        new = []
        for x, mi, hi in zip(theta, m, h):
            z = mi / max(rho * hi, eps)
            hit["clipped" if abs(z) > 1 else "free"] += 1
            new.append(x - lr * max(min(z, 1.0), -1.0))
        theta = new
        history.append((list(theta), list(m), list(h)))
    return history, hit


def test_sophiag_on_a_quadratic_equals_the_hand_computation():
    a = [4.0, 0.5, 30.0, 0.02]
    theta0 = [1.0, -2.0, 0.3, 5.0]
    sampled = [[0.9, -0.2, 2.5, 0.01], [1.1, 0.1, -2.0, 0.02], [-0.7, 0.3, 1.5, -0.03]]
    config = dict(lr=0.05, betas=(0.8, 0.6), rho=0.3, eps=1e-12, decay=0.1, batch=4)
    steps, k = 6, 2
    expected, hit = sophia_by_hand(theta0, a, sampled, steps, k, **config)
    assert hit["clipped"] > 0 and hit["free"] > 0  # both branches of the clip are exercised

    theta = torch.nn.Parameter(torch.tensor(theta0, dtype=torch.float64))
    optimizer = SophiaG([theta], lr=config["lr"], betas=config["betas"], rho=config["rho"], eps=config["eps"],
                        weight_decay=config["decay"], hessian_every=k)
    curvature = torch.tensor(a, dtype=torch.float64)
    for t in range(steps):
        if t % k == 0:
            theta.grad = torch.tensor(sampled[t // k], dtype=torch.float64)
            optimizer.update_hessian(config["batch"])
        theta.grad = curvature * theta.detach()
        optimizer.step()
        state = optimizer.state[theta]
        want_theta, want_m, want_h = expected[t]
        assert theta.detach().tolist() == pytest.approx(want_theta, rel=1e-12, abs=1e-14), t
        assert state["exp_avg"].tolist() == pytest.approx(want_m, rel=1e-12, abs=1e-14)
        assert state["hessian"].tolist() == pytest.approx(want_h, rel=1e-12, abs=1e-14)
        assert state["step"].dim() == 0 and float(state["step"]) == t + 1
    assert all(torch.is_tensor(v) for v in optimizer.state[theta].values())


def test_sophiag_with_the_exact_hessian_and_no_momentum_is_a_clipped_newton_step():
    """h = diag H exactly, β1 = β2 = 0, η = ρ: an unclipped coordinate lands on the minimum,
    a clipped one moves by exactly η towards it."""
    a = torch.tensor([2.0, 8.0, 0.5], dtype=torch.float64)
    theta = torch.nn.Parameter(torch.tensor([0.01, -0.02, 3.0], dtype=torch.float64))
    rho = 0.1
    optimizer = SophiaG([theta], lr=rho, betas=(0.0, 0.0), rho=rho, hessian_every=1)
    theta.grad = (a / 7).sqrt()  # B·ĝ² = a with B = 7
    optimizer.update_hessian(7)
    theta.grad = a * theta.detach()
    optimizer.step()
    assert theta[0].item() == pytest.approx(0.0, abs=1e-15) and theta[1].item() == pytest.approx(0.0, abs=1e-15)
    assert theta[2].item() == pytest.approx(3.0 - rho, rel=1e-15)


def test_the_gnb_estimate_is_unbiased_for_the_gauss_newton_diagonal():
    """With the logits as the parameter, E[B·ĝ⊙ĝ] = diag GN of the mean NLL = (p − p²)/B at each
    labelled position (0 elsewhere): the factor B of Sophia's Algorithm 2, checked by Monte Carlo."""
    batch = make_batch([[X, 3, 1, 4, X], [X, X, 6, X, X]], seed=4)
    logits = random_logits(batch, 7, scale=1.0)
    model = Table([(batch["input_ids"], logits)])
    predicts = torch.zeros(batch["labels"].shape, dtype=torch.bool)
    predicts[:, :-1] = batch["labels"][:, 1:] != X
    count = int(predicts.sum())
    p = torch.softmax(logits.detach(), -1)
    exact = torch.where(predicts[..., None], (p - p * p) / count, torch.zeros_like(p))
    generator = torch.Generator().manual_seed(0)
    estimate, draws = torch.zeros_like(p), 3000
    for _ in range(draws):
        logits.grad = None
        total, n = gnb_loss(model, {"forget": batch}, generator)
        assert n == count == 4
        (total / n).backward()
        estimate += n * logits.grad.square()
    estimate /= draws
    assert not estimate[~predicts].any()
    torch.testing.assert_close(estimate, exact, atol=0.004, rtol=0.1)
    assert (estimate - exact).abs().max() < 0.2 * exact.max()  # a wrong power of B would be off by a factor 4


def test_the_trainer_refreshes_the_hessian_every_k_steps_on_the_step_batches(make_model, tokenizer, qa_frame, tmp_path):
    from soir.data import BatchStream

    model = make_model("olmo")
    stream = BatchStream(encode(qa_frame, tokenizer), 2, pad_id(tokenizer), seed=0)
    settings = TrainSettings(steps=7, lr=1e-3, optimizer="sophiag", hessian_every=3, grad_accum=2, progress=False)
    trainer = Trainer(model, get_objective("finetune"), {"train": stream}, settings, tmp_path)
    calls, inner = [], trainer.optimizer.update_hessian

    def spy(batch_size):
        calls.append((trainer.step, batch_size, sum(int(p.grad.abs().sum() > 0) for p in trainer.params.values() if p.grad is not None)))
        inner(batch_size)

    trainer.optimizer.update_hessian = spy
    trainer.train()
    labelled = lambda step: sum(int((stream(2 * step + m)["labels"][:, 1:] != X).sum()) for m in range(2))
    assert [(s, b) for s, b, _ in calls] == [(0, labelled(0)), (3, labelled(3)), (6, labelled(6))]
    assert all(n == len(trainer.params) for _, _, n in calls)  # the GNB pass reached every trained tensor
    state = trainer.optimizer.state[next(iter(trainer.params.values()))]
    assert set(state) == {"step", "exp_avg", "hessian"} and float(state["step"]) == 7 and (state["hessian"] > 0).any()


# ---------------------------------------------------------------- exact masks and resume under every optimiser


@pytest.fixture
def saved(tmp_path, tokenizer, qa_frame, make_model):
    qa_frame.to_parquet(tmp_path / "forget.parquet")
    qa_frame.iloc[::-1].to_parquet(tmp_path / "retain.parquet")
    for arch in ("olmo", "gpt2"):
        save_model(make_model(arch), tokenizer, tmp_path / arch)
    return tmp_path


def settings_for(d, arch, out, train, **kw):
    return UnlearnSettings(model=ModelSettings(str(d / arch), dtype="float32"), forget=(str(d / "forget.parquet"),),
                           retain=(str(d / "retain.parquet"),), out=str(out), train=replace(train, batch_size=2), **kw)


TENSORS = {"olmo": ["model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.q_proj.weight"],
           "gpt2": ["transformer.h.0.mlp.c_proj.weight", "transformer.h.1.attn.c_attn.weight", "transformer.h.1.ln_1.bias"]}
OPTIMISER_SETTINGS = {"adamw": {}, "sgd": {"momentum": 0.9}, "sophiag": {"hessian_every": 2, "rho": 0.05}}


@pytest.mark.parametrize("kind", ["tensor", "element"])
@pytest.mark.parametrize("optimizer, arch", [("adamw", "olmo"), ("sgd", "olmo"), ("sophiag", "olmo"), ("sophiag", "gpt2")])
def test_outside_the_mask_is_bit_identical_under_every_optimizer(saved, optimizer, arch, kind):
    from soir.models import load_model

    model = load_model(saved / arch)
    tensors, elements = (TENSORS[arch], {}) if kind == "tensor" else neuron_selection(arch, broadcast=True)
    mask = Mask.from_selection(model, tensors, elements)
    mask.save(saved / "mask")
    out = saved / "out"
    train = TrainSettings(steps=4, lr=1e-2, weight_decay=0.1, warmup=0, progress=False, optimizer=optimizer, save_every=3,
                          **OPTIMISER_SETTINGS[optimizer])
    result = unlearn(settings_for(saved, arch, out, train, objective="graddiff", mask=str(saved / "mask")))
    assert result.steps_done == 4
    before, after = load_file(saved / arch / "model.safetensors"), load_file(out / "model.safetensors")
    for name in before:
        keep = mask.element_mask(name) if name in mask.names else torch.zeros(before[name].shape, dtype=torch.bool)
        assert torch.equal(before[name][~keep], after[name][~keep]), f"{name} moved outside the mask"
        if name in mask.names:
            assert (before[name][keep] != after[name][keep]).any(), f"{name} was selected but did not change"
    state = load_file(out / "checkpoints" / "step-00000003" / "optimizer.safetensors")
    assert {key.partition("::")[0] for key in state} - {""} == set(mask.names)  # no state for anything outside the mask
    keys = {"adamw": ("exp_avg", "exp_avg_sq"), "sgd": ("momentum_buffer",), "sophiag": ("exp_avg", "hessian")}[optimizer]
    for name in mask.names:
        keep = mask.element_mask(name).expand(before[name].shape)
        for key in keys:  # state of the selected entries only: whole tensors, or the gathered entries of element masks
            value = state[f"{name}::{key}"]
            assert value.shape == (before[name].shape if name in mask.tensors else (int(keep.sum()),)), f"{name}::{key} outside the mask"
            assert value.abs().sum() > 0, f"{name}::{key} is empty"
        if optimizer == "sophiag":
            assert state[f"{name}::step"].dim() == 0 and float(state[f"{name}::step"]) == 3


class Killed(Exception):
    pass


def dies_at(step):
    def callback(model, s):
        if s == step:
            raise Killed
        return {"probe": float(sum(p.double().sum() for p in model.parameters()))}
    return callback


RESUMES = [("adamw", "graddiff"), ("sgd", "graddiff"), ("sophiag", "graddiff"), ("sophiag", "idk"), ("sophiag", "dpo"), ("sophiag", "rmu")]


@pytest.mark.parametrize("optimizer, objective", RESUMES)
def test_resume_after_interruption_is_bit_identical_under_every_optimizer(saved, optimizer, objective):
    """Killed at step 9 of 10, resumed from step 6. With hessian_every=4 the refreshes are at 0, 4
    and 8 of the run, not 6 (where the resumed process starts), and the one at 8 must draw the
    same labels as the uninterrupted run."""
    from soir.models import load_model

    tensors, elements = neuron_selection("olmo", broadcast=True)
    Mask.from_selection(load_model(saved / "olmo"), tensors, elements).save(saved / "mask")
    extra = {**OPTIMISER_SETTINGS[optimizer], "hessian_every": 4} if optimizer == "sophiag" else OPTIMISER_SETTINGS[optimizer]
    train = TrainSettings(steps=10, lr=1e-2, weight_decay=0.1, warmup=2, progress=False, seed=3, eval_every=1, save_every=3,
                          optimizer=optimizer, **extra)
    base = dict(objective=objective, mask=str(saved / "mask"), weights=ObjectiveSettings(w_retain=2.0, rmu_alpha=50.0), train=train)
    unlearn(settings_for(saved, "olmo", saved / "straight", **base), dies_at(-1))
    with pytest.raises(Killed):
        unlearn(settings_for(saved, "olmo", saved / "killed", **base), dies_at(9))
    assert sorted(p.name for p in (saved / "killed" / "checkpoints").iterdir()) == ["step-00000003", "step-00000006"]
    unlearn(settings_for(saved, "olmo", saved / "killed", resume=True, **base), dies_at(-1))
    a, b = load_file(saved / "killed" / "model.safetensors"), load_file(saved / "straight" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda text: [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in text.splitlines()]
    logs = [strip((saved / d / "log.jsonl").read_text()) for d in ("killed", "straight")]
    assert logs[0] == logs[1] and len(logs[0]) == 10
    assert logs[0][0]["loss"] != logs[0][-1]["loss"]


@pytest.mark.parametrize("kind", ["tensor", "element"])
def test_bf16_weights_unlearn_through_float32_masters_and_resume_exactly(saved, kind):
    """A bf16 model: the optimiser and the checkpoints hold float32 copies of the selected entries
    only, the written model stays bf16, nothing outside the mask moves, and a resumed run ends
    bit-identical to an uninterrupted one."""
    from soir.models import load_model

    model = load_model(saved / "olmo")
    tensors, elements = (TENSORS["olmo"], {}) if kind == "tensor" else neuron_selection("olmo", broadcast=True)
    mask = Mask.from_selection(model, tensors, elements)
    mask.save(saved / "mask")
    train = TrainSettings(steps=8, lr=1e-2, weight_decay=0.1, warmup=0, progress=False, eval_every=1, save_every=3)
    base = dict(objective="graddiff", mask=str(saved / "mask"), train=train)
    bf16 = lambda out, **kw: replace(settings_for(saved, "olmo", saved / out, **base, **kw), model=ModelSettings(str(saved / "olmo"), dtype="bfloat16"))
    unlearn(bf16("straight"), dies_at(-1))
    with pytest.raises(Killed):
        unlearn(bf16("killed"), dies_at(7))
    unlearn(bf16("killed", resume=True), dies_at(-1))
    before = {k: v.to(torch.bfloat16) for k, v in load_file(saved / "olmo" / "model.safetensors").items()}
    straight, resumed = load_file(saved / "straight" / "model.safetensors"), load_file(saved / "killed" / "model.safetensors")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    for name, value in straight.items():
        assert value.dtype == torch.bfloat16
        keep = mask.element_mask(name) if name in mask.names else torch.zeros(value.shape, dtype=torch.bool)
        assert torch.equal(value[~keep], before[name][~keep]), name
        if name in mask.names:
            assert (value[keep] != before[name][keep]).any(), name
    saved_weights = load_file(saved / "killed" / "checkpoints" / "step-00000006" / "weights.safetensors")
    assert set(saved_weights) == set(mask.names)
    for name, value in saved_weights.items():
        assert value.dtype == torch.float32 and value.numel() == int(mask.element_mask(name).sum()), name


@pytest.mark.parametrize("arch", ["olmo", "gpt2"])
def test_gradient_checkpointing_trains_the_same_weights(saved, arch):
    """Recomputing activations in backward changes memory, not the optimisation (NPO: a reference forward too)."""
    from soir.models import load_model

    Mask.from_names(load_model(saved / arch), TENSORS[arch]).save(saved / "mask")
    train = TrainSettings(steps=3, lr=1e-2, warmup=0, progress=False)
    base = dict(objective="npo", mask=str(saved / "mask"))
    unlearn(settings_for(saved, arch, saved / "plain", train, **base))
    seen = []
    on = lambda model: model.is_activation_checkpointing if hasattr(model, "is_activation_checkpointing") else model.is_gradient_checkpointing
    spy = lambda model, step: seen.append(on(model)) or {}
    unlearn(settings_for(saved, arch, saved / "recomputed", replace(train, gradient_checkpointing=True, eval_every=1), **base), spy)
    assert seen == [False, True, True, True]  # on while training (the first row is before it starts)
    plain, recomputed = load_file(saved / "plain" / "model.safetensors"), load_file(saved / "recomputed" / "model.safetensors")
    moved = [k for k in plain if not torch.equal(plain[k], load_file(saved / arch / "model.safetensors")[k])]
    assert sorted(moved) == sorted(TENSORS[arch])
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


def test_the_gnb_gradient_enters_the_hessian_at_the_selected_entries_only(make_model, tokenizer, qa_frame, tmp_path):
    from soir.data import BatchStream
    from unlearn.masking import MaskedParameters

    model = make_model("gpt2")
    tensors, elements = neuron_selection("gpt2")
    mask = Mask.from_selection(model, tensors, elements)
    masked = MaskedParameters(model, mask)
    stream = BatchStream(encode(qa_frame, tokenizer), 2, pad_id(tokenizer), seed=0)
    objective = get_objective("graddiff")
    trainer = Trainer(model, objective, {"forget": stream, "retain": stream}, TrainSettings(steps=3, optimizer="sophiag", hessian_every=2,
                      lr=1e-2, progress=False), tmp_path, masked=masked)
    seen, inner = [], trainer.optimizer.update_hessian
    params = dict(model.named_parameters())

    def spy(batch_size):
        for name in mask.elements:
            grad, keep = trainer.params[name].grad, mask.element_mask(name).expand(params[name].shape)
            seen.append(grad.shape == (int(keep.sum()),) and bool(grad.abs().sum() > 0) and params[name].grad is None)
        inner(batch_size)

    trainer.optimizer.update_hessian = spy
    trainer.train()
    assert seen == [True] * (2 * len(mask.elements))  # refreshes at steps 0 and 2, every element-masked tensor gathered


def test_block_output_is_the_blocks_hidden_state(make_model, tokenizer, qa_frame, arch):
    from unlearn.objectives import block_output

    model = make_model(arch)
    data = encode(qa_frame, tokenizer)
    batch = collate(data.input_ids, data.labels, pad_id(tokenizer))
    hidden, logits = block_output(model, batch, 0)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    assert torch.equal(hidden.detach(), out.hidden_states[1]) and torch.equal(logits.detach(), out.logits)


# ---------------------------------------------------------------- the command line and the front door


def cli(d, *args):
    return ["unlearn", "--model", str(d / "olmo"), "--forget", str(d / "forget.parquet"), "--retain", str(d / "retain.parquet"),
            "--steps", "3", "--batch-size", "2", "--lr", "1e-2", "--no-progress", "--include", r"layers\.0\.mlp", *args]


@pytest.mark.parametrize("objective, components", [("idk", {"idk_nll", "retain_nll"}), ("dpo", {"dpo", "forget_nll", "idk_nll", "retain_nll"}),
                                                   ("rmu", {"rmu_forget", "rmu_retain", "forget_nll"})])
def test_the_cli_runs_each_method_with_sophia(saved, capsys, objective, components):
    out = saved / objective
    assert main([*cli(saved, "--objective", objective, "--optimizer", "sophiag", "--hessian-every", "2", "--rho", "0.05",
                      "--sophia-betas", "0.9", "0.95", "--out", str(out))]) == 0, capsys.readouterr().err
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and all(components <= row.keys() for row in log)
    record = json.loads((out / "unlearn.json").read_text())
    assert record["settings"]["objective"] == objective and record["settings"]["train"]["optimizer"] == "sophiag"
    assert record["settings"]["train"]["rho"] == 0.05 and record["settings"]["train"]["sophia_betas"] == [0.9, 0.95]
    if objective == "rmu":
        assert record["settings"]["weights"]["rmu_layer"] is None and record["reference"] == "SwapReference"


def test_the_front_door_passes_the_new_settings_through(make_model, tokenizer, qa_frame):
    import soirlab

    model = make_model("olmo")
    mask = Mask.from_names(model, ["model.layers.1.mlp.up_proj.weight"])
    unlearned, result = soirlab.unlearn(model, qa_frame, qa_frame, tokenizer=tokenizer, mask=mask, objective="rmu", rmu_layer=1,
                                        steering_coeff=2.0, rmu_alpha=10.0, optimizer="sophiag", rho=0.03, hessian_every=2,
                                        steps=2, batch_size=2, lr=1e-2, progress=False, copy=True)
    assert result.steps_done == 2 and result.train["optimizer"] == "sophiag" and result.train["rho"] == 0.03
    changed = dict(unlearned.named_parameters())["model.layers.1.mlp.up_proj.weight"]
    assert not torch.equal(changed, dict(model.named_parameters())["model.layers.1.mlp.up_proj.weight"])


def test_registries_and_choices():
    assert {"idk", "dpo", "rmu"} <= set(OBJECTIVES) and {"adamw", "sgd", "sophiag"} <= set(OPTIMIZERS)
    assert all(unlearns(OBJECTIVES[n]) for n in ("idk", "dpo", "rmu")) and not unlearns(OBJECTIVES["finetune"])
    assert {n for n in ("idk", "dpo", "rmu") if OBJECTIVES[n].needs_reference} == {"dpo", "rmu"}
    for name in ("idk", "dpo", "rmu"):
        assert "et al." in OBJECTIVES.help(name) or "TOFU" in OBJECTIVES.help(name)
    assert "Liu et al. 2023" in OPTIMIZERS.help("sophiag")


BAD = {
    "rho zero": (["--optimizer", "sophiag", "--rho", "0"], r"--rho must be a positive number"),
    "rho negative": (["--rho=-0.1"], r"--rho must be a positive number"),
    "beta of one": (["--sophia-betas", "1", "0.9"], r"--sophia-betas must be two numbers in \[0, 1\)"),
    "hessian every zero": (["--hessian-every", "0"], r"--hessian-every must be a whole number of steps >= 1"),
    "eps zero": (["--sophia-eps", "0"], r"--sophia-eps must be a positive number"),
    "unknown optimizer": (["--optimizer", "lion"], r"invalid choice: 'lion'"),
    "rmu layer out of range": (["--objective", "rmu", "--rmu-layer", "5"], r"--rmu-layer 5 is out of range: this model has 2 blocks"),
    "rmu layer negative": (["--objective", "rmu", "--rmu-layer", "-1"], r"--rmu-layer -1 is negative"),
    "steering zero": (["--objective", "rmu", "--steering-coeff", "0"], r"steering_coeff=0.0 must be > 0"),
    "dpo beta zero": (["--objective", "dpo", "--beta", "0"], r"objective dpo: beta=0.0 must be > 0"),
    "idk weights zero": (["--objective", "idk", "--w-forget", "0", "--w-retain", "0"], r"weights sum to zero"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_values_are_one_line_and_write_nothing(saved, capsys, case):
    args, message = BAD[case]
    out = saved / "bad"
    try:
        code = main([*cli(saved, *args), "--out", str(out)])
    except SystemExit as exit:  # argparse's own checks (a choice that does not exist) exit from the parser
        code = exit.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.match(r"soir( unlearn)?: error:", err[0]), err
    assert re.search(message, err[0]), err[0]
    assert not out.exists()


def test_bad_values_in_python_are_user_errors():
    for bad in (dict(rho=0.0), dict(rho=float("nan")), dict(sophia_betas=(0.9, 1.0)), dict(hessian_every=0), dict(sophia_eps=-1.0),
                dict(optimizer="nope")):
        with pytest.raises(UserError) as error:
            TrainSettings(**bad)
        assert "\n" not in str(error.value)
    with pytest.raises(UserError, match="unknown optimizer 'nope'"):
        TrainSettings(optimizer="nope")
    with pytest.raises(UserError, match="--rho"):
        SophiaG([torch.nn.Parameter(torch.zeros(2))], rho=-1.0)
