"""Segmentation models under patient-level DP: U-Nets, Dice+CE loss, Dice/IoU metrics, Opacus training.

All real: MONAI models and metrics, Opacus through carefl's own ``privacy.dp_sgd.make_private``.
One dataset item is one patient (a small random crop standing in for a patient's volume or slice).
"""

from __future__ import annotations

import math

import pytest
import torch
from monai.losses import DiceCELoss
from monai.networks.nets import UNet
from opacus.validators import ModuleValidator
from torch import nn

from privacy.dp_sgd import make_private
from shared_models import seg_metrics
from shared_models.registry import build_model, get_spec
from shared_models.seg_losses import DiceCE, per_sample_dice_ce
from shared_models.unet import check_dp_compatible, functorch_fallback_layers, unet3d

N_PATIENTS = 6
CROP = {"seg-unet2d": (32, 32), "seg-unet3d": (16, 16, 16)}  # tiny crops: multiples of 8 = 2·2·2


def _patients(name: str, seed: int = 0) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    shape = CROP[name]
    return torch.utils.data.TensorDataset(torch.randn(N_PATIENTS, 1, *shape, generator=g),
                                          torch.randint(0, 3, (N_PATIENTS, 1, *shape), generator=g))


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


# ---- models ----

@pytest.mark.parametrize("name,shape", [("seg-unet2d", (2, 1, 64, 64)), ("seg-unet3d", (2, 1, 32, 32, 32))])
def test_unets_build_run_and_pass_the_opacus_validator(name, shape):
    torch.manual_seed(0)
    model = build_model(name)
    assert get_spec(name).task == "seg"
    out = model(torch.randn(*shape))
    assert out.shape == (shape[0], 3, *shape[2:]) and torch.isfinite(out).all()
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert ModuleValidator.validate(model, strict=False) == []
    assert functorch_fallback_layers(model) == []  # every parameterised layer has a native grad sampler
    assert model.min_spatial_multiple == 8


def test_registry_kwargs_reach_the_builder():
    """Coordinator and sites call build_model(name, **kwargs) with the same kwargs: they must matter."""
    small = build_model("seg-unet3d", channels=(8, 16), strides=(2,), num_res_units=0)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in build_model("seg-unet3d").parameters())
    grouped = build_model("seg-unet2d", norm=["group", {"num_groups": 4}], num_res_units=0)  # JSON list form
    assert any(isinstance(m, nn.GroupNorm) for m in grouped.modules())
    assert ModuleValidator.validate(grouped, strict=False) == []


def test_configurations_dp_cannot_train_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="BatchNorm"):
        unet3d(norm="batch")
    with pytest.raises(ValueError, match="tuple form"):
        unet3d(norm="group")
    with pytest.raises(ValueError, match=r"does not divide \[3\]"):  # residual units normalise out_channels=3
        unet3d(norm=("group", {"num_groups": 4}), num_res_units=1)
    with pytest.raises(ValueError, match="PReLU has no Opacus grad sampler"):
        unet3d(act="prelu")
    with pytest.raises(ValueError, match="in-place"):
        unet3d(act=("relu", {"inplace": True}))
    stock = UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=(8, 16), strides=(2,))
    with pytest.raises(ValueError, match="ConvTranspose3d has no Opacus grad sampler"):
        check_dp_compatible(stock)


