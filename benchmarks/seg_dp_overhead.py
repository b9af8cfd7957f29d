"""DP-SGD step time over plain step time for the segmentation U-Nets, measured in one run.

Same model (same initial weights), same batch, SGD, Dice+CE; the DP step is Opacus DP-SGD as carefl
runs it (``privacy.dp_sgd.make_private``: hooks mode, summed per-patient loss, per-patient clipping,
noise). Plain and DP steps are interleaved in blocks and the median over repeats is reported, so
machine load affects both alike; 1 torch thread. Absolute times are context only. For contrast the
stock MONAI ``UNet`` (PReLU, ConvTranspose: Opacus's functorch fallback, which cannot take an
empty Poisson batch) is timed too.

    python -m benchmarks.seg_dp_overhead [--repeats 60] [--batch-2d 8] [--batch-3d 4] [--size-2d 64] [--size-3d 32]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from monai.networks.nets import UNet
from torch import nn

from benchmarks.timing import interleaved_medians
from privacy.dp_sgd import GRAD_SAMPLE_MODE, make_private
from shared_models.registry import build_model
from shared_models.seg_losses import DiceCE
from shared_models.unet import DEFAULT_CHANNELS, DEFAULT_STRIDES


def measure(build: Callable[[], nn.Module], shape: tuple[int, ...], batch: int, repeats: int,
            block: int = 5) -> tuple[float, float, int]:
    """Median plain and DP step time (s) and the parameter count, for one model and batch."""
    torch.manual_seed(0)
    x, y = torch.randn(batch, 1, *shape), torch.randint(0, 3, (batch, 1, *shape))
    loss = DiceCE()
    plain = build()
    private_model = build()
    private_model.load_state_dict(plain.state_dict())
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.01)
    patients = torch.utils.data.TensorDataset(torch.randn(4 * batch, 1, *shape), torch.zeros(4 * batch, 1, *shape).long())
    private = make_private(private_model, patients, batch_size=batch, lr=0.01, optimizer="sgd",
                           noise_multiplier=1.0, clip_norm=1.0)

    def plain_step():
        plain_opt.zero_grad()
        loss(plain(x), y).backward()
        plain_opt.step()

    def dp_step():
        private.optimizer.zero_grad()
        loss.summed(private.module(x), y).backward()
        private.optimizer.step()

    plain_s, dp_s = interleaved_medians(plain_step, dp_step, repeats, block=block, warmup=3)
    private.close()
    return plain_s, dp_s, sum(p.numel() for p in plain.parameters())


def _stock(dims: int) -> Callable[[], nn.Module]:
    return lambda: UNet(spatial_dims=dims, in_channels=1, out_channels=3, channels=DEFAULT_CHANNELS,
                        strides=DEFAULT_STRIDES, num_res_units=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--batch-2d", type=int, default=8)
    parser.add_argument("--batch-3d", type=int, default=4)
    parser.add_argument("--size-2d", type=int, default=64)
    parser.add_argument("--size-3d", type=int, default=32)
    parser.add_argument("--no-stock", action="store_true", help="skip the stock MONAI UNet rows")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, grad_sample_mode={GRAD_SAMPLE_MODE}, 1 thread, median of {args.repeats}")
    print("| model | input | batch | params | non-DP step (ms) | DP step (ms) | DP / non-DP |")
    print("|---|---|---|---|---|---|---|")
    cases = [("seg-unet2d", lambda: build_model("seg-unet2d"), (args.size_2d,) * 2, args.batch_2d),
             ("seg-unet3d", lambda: build_model("seg-unet3d"), (args.size_3d,) * 3, args.batch_3d)]
    if not args.no_stock:
        cases += [("stock MONAI UNet 2-D (PReLU, ConvTranspose)", _stock(2), (args.size_2d,) * 2, args.batch_2d),
                  ("stock MONAI UNet 3-D (PReLU, ConvTranspose)", _stock(3), (args.size_3d,) * 3, args.batch_3d)]
    for name, build, shape, batch in cases:
        plain, dp, params = measure(build, shape, batch, args.repeats)
        size = "×".join(map(str, shape))
        print(f"| {name} | {size} | {batch} | {params / 1e3:.0f}k | {plain * 1e3:.1f} | {dp * 1e3:.1f} "
              f"| {dp / plain:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
