"""carefl's per-sample clipping engine (privacy/per_sample.py) is exact: every test compares it with
the definition — one patient at a time through plain autograd, each gradient (over all trainable
parameters jointly) scaled by min(1, C / (‖g_i‖ + 1e-6)), summed — or with Opacus on the same
batches. The parity runs in float64, where any algorithmic difference would show far above rounding,
and once more in float32 (the kernels a site really runs) against the float64 reference.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from client import training
from privacy import dp_sgd
from privacy.dp_sgd import make_private, resolve_engine
from privacy.per_sample import unsupported_layers
from privacy.policy import DPRequest
from shared_models.registry import build_model
from shared_models.seg_losses import DiceCE


@pytest.fixture(autouse=True)
def _one_thread():
    """pytest-xdist runs two modules at once on 2 cores; restored afterwards for the other modules."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _bce(logits, y):
    return F.binary_cross_entropy_with_logits(logits, y, reduction="none")


class _Zoo(nn.Module):
    """Every layer kind and path the engine has that carefl's registered models do not reach."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(3, 4, 3, stride=2, dilation=2, padding=2)
        self.c2 = nn.Conv2d(4, 6, 3, padding="same", groups=2, padding_mode="reflect")
        self.gn = nn.GroupNorm(2, 6)
        self.inorm = nn.InstanceNorm2d(6, affine=True)
        self.ln = nn.LayerNorm(6)
        self.pw = nn.Conv2d(6, 6, 1)
        self.seq_short = nn.Linear(6, 40)  # [B, 5, 6] input: Gram-matrix ghost norm (5·(6+40) < 6·40)
        self.seq_long = nn.Linear(40, 1)   # [B, 20, 40] input: per-sample gradient materialised
        self.shared = nn.Linear(40, 40)    # called twice in one forward: its calls stacked, then Gram
        self.gn_flat = nn.GroupNorm(4, 40)  # on [B, C]: no spatial dims
        self.frozen = nn.Linear(40, 1)
        self.frozen.weight.requires_grad_(False)  # only its bias trains

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # x [B, 3, 9]
        h = self.c1(x)                                      # [B, 4, 5]
        h = h[:, :, :, None] * h[:, :, None, :]             # [B, 4, 5, 5]
        h = self.inorm(self.gn(self.c2(h)))                 # [B, 6, 5, 5]
        h = self.pw(torch.relu(h))
        s = self.seq_short(self.ln(h.mean(3).transpose(1, 2)))  # [B, 5, 6] -> [B, 5, 40]
        long = self.seq_long(s.repeat(1, 4, 1))            # [B, 20, 1]
        v = self.shared(torch.tanh(self.shared(s.mean(1))))  # [B, 40]
        return self.frozen(self.gn_flat(v)).squeeze(-1) + long.mean((1, 2))


def _case(name: str, b: int, seed: int = 0):
    """(model, inputs, labels, per-patient loss) for a small batch of ``b`` patients."""
    g = torch.Generator().manual_seed(seed)
    if name in ("ehr-logreg", "ehr-mlp"):
        return build_model(name, n_features=13), (torch.randn(b, 13, generator=g),), \
            (torch.rand(b, generator=g) > 0.5).float(), _bce
    if name == "ehr-gru-attn":
        x, lengths = torch.randn(b, 10, 8, generator=g), torch.randint(1, 11, (b,), generator=g)
        return build_model(name, n_features=8), (x, lengths), (torch.rand(b, generator=g) > 0.5).float(), _bce
    if name == "zoo":
        return _Zoo(), (torch.randn(b, 3, 9, generator=g),), (torch.rand(b, generator=g) > 0.5).float(), _bce
    shape = (16, 16) if name == "seg-unet2d" else (8, 16, 16)
    x = torch.randn(b, 1, *shape, generator=g)
    y = (x > 0.3).long() + (x > 1.2).long()  # 3 classes that follow the image
    return build_model(name), (x,), y, DiceCE().per_sample


def _cast(t: torch.Tensor, dtype) -> torch.Tensor:
    return t.to(dtype) if t.is_floating_point() else t


def _reference(model: nn.Module, inputs, y, loss, clip: float | None):
    """Σ_i min(1, C/(‖g_i‖+1e-6)) g_i, one patient at a time; the norms; the factors."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(len(y)):
        li = loss(model(*(t[i:i + 1] for t in inputs)), y[i:i + 1]).sum()
        grads = torch.autograd.grad(li, params, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(params, grads)]))
    rows = torch.stack(rows)
    norms = rows.norm(dim=1)
    clip = float(norms.median()) if clip is None else clip
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    return (factors[:, None] * rows).sum(0), factors, clip