def test_the_decoder_up_sampling_is_a_transposed_convolution_with_kernel_equal_to_stride():
    """1×1 conv + pixel shuffle (native Opacus sampler) computes exactly ConvTranspose3d(k=2, s=2)."""
    torch.manual_seed(8)
    up = next(m for m in build_model("seg-unet3d").modules() if type(m).__name__ == "SubpixelUpsample")
    conv = up.conv_block
    c_in, c_out = conv.in_channels, conv.out_channels // 8
    transposed = nn.ConvTranspose3d(c_in, c_out, kernel_size=2, stride=2)
    with torch.no_grad():  # ConvTranspose weight [in, out, 2, 2, 2] ↔ 1×1 conv weight [out·8, in, 1, 1, 1]
        conv.weight.normal_()  # ICNR starts all 8 sub-voxels equal, which would hide an ordering error
        transposed.weight.copy_(conv.weight.reshape(c_out, 2, 2, 2, c_in).permute(4, 0, 1, 2, 3))
        conv.bias.copy_(torch.randn(c_out).repeat_interleave(8))
        transposed.bias.copy_(conv.bias[::8])
    x = torch.randn(2, c_in, 3, 4, 5)
    torch.testing.assert_close(up(x), transposed(x), rtol=1e-4, atol=1e-5)


def test_a_patients_output_does_not_depend_on_the_rest_of_the_batch():
    torch.manual_seed(1)
    model = build_model("seg-unet3d").train()
    x = torch.randn(3, 1, 16, 16, 16)
    torch.testing.assert_close(model(x)[:1], model(x[:1]), rtol=1e-4, atol=2e-5)  # float noise only


# ---- loss ----

@pytest.mark.parametrize("include_background,lambdas", [(True, (1.0, 1.0)), (False, (0.7, 0.3))])
def test_per_sample_dice_ce_is_monai_dice_ce_per_patient(include_background, lambdas):
    torch.manual_seed(2)
    logits, labels = torch.randn(4, 3, 8, 8, 8), torch.randint(0, 3, (4, 1, 8, 8, 8))
    labels[1][labels[1] == 2] = 0  # a patient without class 2
    per = per_sample_dice_ce(logits, labels, *lambdas, include_background=include_background)
    monai = DiceCELoss(include_background=include_background, to_onehot_y=True, softmax=True, batch=False,
                       lambda_dice=lambdas[0], lambda_ce=lambdas[1])(logits, labels)
    assert per.shape == (4,)
    torch.testing.assert_close(per.mean(), monai, rtol=1e-6, atol=0.0)
    torch.testing.assert_close(DiceCE(*lambdas, include_background)(logits, labels), monai)
    for i in range(4):  # each entry is that patient's loss alone
        torch.testing.assert_close(per[i], per_sample_dice_ce(logits[i:i + 1], labels[i:i + 1], *lambdas,
                                                              include_background=include_background)[0])


def test_changing_one_patient_changes_only_that_patients_loss_and_gradient():
    """batch=False decouples patients; MONAI's batch=True (shown for contrast) does not."""
    torch.manual_seed(3)
    logits, labels = torch.randn(4, 3, 8, 8), torch.randint(0, 3, (4, 1, 8, 8))
    logits2, labels2 = logits.clone(), labels.clone()
    logits2[2], labels2[2] = torch.randn(3, 8, 8), torch.randint(0, 3, (1, 8, 8))

    def grad_of_patient0(loss_fn, lg, lb):
        lg = lg.clone().requires_grad_(True)
        loss_fn(lg, lb).backward()
        return lg.grad[0]

    a, b = per_sample_dice_ce(logits, labels), per_sample_dice_ce(logits2, labels2)
    assert torch.equal(a[[0, 1, 3]], b[[0, 1, 3]]) and a[2] != b[2]
    ours = DiceCE().summed
    assert torch.equal(grad_of_patient0(ours, logits, labels), grad_of_patient0(ours, logits2, labels2))
    coupled = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
    assert not torch.allclose(grad_of_patient0(coupled, logits, labels), grad_of_patient0(coupled, logits2, labels2))


def test_loss_of_an_empty_batch_is_empty_and_differentiable():
    logits = torch.zeros(0, 3, 16, 16, 16, requires_grad=True)
    labels = torch.zeros(0, 1, 16, 16, 16, dtype=torch.long)
    per = per_sample_dice_ce(logits, labels)
    assert per.shape == (0,)
    total = DiceCE().summed(logits, labels)
    total.backward()
    assert total.item() == 0.0 and logits.grad.shape == logits.shape
    assert DiceCE()(logits, labels).item() == 0.0


