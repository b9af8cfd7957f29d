"""The run configuration, checked once at the start of a run with every problem listed."""

from __future__ import annotations

from dataclasses import dataclass

from shared_models.registry import UnknownModelError, get_spec
from shared_models.train_request import TrainSettings

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi")
TASKS = ("ehr",)


class RunConfigError(ValueError):
    """The run configuration is invalid; the message lists every problem."""


@dataclass(frozen=True)
class RunSettings:
    task: str
    model: str
    strategy: str
    num_rounds: int
    local_steps: int
    local_epochs: int
    batch_size: int
    optimizer: str
    lr: float
    proximal_mu: float
    server_lr: float
    server_tau: float
    min_sites: int
    sites: tuple[str, ...]
    round_timeout: float
    seed: int
    out_dir: str

    @classmethod
    def from_run_config(cls, cfg: dict) -> "RunSettings":
        problems: list[str] = []

        def get(key: str, kind):
            if key not in cfg:
                problems.append(f"'{key}' is missing")
                return kind()
            try:
                return kind(cfg[key])
            except (TypeError, ValueError):
                problems.append(f"'{key}' must be {kind.__name__}")
                return kind()

        s = cls(
            task=get("task", str), model=get("model", str), strategy=get("strategy", str).lower(),
            num_rounds=get("num-server-rounds", int), local_steps=get("local-steps", int),
            local_epochs=get("local-epochs", int), batch_size=get("batch-size", int),
            optimizer=get("optimizer", str), lr=get("lr", float), proximal_mu=get("proximal-mu", float),
            server_lr=get("server-lr", float), server_tau=get("server-tau", float),
            min_sites=get("min-sites", int),
            sites=tuple(x.strip() for x in get("sites", str).split(",") if x.strip()),
            round_timeout=get("round-timeout", float), seed=get("seed", int), out_dir=get("out-dir", str),
        )
        if s.task not in TASKS:
            problems.append(f"task '{s.task}' is not one of {', '.join(TASKS)}")
        try:
            if get_spec(s.model).task != s.task:
                problems.append(f"model '{s.model}' is not a model for task '{s.task}'")
        except UnknownModelError as exc:
            problems.append(str(exc))
        if s.strategy not in STRATEGIES:
            problems.append(f"strategy '{s.strategy}' is not one of {', '.join(STRATEGIES)}")
        for name, value, low in (("num-server-rounds", s.num_rounds, 1), ("batch-size", s.batch_size, 1),
                                 ("min-sites", s.min_sites, 1), ("local-steps", s.local_steps, 0)):
            if value < low:
                problems.append(f"'{name}' must be >= {low}")
        for name, value in (("lr", s.lr), ("server-lr", s.server_lr), ("round-timeout", s.round_timeout)):
            if not value > 0:
                problems.append(f"'{name}' must be > 0")
        try:  # exactly the check every site will apply to the train message
            mu = s.proximal_mu if s.strategy == "fedprox" else 0.0
            TrainSettings.from_config({**s.train_config(), "proximal-mu": mu})
        except ValueError as exc:
            problems.append(str(exc))
        if len(set(s.sites)) != len(s.sites):
            problems.append("'sites' names a site twice")
        if problems:
            raise RunConfigError("invalid run config: " + "; ".join(problems))
        return s

    def train_config(self) -> dict:
        """What every site receives with a train message."""
        return {"model": self.model, "local-steps": self.local_steps, "local-epochs": self.local_epochs,
                "batch-size": self.batch_size, "optimizer": self.optimizer, "lr": self.lr, "seed": self.seed}