def _fast_clipped_sum(model, inputs, y, loss, clip: float, engine: str = "fast", device="cpu"):
    """One DP step with σ = 0 through make_private; the clipped sum is then every p.grad (the step's
    update is undone, so the model can be measured again)."""
    start = [p.detach().clone() for p in model.parameters()]
    data = torch.utils.data.TensorDataset(*inputs, y)
    private = make_private(model, data, batch_size=len(y), lr=1.0, optimizer="sgd", noise_multiplier=0.0,
                           clip_norm=clip, device=device, engine=engine)
    assert private.engine == engine
    try:
        private.optimizer.zero_grad()
        loss(private.module(*inputs), y).sum().backward()
        private.optimizer.step()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
        factors = getattr(private.optimizer, "last_clip_factors", None)
    finally:
        private.close()
        with torch.no_grad():
            for p, s in zip(model.parameters(), start):
                p.copy_(s)
    return grads, factors


MODELS = ["ehr-logreg", "ehr-mlp", "ehr-gru-attn", "seg-unet2d", "seg-unet3d", "zoo"]


@pytest.mark.parametrize("name", MODELS)
def test_clipped_sum_equals_one_patient_at_a_time_reference(name):
    torch.manual_seed(1)
    b = 3 if name.startswith("seg") else 8
    model, inputs, y, loss = _case(name, b)
    assert unsupported_layers(model) == [] and resolve_engine(model, "auto") == "fast"

    # float64: the algorithm itself (ghost norms, grouped convolutions, Gram matrices, shared layers)
    model64, inputs64 = model.double(), tuple(_cast(t, torch.float64) for t in inputs)
    expected, factors, clip = _reference(model64, inputs64, y, loss, None)
    assert (factors < 1).any() and (factors == 1).any(), "C must clip some patients and not others"
    got, got_factors = _fast_clipped_sum(model64, inputs64, y, loss, clip)
    assert torch.linalg.norm(got - expected) / torch.linalg.norm(expected) < 1e-10
    assert torch.allclose(got_factors, factors, rtol=1e-10, atol=0)

    # float32: the kernels a site runs (oneDNN grouped convolutions), against the float64 truth
    model32 = model64.float()
    got32, _ = _fast_clipped_sum(model32, inputs, y, loss, clip)
    assert torch.linalg.norm(got32.double() - expected) / torch.linalg.norm(expected) < 1e-5


@pytest.mark.parametrize("name", ["ehr-mlp", "seg-unet2d"])
def test_same_clipped_sum_as_opacus(name):
    model, inputs, y, loss = _case(name, 6, seed=3)
    fast, _ = _fast_clipped_sum(model, inputs, y, loss, 0.05)
    opacus, _ = _fast_clipped_sum(model, inputs, y, loss, 0.05, engine="opacus")
    assert torch.linalg.norm(fast - opacus) / torch.linalg.norm(opacus) < 1e-5