# ---- metrics ----

def test_dice_and_iou_against_hand_counts():
    truth = torch.tensor([[0, 1, 1, 0],
                          [0, 1, 1, 0],
                          [2, 2, 0, 0],
                          [0, 0, 0, 0]])
    pred = torch.tensor([[0, 1, 1, 1],
                         [0, 1, 0, 0],
                         [2, 0, 0, 0],
                         [0, 0, 0, 2]])
    # class 1: |T|=4, |P|=4, |P∩T|=3 → Dice 6/8, IoU 3/5;  class 2: |T|=2, |P|=2, ∩=1 → Dice 2/4, IoU 1/3
    # background: |T|=10, |P|=10, ∩=8 → Dice 16/20, IoU 8/12
    dice = seg_metrics.dice_per_class(pred[None], truth[None])  # [B=1, H, W]
    iou = seg_metrics.iou_per_class(pred[None, None], truth[None, None])  # [B=1, 1, H, W]
    assert dice == pytest.approx([16 / 20, 6 / 8, 2 / 4])
    assert iou == pytest.approx([8 / 12, 3 / 5, 1 / 3])
    assert seg_metrics.mean_foreground_dice(pred[None], truth[None]) == pytest.approx((6 / 8 + 2 / 4) / 2)
    dice_cases, iou_cases = seg_metrics.per_case(pred[None], truth[None])
    assert dice_cases[0].tolist() == pytest.approx([16 / 20, 6 / 8, 2 / 4]) and iou_cases[0, 2] == pytest.approx(1 / 3)

    # second case: class 2 absent in truth and prediction; class 1 perfect
    empty_both = torch.zeros(1, 4, 4, dtype=torch.long)
    empty_both[0, 0, 0] = 1
    both = (torch.stack([pred, empty_both[0]]), torch.stack([truth, empty_both[0]]))
    assert seg_metrics.dice_per_class(*both) == pytest.approx([(16 / 20 + 1) / 2, (6 / 8 + 1) / 2, (2 / 4 + 1.0) / 2])
    # MONAI's ignore_empty=True would skip the case for class 2 instead of counting it as 1.0
    assert seg_metrics.dice_per_class(*both, ignore_empty=True)[2] == pytest.approx(2 / 4)
    # class 2 absent in truth but predicted: a false positive scores 0
    fp = empty_both.clone()
    fp[0, 3, 3] = 2
    assert seg_metrics.dice_per_class(fp, empty_both)[2] == 0.0
    assert seg_metrics.iou_per_class(fp, empty_both)[2] == 0.0
    report = seg_metrics.seg_report(*both)
    assert all(type(v) is float for v in report.values())
    assert report["dice-2"] == pytest.approx(0.75) and report["cases"] == 2.0


def test_pooled_sums_give_the_case_mean_dice_of_all_sites():
    from server.metrics import pooled_metrics, site_figures
    from shared_models.eval_release import seg_layout, seg_vectors

    g = torch.Generator().manual_seed(4)
    sites = [(torch.randint(0, 3, (n, 1, 12, 10), generator=g), torch.randint(0, 3, (n, 1, 12, 10), generator=g))
             for n in (3, 1, 5)]
    releases = [{**seg_layout(3).unpack(seg_vectors(*seg_metrics.per_case(p, t)).sum(axis=0)), "eval-dp": 0.0,
                 "noise-std": 0.0} for p, t in sites]
    pooled = pooled_metrics(releases)
    every_case = seg_metrics.dice_per_class(*map(torch.cat, zip(*sites)))  # the mean over all 9 cases
    assert [pooled["pooled_dice_1"], pooled["pooled_dice_2"]] == pytest.approx(every_case[1:], rel=1e-6)
    assert pooled["pooled_dice"] == pytest.approx((every_case[1] + every_case[2]) / 2, rel=1e-6)
    site_dice = [seg_metrics.mean_foreground_dice(p, t) for p, t in sites]
    assert pooled["mean_dice"] == pytest.approx(sum(site_dice) / 3, rel=1e-6)  # each site weighs the same
    assert site_figures(releases[0])["iou_1"] == pytest.approx(seg_metrics.iou_per_class(*sites[0])[1], rel=1e-6)


