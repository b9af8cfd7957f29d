"""``carefl privacy plan``: the noise multiplier σ a whole study needs, before anyone runs it."""

from __future__ import annotations

from typing import Optional

import typer

from deploy.cli.common import console
from privacy.accounting import ACCOUNTANTS, epsilon, plan_noise, sample_rate
from privacy.policy import PolicyError, default_delta

privacy_app = typer.Typer(no_args_is_help=True, help="Plan differential privacy for a study.")


@privacy_app.command("plan")
def privacy_plan(
    rounds: int = typer.Option(..., min=1, help="Federated rounds of the study."),
    epochs: int = typer.Option(1, min=1, help="Local epochs per round."),
    n: int = typer.Option(..., min=1, help="Patients in the site's dataset."),
    batch: int = typer.Option(..., min=1, help="Expected (Poisson) batch size."),
    target_epsilon: float = typer.Option(..., min=0.01, help="ε the whole study may cost."),
    delta: Optional[float] = typer.Option(None, help="δ (default: a power of ten ≥ 10× below 1/N)."),
    accountant: str = typer.Option("prv", help="prv | rdp"),
) -> None:
    """The noise multiplier σ for a whole study: sized for rounds × epochs, not for one round."""
    if accountant not in ACCOUNTANTS:
        raise PolicyError(f"accountant must be one of {', '.join(ACCOUNTANTS)}")
    delta = delta if delta is not None else default_delta(n)
    q = sample_rate(n, batch)
    steps = rounds * epochs * round(1 / q)
    sigma = plan_noise(target_epsilon, delta, n, batch, steps, accountant)
    reached = epsilon([(sigma, q, steps)], delta, accountant)
    console.print(f"noise multiplier σ = {sigma:.4f}")
    console.print(f"  {rounds} rounds × {epochs} epochs = {steps} steps at sample rate q = {q:.4g} "
                  f"(N={n}, batch {batch}) → ε = {reached:.3f} at δ = {delta:g} ({accountant})")
