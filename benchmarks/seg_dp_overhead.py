"""DP-SGD step time over plain step time for the segmentation U-Nets, measured in one run (issue 8).

Same model (same initial weights), same batch, SGD, Dice+CE; three steps interleaved in blocks, one
torch thread, median over repeats: non-DP (mean loss), Opacus (``make_private(engine="opacus")``,
hooks mode, as carefl ran it before) and carefl (``make_private(engine="fast")``:
``privacy/per_sample.py``, per-sample convolution gradients by one grouped-convolution
weight-backward call, no summed gradient, one flat noise draw). Each step is split into forward /
backward / update, and the convolutions' weight-gradient kernels are timed on their own (summed, as
the non-DP backward computes them, against per-sample, as the carefl backward does) to show what
the remaining DP cost is made of. ``--full`` adds larger inputs and MONAI's stock ``UNet`` (PReLU,
transposed convolutions: no per-sample rule in carefl's engine, so it runs on Opacus).

    python -m benchmarks.seg_dp_overhead [--full] [--repeats-2d N] [--repeats-3d N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from benchmarks.dp_overhead import PHASES, interleaved, phased
from benchmarks.figures import Figure, markdown_table
from privacy import per_sample
from privacy.dp_sgd import make_private, resolve_engine
from shared_models.registry import build_model
from shared_models.seg_losses import DiceCE
from shared_models.unet import DEFAULT_CHANNELS, DEFAULT_STRIDES

GOAL = 1.3


def seg_steps(build: Callable[[], nn.Module], shape: tuple[int, ...], batch: int):
    """Non-DP, Opacus and (when it supports the model) carefl steps; the PrivateTrainings to close."""
    torch.manual_seed(0)
    x = torch.randn(batch, 1, *shape)
    y = (x > 0.3).long() + (x > 1.2).long()
    loss = DiceCE()
    plain = build()
    state = {k: v.clone() for k, v in plain.state_dict().items()}
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.01)
    steps = {"non-DP": phased(plain_opt.zero_grad, lambda: loss(plain(x), y), plain_opt.step)}
    patients = torch.utils.data.TensorDataset(torch.randn(4 * batch, 1, *shape),
                                              torch.zeros(4 * batch, 1, *shape).long())
    privates = []
    engines = ["opacus"] + (["fast"] if resolve_engine(plain, "auto") == "fast" else [])
    for engine in engines:
        model = build()
        model.load_state_dict(state)
        private = make_private(model, patients, batch_size=batch, lr=0.01, optimizer="sgd", noise_multiplier=1.0,
                               clip_norm=1.0, engine=engine)
        privates.append(private)
        steps[engine] = phased(private.optimizer.zero_grad, lambda p=private: loss.summed(p.module(x), y),
                               private.optimizer.step)
    return steps, privates, sum(p.numel() for p in plain.parameters()), (x, y)


def conv_kernel_cost(build: Callable[[], nn.Module], x: torch.Tensor, y: torch.Tensor,
                     repeats: int = 5) -> tuple[float, float, float, float]:
    """Seconds, summed over the model's convolutions, of the weight-gradient kernels: summed over the
    batch (what the non-DP backward computes), per sample as carefl's backward computes them, and per
    sample as Opacus's conv grad sampler does (unfold + einsum); and of one noise draw for all
    parameters."""
    from opacus.grad_sample.conv import compute_conv_grad_sample

    model = build()
    clipper = per_sample.PerSampleClipper(model)
    seen: list[tuple] = []
    original = per_sample._ConvLayer.per_sample

    def spy(layer, a, g):
        seen.append((layer, a, g))
        return original(layer, a, g)

    per_sample._ConvLayer.per_sample = spy
    try:
        DiceCE().summed(model(x), y).backward()
    finally:
        per_sample._ConvLayer.per_sample = original
        clipper.detach()
    clock = time.perf_counter

    def timed(fn) -> float:
        fn()
        samples = []
        for _ in range(repeats):
            t = clock()
            fn()
            samples.append(clock() - t)
        return statistics.median(samples)

    summed = per = opacus = 0.0
    for layer, a, g in seen:
        summed += timed(lambda L=layer, a=a, g=g: per_sample._conv_backward(
            g, a, L.weight, None, L.stride, L.padding, L.dilation, False, L.output_padding, L.groups,
            [False, True, False]))
        per += timed(lambda L=layer, a=a, g=g: L.method(L, a, g))
        opacus += timed(lambda L=layer, a=a, g=g: compute_conv_grad_sample(L.module, [a], g))
    flat = torch.empty(sum(p.numel() for p in model.parameters()))
    noise = timed(lambda: flat.normal_(0.0, 1.0))
    return summed, per, opacus, noise


def torch_func_step(build: Callable[[], nn.Module], x: torch.Tensor, y: torch.Tensor, classes: int = 3,
                    compile_: bool = False) -> Callable[[], torch.Tensor]:
    """The alternative measured for the record (``--torch-func``): per-sample gradients of the whole
    per-patient loss with ``torch.func.vmap(grad(...))``, then clip, sum and noise in one flat tensor.

    MONAI's ``DiceLoss`` cannot run under vmap (its one-hot is an in-place ``scatter_``), so the loss
    here is the same Dice (per patient, softmax, background included) + CE written with out-of-place
    ops on pre-computed one-hot labels. It needs the loss *inside* the vmapped function, which
    carefl's training interface (the caller computes the loss) does not give the engine."""
    import torch.nn.functional as F
    from torch.func import functional_call, grad, vmap

    model = build()
    params = {k: v.detach() for k, v in model.named_parameters()}
    onehot = F.one_hot(y[:, 0], classes).movedim(-1, 1).to(x.dtype)
    dims = tuple(range(2, x.dim()))

    def patient_loss(p, xi, yi):
        logits = functional_call(model, p, (xi[None],))
        prob = logits.softmax(1)
        inter, den = (prob * yi[None]).sum(dims), prob.sum(dims) + yi[None].sum(dims)
        dice = (1 - (2 * inter + 1e-5) / (den + 1e-5)).mean()
        return dice - (yi[None] * logits.log_softmax(1)).sum(1).mean()

    per_patient = vmap(grad(patient_loss), in_dims=(None, 0, 0))
    generator = torch.Generator().manual_seed(0)

    def step() -> torch.Tensor:
        g = per_patient(params, x, onehot)
        rows = torch.cat([v.reshape(v.shape[0], -1) for v in g.values()], 1)
        factors = (1.0 / (torch.linalg.vector_norm(rows, dim=1) + 1e-6)).clamp(max=1.0)
        return factors @ rows + torch.randn(rows.shape[1], generator=generator)

    return torch.compile(step) if compile_ else step