# ---- DP-SGD through carefl's make_private ----

@pytest.mark.parametrize("name", ["seg-unet2d", "seg-unet3d"])
def test_dp_training_on_patient_crops_runs_and_survives_empty_poisson_batches(name):
    torch.manual_seed(5)
    model = build_model(name)
    start = _flat(model)
    loss_fn = DiceCE().summed
    # B = 1 of N = 6 patients: P(empty batch) = (5/6)^6 ≈ 33% per step
    private = make_private(model, _patients(name), batch_size=1, lr=0.05, optimizer="sgd",
                           noise_multiplier=0.0, clip_norm=1.0)
    private.loader.batch_sampler.generator = torch.Generator().manual_seed(0)  # reproducible batches in this test
    losses, empty = [], 0
    try:
        for xb, yb in private.batches(12):
            before = _flat(model)
            private.optimizer.zero_grad()
            loss = loss_fn(private.module(xb), yb)
            loss.backward()
            private.optimizer.step()
            if len(yb) == 0:  # σ = 0: a noise-only step of an empty batch must leave the weights alone
                empty += 1
                assert torch.equal(_flat(model), before)
            else:
                losses.append(loss.item() / len(yb))
    finally:
        private.close()
    assert empty >= 1, "the seeded sampler was expected to draw an empty batch"
    assert losses and all(math.isfinite(v) for v in losses)
    after = _flat(model)
    assert torch.isfinite(after).all() and not torch.equal(after, start)

    # with noise, an empty batch is a real (noise-only) step
    private = make_private(model, _patients(name), batch_size=1, lr=0.05, optimizer="sgd",
                           noise_multiplier=1.0, clip_norm=1.0)
    collate = private.loader.collate_fn
    collate([_patients(name)[0]])  # Opacus learns the batch structure from a non-empty batch
    xb, yb = collate([])
    assert len(xb) == 0
    before = _flat(model)
    private.optimizer.zero_grad()
    loss_fn(private.module(xb), yb).backward()
    private.optimizer.step()
    private.close()
    assert not torch.equal(_flat(model), before) and torch.isfinite(_flat(model)).all()


@pytest.mark.parametrize("name", ["seg-unet2d", "seg-unet3d"])
def test_clipped_noise_free_unet_step_equals_per_patient_reference(name):
    """σ = 0 isolates clipping: one DP-SGD step must equal −lr/B · Σ clip(∇ℓ_i, C), one patient at a time."""
    torch.manual_seed(6)
    model = build_model(name)
    x, y = _patients(name, seed=7).tensors
    loss_fn = DiceCE().summed
    start = _flat(model)
    grads = []
    for i in range(N_PATIENTS):
        model.zero_grad()
        loss_fn(model(x[i:i + 1]), y[i:i + 1]).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    grads = torch.stack(grads)
    clip = float(grads.norm(dim=1).median())  # half the patients get clipped
    factors = (clip / (grads.norm(dim=1) + 1e-6)).clamp(max=1.0)
    expected = -(1.0 / N_PATIENTS) * (factors[:, None] * grads).sum(0)

    private = make_private(model, torch.utils.data.TensorDataset(x, y), batch_size=N_PATIENTS, lr=1.0,
                           optimizer="sgd", noise_multiplier=0.0, clip_norm=clip)
    private.optimizer.zero_grad()
    loss_fn(private.module(x), y).backward()
    private.optimizer.step()
    private.close()
    delta = _flat(model) - start
    assert torch.linalg.norm(delta - expected) / torch.linalg.norm(expected) < 1e-4
