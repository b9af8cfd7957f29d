"""The run configuration, checked once at the start of a run with every problem listed."""

from __future__ import annotations

import math
from dataclasses import dataclass

from server.consensus import POLICIES, ConsensusRule
from shared_models.eval_release import EVAL_NOISE_MULTIPLIER
from shared_models.registry import UnknownModelError, get_spec
from shared_models.schema import Schema, SchemaError, builtin_schema
from shared_models.tasks import TASKS, Task, get_task
from shared_models.train_request import TrainSettings
from shared_models.trainable import TRAINABLE

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedmedian", "fedtrimmedavg", "krum", "multikrum")
PERSONALISATION = ("none", "finetune")


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
    dp: bool
    noise_multiplier: float
    target_epsilon: float
    clip_norm: float
    server_lr: float
    server_tau: float
    min_sites: int
    sites: tuple[str, ...]
    round_timeout: float
    seed: int
    out_dir: str
    trim_beta: float = 0.2       # fedtrimmedavg: fraction cut at each end, per coordinate
    byzantine_sites: int = 1     # krum / multikrum: sites that may be faulty
    max_update_norm: float = 0.0  # > 0: reject a site update whose L2 distance to the global model exceeds it
    round_retries: int = 1       # a round with fewer than min-sites valid updates is re-sent this often
    resume_from: str = ""  # a run directory with a checkpoint: continue that run from its last complete round
    audit_log: str = ""   # the coordinator's audit log ("" → <run dir>/audit.jsonl)
    audit_key: str = ""   # its Ed25519 signing key ("" → unsigned)
    tensorboard: bool = False  # also log each round's metrics to <run dir>/tensorboard (needs the tensorboard package)
    personalise: str = "none"  # finetune: each site also reports the global model fine-tuned on its own data
    finetune_steps: int = 100  # local steps of that fine-tuning (same optimizer, lr and batch as training)
    schema: str = ""           # ehr-seq: the study's schema, shipped in the app (shared_models/schemas/<name>.toml)
    stats_noise_multiplier: float = 10.0  # ehr-seq: σ of each site's DP feature-statistics release
    train_params: str = "all"  # which parameters the sites train (shared_models/trainable.py); the rest stay frozen
    init_checkpoint: str = ""  # a public checkpoint (carefl coordinator pretrain): the round-0 global model
    eval_noise_multiplier: float = EVAL_NOISE_MULTIPLIER  # σ of each site's DP evaluation release, every round
    consensus: ConsensusRule = ConsensusRule()  # bounded, consensus-checked updates (server/consensus.py)
    secure_aggregation: bool = False  # SecAgg+: the coordinator sees only the sum of the updates (server/secure_aggregation.py)
    distributed_dp: bool = False      # under it, sites that opt in add σ/√t each (docs/PRIVACY.md, "Distributed DP")
    weight_average: float = 0.0  # > 0: decay of the moving average of global models sites evaluate (server/iterate_average.py)

    @classmethod
    def from_run_config(cls, cfg: dict) -> "RunSettings":
        problems: list[str] = []

        def get(key: str, kind):
            if key not in cfg:
                problems.append(f"'{key}' is missing")
                return kind()
            if kind is bool and not isinstance(cfg[key], bool):
                problems.append(f"'{key}' must be true or false")
                return False
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
            dp=get("dp", bool), noise_multiplier=get("noise-multiplier", float),
            target_epsilon=get("target-epsilon", float), clip_norm=get("clip-norm", float),
            server_lr=get("server-lr", float), server_tau=get("server-tau", float),
            min_sites=get("min-sites", int),
            sites=tuple(x.strip() for x in get("sites", str).split(",") if x.strip()),
            round_timeout=get("round-timeout", float), seed=get("seed", int), out_dir=get("out-dir", str),
            trim_beta=float(cfg.get("trim-beta", 0.2)), byzantine_sites=int(cfg.get("byzantine-sites", 1)),
            max_update_norm=float(cfg.get("max-update-norm", 0.0)), round_retries=int(cfg.get("round-retries", 1)),
            resume_from=str(cfg.get("resume-from", "")),
            audit_log=str(cfg.get("audit-log", "")), audit_key=str(cfg.get("audit-key", "")),
            tensorboard=cfg.get("tensorboard", False) is True,
            personalise=str(cfg.get("personalise", "none")).lower(), finetune_steps=int(cfg.get("finetune-steps", 100)),
            schema=str(cfg.get("schema", "")), stats_noise_multiplier=float(cfg.get("stats-noise-multiplier", 10.0)),
            train_params=str(cfg.get("train-params", "all")), init_checkpoint=str(cfg.get("init-checkpoint", "")),
            eval_noise_multiplier=_number(cfg.get("eval-noise-multiplier", EVAL_NOISE_MULTIPLIER)),
            consensus=ConsensusRule(factor=_number(cfg.get("bound-factor", ConsensusRule.factor)),
                                    min_cosine=_number(cfg.get("min-cosine", ConsensusRule.min_cosine)),
                                    rounds_to_flag=_whole(cfg.get("outlier-rounds", ConsensusRule.rounds_to_flag)),
                                    policy=str(cfg.get("outlier-policy", ConsensusRule.policy)).lower()),
            secure_aggregation=cfg.get("secure-aggregation", False) is True,
            distributed_dp=cfg.get("distributed-dp", False) is True,
            weight_average=_number(cfg.get("weight-average", 0.0)),
        )
        if s.task not in TASKS:
            problems.append(f"task '{s.task}' is not one of {', '.join(TASKS)} (shared_models/tasks.py)")
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
        if s.dp and (s.noise_multiplier > 0) == (s.target_epsilon > 0):
            problems.append("with dp = true set exactly one of 'noise-multiplier' (> 0) or 'target-epsilon' (> 0)")
        if s.dp and not s.clip_norm > 0:
            problems.append("'clip-norm' must be > 0 when dp = true")
        if not 0 <= s.weight_average < 1:
            problems.append("'weight-average' must be in [0, 1): the decay of the moving average of global models")
        if not 0 <= s.trim_beta < 0.5:
            problems.append("'trim-beta' must be in [0, 0.5)")
        if s.byzantine_sites < 0 or s.round_retries < 0 or s.max_update_norm < 0:
            problems.append("'byzantine-sites', 'round-retries' and 'max-update-norm' must be >= 0")
        if s.personalise not in PERSONALISATION:
            problems.append(f"'personalise' must be one of {', '.join(PERSONALISATION)}")
        if s.personalise == "finetune" and s.finetune_steps < 1:
            problems.append("'finetune-steps' must be >= 1")
        if s.personalise == "finetune" and s.dp:
            problems.append("personalise = \"finetune\" needs dp = false: the fine-tuned model's test metrics "
                            "would release a non-private function of each site's training data")
        if not isinstance(cfg.get("tensorboard", False), bool):
            problems.append("'tensorboard' must be true or false")
        if s.task in TASKS and s.study.shared_statistics:
            try:
                if s.study_schema().visits is None:
                    problems.append(f"schema '{s.schema}' has no [visits]; task {s.task} needs visit histories")
            except SchemaError as exc:
                problems.append(f"'schema' (task {s.task}): {exc}")
            if not s.stats_noise_multiplier > 0:
                problems.append("'stats-noise-multiplier' must be > 0 (the feature statistics are a DP release)")
        if not (math.isfinite(s.eval_noise_multiplier) and s.eval_noise_multiplier > 0):
            problems.append("'eval-noise-multiplier' must be a number > 0 (σ of each site's DP evaluation release; a "
                            "site whose policy says evaluation = \"exact\" releases without noise instead)")
        rule = s.consensus
        if not (math.isfinite(rule.factor) and rule.factor >= 1):
            problems.append("'bound-factor' must be a number >= 1 (an update may be this many times the median "
                            "update's length)")
        if not -1 <= rule.min_cosine <= 1:
            problems.append("'min-cosine' must be a number in [-1, 1]")
        if rule.rounds_to_flag < 1:
            problems.append("'outlier-rounds' must be a whole number >= 1")
        if rule.policy not in POLICIES:
            problems.append(f"'outlier-policy' must be one of {', '.join(POLICIES)}")
        if s.train_params not in TRAINABLE:
            problems.append(f"'train-params' must be one of {', '.join(TRAINABLE)}")
        elif s.task in TASKS and (problem := TASKS[s.task].train_params_problem(s.train_params)):
            problems.append(problem)
        for key in ("secure-aggregation", "distributed-dp"):
            if not isinstance(cfg.get(key, False), bool):
                problems.append(f"'{key}' must be true or false")
        problems += _secure_aggregation_problems(s)
        if len(set(s.sites)) != len(s.sites):
            problems.append("'sites' names a site twice")
        if problems:
            raise RunConfigError("invalid run config: " + "; ".join(problems))
        return s

    def train_config(self) -> dict:
        """What every site receives with a train message."""
        return {"model": self.model, "local-steps": self.local_steps, "local-epochs": self.local_epochs,
                "batch-size": self.batch_size, "optimizer": self.optimizer, "lr": self.lr, "seed": self.seed,
                "dp": self.dp, "noise-multiplier": self.noise_multiplier, "target-epsilon": self.target_epsilon,
                "clip-norm": self.clip_norm, "num-server-rounds": self.num_rounds, "train-params": self.train_params,
                "eval-noise-multiplier": self.eval_noise_multiplier,  # sites plan their study's ε with it
                "secure-aggregation": self.secure_aggregation, "distributed-dp": self.distributed_dp,
                **({"stats-noise-multiplier": self.stats_noise_multiplier} if self.study.shared_statistics else {})}

    @property
    def study(self) -> Task:
        """This study's row of the task table."""
        return get_task(self.task)

    def study_schema(self) -> Schema:
        """The schema a study on an EHR extract names (shipped in the app bundle, so its hash is approved with it)."""
        return builtin_schema(self.schema)

    def evaluate_config(self) -> dict:
        """What every site receives with an evaluate message: the release's σ and whether the study is DP (with
        fine-tuning also how to fine-tune)."""
        if self.personalise == "none":
            return {"model": self.model, "dp": self.dp, "eval-noise-multiplier": self.eval_noise_multiplier}
        return {**self.train_config(), "local-steps": self.finetune_steps, "personalise": self.personalise}


