"""DP-SGD step time over plain step time for each EHR model, measured in one run.

Same model, same batch, same optimizer; the two kinds of step are interleaved and the median
over repeats is reported, so machine load affects both alike. Absolute times are printed for
context only (shared 2-core machines are noisy).

    python -m benchmarks.dp_overhead [--repeats 200] [--batches 4,64]
"""

from __future__ import annotations

import argparse
import torch

from benchmarks.timing import interleaved_medians
from privacy.dp_sgd import GRAD_SAMPLE_MODE, make_private
from shared_models.ehr import binary_loss
from shared_models.registry import build_model, model_names


def measure(name: str, batch: int, repeats: int, n_features: int = 13) -> tuple[float, float]:
    torch.manual_seed(0)
    x, y = torch.randn(batch, n_features), (torch.rand(batch) > 0.5).float()
    plain = build_model(name, n_features=n_features)
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.01)
    private_model = build_model(name, n_features=n_features)
    data = torch.utils.data.TensorDataset(torch.randn(10 * batch, n_features), torch.zeros(10 * batch))
    private = make_private(private_model, data, batch_size=batch, lr=0.01, optimizer="sgd",
                           noise_multiplier=1.0, clip_norm=1.0)

    def plain_step():
        plain_opt.zero_grad()
        binary_loss(plain(x), y).backward()
        plain_opt.step()

    def dp_step():
        private.optimizer.zero_grad()
        (binary_loss(private.module(x), y) * batch).backward()
        private.optimizer.step()

    plain_s, dp_s = interleaved_medians(plain_step, dp_step, repeats, block=10, warmup=20)
    private.close()
    return plain_s, dp_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--batches", default="4,64")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, grad_sample_mode={GRAD_SAMPLE_MODE}, 1 thread, median of {args.repeats}")
    print("| model | batch | non-DP step (ms) | DP step (ms) | DP / non-DP |")
    print("|---|---|---|---|---|")
    for name in model_names("ehr"):
        for batch in (int(b) for b in args.batches.split(",")):
            plain, dp = measure(name, batch, args.repeats)
            print(f"| {name} | {batch} | {plain * 1e3:.3f} | {dp * 1e3:.3f} | {dp / plain:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