@pytest.mark.parametrize("name", ["ehr-logreg", "ehr-mlp", "ehr-gru-attn", "seg-unet2d", "zoo"])
def test_empty_batch_is_a_noise_only_step(name):
    model, inputs, y, loss = _case(name, 4)
    empty = tuple(t[:0] for t in inputs)
    flat = lambda: torch.cat([p.detach().flatten() for p in model.parameters()])
    for sigma in (0.0, 1.0):
        private = make_private(model, torch.utils.data.TensorDataset(*inputs, y), batch_size=2, lr=0.1,
                               optimizer="sgd", noise_multiplier=sigma, clip_norm=1.0, engine="fast")
        before = flat()
        private.optimizer.zero_grad()
        loss(private.module(*empty), y[:0]).sum().backward()
        private.optimizer.step()
        private.close()
        after = flat()
        assert torch.isfinite(after).all()
        assert torch.equal(after, before) if sigma == 0 else not torch.equal(after, before)
    # the Poisson loader's own empty batch goes through too
    private = make_private(model, torch.utils.data.TensorDataset(*inputs, y), batch_size=1, lr=0.1,
                           optimizer="sgd", noise_multiplier=1.0, clip_norm=1.0, engine="fast")
    collate = private.loader.collate_fn
    collate([private.loader.dataset[0]])  # Opacus learns the batch structure from a non-empty batch
    *xb, yb = collate([])
    assert len(yb) == 0
    private.optimizer.zero_grad()
    loss(private.module(*xb), yb).sum().backward()
    private.optimizer.step()
    private.close()


def test_noise_is_one_gaussian_draw_of_std_sigma_c_from_a_secret_generator():
    sigma, clip, p_count = 1.5, 2.0, 400 * 250 + 250

    def noise_of_one_empty_step() -> torch.Tensor:
        torch.manual_seed(0)  # the global seed must not reach the noise
        model = nn.Linear(400, 250)
        start = torch.cat([p.detach().flatten() for p in model.parameters()])
        data = torch.utils.data.TensorDataset(torch.randn(4, 400), torch.randn(4, 250))
        private = make_private(model, data, batch_size=1, lr=1.0, optimizer="sgd", noise_multiplier=sigma,
                               clip_norm=clip, engine="fast")  # SGD lr/B = 1: the step is −noise
        private.optimizer.zero_grad()
        private.module(torch.randn(0, 400)).sum().backward()
        private.optimizer.step()
        private.close()
        return start - torch.cat([p.detach().flatten() for p in model.parameters()])

    noise = noise_of_one_empty_step().double()
    assert noise.numel() == p_count
    z = noise / (sigma * clip)
    # n ≈ 1e5 draws: the standard errors are 0.0022 (std), 0.0032 (mean), 0.0015 (mass within 1σ);
    # every bound below is ≥ 9 standard errors wide, so a correct engine cannot fail it
    assert abs(float(z.std()) - 1.0) < 0.03
    assert abs(float(z.mean())) < 0.03
    assert abs(float((z.abs() < 1).double().mean()) - math.erf(1 / math.sqrt(2))) < 0.015
    assert not torch.equal(noise, noise_of_one_empty_step())  # fresh entropy, not torch.manual_seed


def test_training_rounds_match_opacus_with_noise_off(monkeypatch):
    """The same seeded Poisson batches through client/training.py: same losses, same weights."""
    monkeypatch.setattr(dp_sgd, "secret_generator", lambda device="cpu": torch.Generator(device).manual_seed(7))
    settings = training.TrainSettings(local_steps=8, local_epochs=1, batch_size=8, optimizer="sgd", lr=0.5)
    x, y = torch.randn(48, 13), (torch.rand(48) > 0.5).float()
    data = torch.utils.data.TensorDataset(x, y)
    runs = {}
    for engine, physical in (("opacus", 256), ("fast", 256), ("opacus", 3), ("fast", 3)):  # 3: split (BMM)
        monkeypatch.setenv("CAREFL_DP_ENGINE", engine)
        torch.manual_seed(0)
        model = build_model("ehr-mlp", n_features=13)
        result = training.train_dataset(model, data, settings, torch.device("cpu"), training.binary_per_sample,
                                        DPRequest(True, 0.0, 0.5), max_physical_batch=physical)
        runs[engine, physical] = result["train-loss"], torch.cat([p.detach().flatten() for p in model.parameters()])
    for physical in (256, 3):  # the loss is a mean over physical batches, so compare like with like
        assert runs["fast", physical][0] == pytest.approx(runs["opacus", physical][0], rel=1e-5)
    reference = runs["opacus", 256][1]  # σ = 0: splitting a logical batch changes nothing in the update
    for _, weights in runs.values():
        assert torch.linalg.norm(weights - reference) / torch.linalg.norm(reference) < 1e-5


