"""What a coordinator may ask of one round of local training, as both sides read it.

The coordinator checks its run config with this class before a run starts; each site builds it
again from the train message and refuses a request it cannot honour. One definition, so the two
never disagree about what is valid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class TrainSettings:
    """What the coordinator may ask of one local training round."""

    local_steps: int  # > 0: exactly this many optimizer steps; 0: local_epochs full passes
    local_epochs: int
    batch_size: int
    optimizer: str
    lr: float
    proximal_mu: float = 0.0  # FedProx: mu/2 * ||w - w_global||^2
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.local_steps < 0:
            problems.append("local-steps must be >= 0")
        if self.local_steps == 0 and self.local_epochs < 1:
            problems.append("local-epochs must be >= 1 when local-steps is 0")
        if self.batch_size < 1:
            problems.append("batch-size must be >= 1")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer must be one of {', '.join(OPTIMIZERS)}")
        if not self.lr > 0:
            problems.append("lr must be > 0")
        if self.proximal_mu < 0:
            problems.append("proximal-mu must be >= 0")
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def from_config(cls, config: Mapping) -> "TrainSettings":
        """From a train message's config record (Flower adds ``server-round``, FedProx ``proximal-mu``)."""
        return cls(
            local_steps=int(config["local-steps"]),
            local_epochs=int(config["local-epochs"]),
            batch_size=int(config["batch-size"]),
            optimizer=str(config["optimizer"]),
            lr=float(config["lr"]),
            proximal_mu=float(config.get("proximal-mu", 0.0)),
            seed=int(config["seed"]) * 100_003 + int(config.get("server-round", 0)),
        )