def _stock(dims: int) -> Callable[[], nn.Module]:
    from monai.networks.nets import UNet
    return lambda: UNet(spatial_dims=dims, in_channels=1, out_channels=3, channels=DEFAULT_CHANNELS,
                        strides=DEFAULT_STRIDES, num_res_units=1)


HEADER = ["model", "input", "batch", "params", "non-DP step (ms)", "Opacus DP step (ms)", "carefl DP step (ms)",
          "Opacus / non-DP", "carefl / non-DP"]


def run(full: bool = False, repeats_2d: int | None = None, repeats_3d: int | None = None) -> list[Figure]:
    torch.set_num_threads(1)
    r2, r3 = repeats_2d or (200 if full else 60), repeats_3d or (80 if full else 24)
    cases = [("seg-unet2d", lambda: build_model("seg-unet2d"), (64, 64), 8, r2),
             ("seg-unet3d", lambda: build_model("seg-unet3d"), (32, 32, 32), 4, r3)]
    if full:
        cases += [("seg-unet2d", lambda: build_model("seg-unet2d"), (128, 128), 16, r2 // 3),
                  ("seg-unet3d", lambda: build_model("seg-unet3d"), (48, 48, 48), 2, r3 // 2),
                  ("stock MONAI UNet 2-D (PReLU, ConvTranspose)", _stock(2), (64, 64), 8, r2 // 2),
                  ("stock MONAI UNet 3-D (PReLU, ConvTranspose)", _stock(3), (32, 32, 32), 4, r3 // 2)]
    rows, fast_ratios, opacus_ratios, notes = [], [], [], []
    for name, build, shape, batch, repeats in cases:
        steps, privates, params, (x, y) = seg_steps(build, shape, batch)
        try:
            times = interleaved(steps, repeats, block=2, warmup=2)
        finally:
            for private in privates:
                private.close()
        plain, opacus = times["non-DP"]["total"], times["opacus"]["total"]
        size = "×".join(map(str, shape))
        fast_cell, fast_ratio = "— (runs on Opacus)", "—"
        opacus_ratios.append(opacus / plain)
        if "fast" in times:
            fast = times["fast"]["total"]
            fast_ratios.append(fast / plain)
            fast_cell, fast_ratio = f"{fast * 1e3:.1f}", f"**{fast / plain:.2f}×**"
            d = [(times["fast"][p] - times["non-DP"][p]) * 1e3 for p in PHASES]
            summed, per, opacus_kernels, noise = conv_kernel_cost(build, x, y)
            notes.append(f"- {name} {size}, batch {batch}: carefl − non-DP per phase {d[0]:+.1f} / {d[1]:+.1f} / "
                         f"{d[2]:+.1f} ms (forward / backward / update). All convolutions' weight gradients: "
                         f"{summed * 1e3:.1f} ms summed (non-DP), {per * 1e3:.1f} ms per sample (carefl), "
                         f"{opacus_kernels * 1e3:.1f} ms per sample (Opacus's unfold sampler). One noise draw "
                         f"for {params / 1e3:.0f}k parameters: {noise * 1e3:.1f} ms.")
        rows.append([name, size, batch, f"{params / 1e3:.0f}k", f"{plain * 1e3:.1f}", f"{opacus * 1e3:.1f}",
                     fast_cell, f"{opacus / plain:.2f}×", fast_ratio])
    carefl_models = fast_ratios[:2] if not full else fast_ratios
    return [Figure(
        full=full,
        key="dp-cost-seg",
        title="DP-SGD step cost, segmentation U-Nets",
        command="python -m benchmarks.seg_dp_overhead" + (" --full" if full else ""),
        goal=f"DP step ≤ {GOAL:g}× the non-DP step (same model, batch, SGD, Dice+CE; one run, interleaved)",
        anchor="Opacus 1.6 hooks mode as carefl ran it before (notes: 1.6–3.1×), measured here in the same run",
        ours=(f"carefl engine {min(carefl_models):.2f}–{max(carefl_models):.2f}× "
              f"(Opacus {min(opacus_ratios[:2]):.2f}–{max(opacus_ratios[:2]):.2f}×)"),
        met=max(carefl_models) <= GOAL,
        table=markdown_table(HEADER, rows),
        notes=(f"1 torch thread, median of {r2} (2-D) / {r3} (3-D) steps per variant, interleaved in blocks of 2"
               + (" (fewer for the larger inputs and stock rows)" if full else "") + ", σ = 1, C = 1.\n"
               + "\n".join(notes)),
    )]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="more repeats, larger inputs, MONAI's stock UNet")
    parser.add_argument("--repeats-2d", type=int, default=None)
    parser.add_argument("--repeats-3d", type=int, default=None)
    parser.add_argument("--torch-func", action="store_true",
                        help="instead: time torch.func vmap(grad) per-sample steps against the non-DP step")
    parser.add_argument("--compile", action="store_true", help="with --torch-func: torch.compile the step too")
    args = parser.parse_args()
    if args.torch_func:
        torch.set_num_threads(1)
        for name, shape, batch in (("seg-unet2d", (64, 64), 8), ("seg-unet3d", (32, 32, 32), 4)):
            steps, privates, _, (x, y) = seg_steps(lambda n=name: build_model(n), shape, batch)
            for private in privates:
                private.close()
            plain = steps["non-DP"]
            for label, compiled in (("vmap(grad)", False),) + ((("vmap(grad) + torch.compile", True),)
                                                                if args.compile else ()):
                func = torch_func_step(lambda n=name: build_model(n), x, y, compile_=compiled)
                start = time.perf_counter()
                func()
                first = time.perf_counter() - start

                def func_step(func=func) -> tuple[float, float, float]:  # forward + backward in one call
                    start = time.perf_counter()
                    func()
                    return 0.0, time.perf_counter() - start, 0.0

                times = interleaved({"non-DP": plain, "func": func_step}, args.repeats_3d or 20, block=5, warmup=2)
                ours, base = times["func"]["total"], times["non-DP"]["total"]
                print(f"{name}: {label} {ours * 1e3:.1f} ms vs non-DP {base * 1e3:.1f} ms = {ours / base:.2f}× "
                      f"(first call {first:.1f} s)", flush=True)
        return
    for fig in run(args.full, args.repeats_2d, args.repeats_3d):
        print(f"## {fig.title}\n\n{fig.markdown()}\n")


if __name__ == "__main__":
    main()