SUMMABLE = ("fedavg", "fedprox", "fedadam", "fedyogi")  # strategies that need only the sum of the updates


def _secure_aggregation_problems(s: "RunSettings") -> list[str]:
    """Under secure aggregation the coordinator never sees one site's update: only strategies that work on the
    weighted sum can run; distributed DP also needs each site's round to be one linear DP-SGD step."""
    problems = []
    if s.secure_aggregation and s.strategy not in SUMMABLE:
        problems.append(f"strategy '{s.strategy}' needs every site's own update, which secure aggregation hides "
                        f"from the coordinator; use one of {', '.join(SUMMABLE)}")
    if s.distributed_dp:
        if not s.secure_aggregation:
            problems.append("'distributed-dp' needs secure-aggregation = true (each site's share of the noise "
                            "protects it only inside the sum)")
        if not s.dp:
            problems.append("'distributed-dp' needs dp = true")
        if not s.noise_multiplier > 0:
            problems.append("'distributed-dp' needs a fixed 'noise-multiplier' (the sum's σ) instead of "
                            "'target-epsilon': each site plans a target from its own N, and the honest sites' "
                            "shares add up to the sum's σ only if every site takes the same")
        if s.local_steps != 1 or s.optimizer != "sgd":
            problems.append("'distributed-dp' needs local-steps = 1 and optimizer = \"sgd\": only then is each "
                            "site's update its noised gradient sum, so the sites' noise adds up in the sum")
    return problems


def _whole(value) -> int:
    """A run-config whole number, 0 when it is none (the check then names the key)."""
    number = _number(value)
    return int(number) if math.isfinite(number) and number == int(number) else 0


def _number(value) -> float:
    """A run-config number, NaN when it is none (the check then names the key)."""
    try:
        return float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        return math.nan