def test_accountant_counts_logical_steps():
    model, inputs, y, loss = _case("ehr-mlp", 8)
    private = make_private(model, torch.utils.data.TensorDataset(*inputs, y), batch_size=4, lr=0.1,
                           optimizer="sgd", noise_multiplier=1.1, clip_norm=1.0, engine="fast")
    for _ in range(3):
        private.optimizer.zero_grad()
        loss(private.module(*inputs), y).sum().backward()
        private.optimizer.step()
    private.close()
    assert private.accountant.history == [(1.1, 0.5, 3)]


def test_unsupported_layers_fall_back_to_opacus_or_are_refused():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 1), nn.PReLU())
    problems = unsupported_layers(model)
    assert any("Embedding" in p for p in problems) and any("PReLU" in p for p in problems)
    assert resolve_engine(model, "auto") == "opacus"
    data = torch.utils.data.TensorDataset(torch.randint(0, 10, (8, 2)), torch.zeros(8))
    with pytest.raises(ValueError, match="Embedding"):
        make_private(model, data, batch_size=4, lr=0.1, optimizer="sgd", noise_multiplier=1.0, clip_norm=1.0,
                     engine="fast")
    private = make_private(model, data, batch_size=4, lr=0.1, optimizer="sgd", noise_multiplier=1.0,
                           clip_norm=1.0)
    assert private.engine == "opacus"
    private.close()
    with pytest.raises(ValueError, match="DP engine"):
        resolve_engine(model, "fastest")


def test_site_setting_selects_plain_opacus(monkeypatch):
    model, inputs, y, _ = _case("ehr-mlp", 4)
    data = torch.utils.data.TensorDataset(*inputs, y)
    assert make_private(model, data, 2, 0.1, "sgd", 1.0, 1.0).engine == "fast"  # the default for carefl's models
    monkeypatch.setenv("CAREFL_DP_ENGINE", "opacus")
    private = make_private(model, data, 2, 0.1, "sgd", 1.0, 1.0)
    assert private.engine == "opacus"
    private.close()


def test_model_is_given_back_unchanged_and_misuse_is_refused():
    model, inputs, y, loss = _case("zoo", 4)
    with torch.no_grad():
        before = model(*inputs)
    private = make_private(model, torch.utils.data.TensorDataset(*inputs, y), batch_size=4, lr=0.1,
                           optimizer="sgd", noise_multiplier=1.0, clip_norm=1.0, engine="fast")
    with torch.no_grad():  # attached, without gradients: the modules' own forward
        assert torch.equal(private.module(*inputs), before)
    private.optimizer.zero_grad()
    for _ in range(2):  # two batches before one step would mix patients of different batches
        loss(private.module(*inputs), y).sum().backward()
    with pytest.raises(RuntimeError, match="more than one forward pass"):
        private.optimizer.step()
    private.close()
    assert not any("forward" in vars(m) for m in model.modules())
    assert not model._forward_pre_hooks
    with torch.no_grad():
        assert torch.equal(model(*inputs), before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", ["ehr-mlp", "seg-unet2d"])
def test_clipped_sum_on_cuda(name):
    model, inputs, y, loss = _case(name, 4)
    expected, _, clip = _reference(model.double(), tuple(_cast(t, torch.float64) for t in inputs), y, loss, None)
    model = model.float().cuda()
    got, _ = _fast_clipped_sum(model, tuple(t.cuda() for t in inputs), y.cuda(), loss, clip, device="cuda")
    assert torch.linalg.norm(got.double().cpu() - expected) / torch.linalg.norm(expected) < 1e-4
