"""The schema of the whole run: dist.*, parallel.*, and `Config`, whose checks span groups."""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

from replica_dist.config.checks import (
    CHOICES,
    Backend,
    Compression,
    Device,
    Init,
    _check,
    _check_choices,
    _one_of,
)
from replica_dist.config.coupling import CouplingConfig, form_words, locate_form
from replica_dist.config.fault_tolerance import FtConfig, check_ft_run
from replica_dist.config.model_data import DataConfig, ModelConfig
from replica_dist.config.training import (
    CheckpointConfig,
    EvalConfig,
    FlatnessConfig,
    GuardConfig,
    LogConfig,
    OptimConfig,
    TrainConfig,
)
from replica_dist.forms.base import unsupported_feature

TIMEOUT_MAX_S = 30 * 24 * 3600
COMPRESSIONS = CHOICES["Compression"]
"""How the coupling exchange may send the weights (dist.compress)."""


def check_compression(compress: str, error_feedback: bool, prefix: str = "dist.") -> None:
    """A compression among COMPRESSIONS, and error feedback only with one: for DistConfig and for
    dist.ReplicaExchange built without a config (`prefix` ''), one check and one message."""
    _one_of(f"{prefix}compress", compress, COMPRESSIONS)
    _check(
        not error_feedback or compress != "none",
        f"{prefix}error_feedback needs compression: set {prefix}compress=bf16 or int8, or drop {prefix}error_feedback",
    )


BUCKET_MAX_MB = 2**20


@dataclass
class DistConfig:
    backend: Backend = "auto"
    """Process-group backend: auto (nccl with CUDA, else gloo), gloo or nccl."""
    device: Device = "auto"
    """auto (cuda:LOCAL_RANK when CUDA is available, else cpu), cpu or cuda."""
    timeout_s: float = 300.0
    """Seconds a collective may wait for the other ranks before failing; at most 2592000
    (30 days: longer means a hung job, and far larger values overflow the process group's
    timer)."""
    overlap: bool = True
    """Start the coupling all_reduce of the pre-step weights before the forward pass and wait
    for it only when the pull is applied, so communication runs behind forward and backward.
    Same weights as false (synchronous: all_reduce after backward); what differs is when a
    non-finite value is agreed on: one step later, so with guard.nonfinite=skip only the
    replica that saw it skips that step (see guard.py). Forms that never pull (average,
    none, ddp) are unaffected."""
    bucket_mb: float = 25.0
    """The coupling buffer is reduced in buckets of at most this many MiB, each its own
    all_reduce, all in flight together (25 is DDP's default bucket size); at most 1048576
    (1 TiB, more than any coupling buffer: a larger bucket is one bucket all the same)."""
    compress: Compression = "none"
    """How the coupling exchange (tanh, linear, average, diloco) sends the weights: none (the buffer's
    float type), bf16 (2 bytes a weight) or int8 (1 byte a weight, plus one float32 scale per
    dist.compress_chunk weights, agreed on by all ranks: the chunk's largest |w| / 127). The
    ranks all_gather the compressed weights and each adds them up in the buffer's dtype, in
    replica order, so every rank gets the same mean; the guard's words stay exact. Round
    trip error: int8 at most half a step (scale/2) per weight. See dist.ReplicaExchange.
    Not for coupling.name=ddp, whose gradients travel in DDP's own all_reduce."""
    compress_chunk: int = 1024
    """int8: weights per scale. Smaller chunks follow the weights' magnitudes more closely
    (smaller steps) and send more scales (4 bytes per chunk, about 0.4% at 1024)."""
    error_feedback: bool = False
    """With dist.compress: each rank adds what rounding took off its last send to its next
    one (the residual, kept per rank and checkpointed), so errors do not persist in one
    direction; the sum of what a replica sends equals the sum of its weights up to the last
    residual."""

    def __post_init__(self) -> None:
        _check_choices(self, "dist.")
        _check(self.compress_chunk >= 1, f"dist.compress_chunk must be >= 1; got {self.compress_chunk}")
        check_compression(self.compress, self.error_feedback)
        _check(
            0 < self.timeout_s <= TIMEOUT_MAX_S,
            f"dist.timeout_s must be in (0, {TIMEOUT_MAX_S}] seconds; got {self.timeout_s}",
        )
        _check(
            0 < self.bucket_mb <= BUCKET_MAX_MB,
            f"dist.bucket_mb must be in (0, {BUCKET_MAX_MB}] MiB; got {self.bucket_mb}",
        )


@dataclass
class ParallelConfig:
    dp: int = 1
    """Ranks per replica. The world is a replicas x dp mesh (world size = replicas * dp, rank
    = replica * dp + dp index): each replica is data parallel (DDP) over its dp ranks, each
    with its own part of the replica's shard and its own train.batch_size minibatch; the
    coupling all_reduce runs across replicas, among the ranks with the same dp index."""

    def __post_init__(self) -> None:
        _check(self.dp >= 1, f"parallel.dp must be >= 1; got {self.dp}")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    coupling: CouplingConfig = field(default_factory=CouplingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    flatness: FlatnessConfig = field(default_factory=FlatnessConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    ft: FtConfig = field(default_factory=FtConfig)
    seed: int = 0
    """Seeds data generation, the split and shards, and (with the rank) init and batch order."""
    init: Init = "independent"
    """independent: each replica initialised from its own seed (as in the note);
    same: rank 0's initial weights broadcast to all."""

    def __post_init__(self) -> None:
        _check_choices(self, "")
        _check(self.seed >= 0, f"seed must be >= 0; got {self.seed}")
        asked = {
            "compression": f"dist.compress={self.dist.compress}" if self.dist.compress != "none" else None,
            "remap": "checkpoint.remap" if self.checkpoint.remap else None,
            "replica_dp": f"parallel.dp={self.parallel.dp}" if self.parallel.dp > 1 else None,
        }
        form = locate_form(self.coupling)
        refusal = unsupported_feature(
            form, {feature: key for feature, key in asked.items() if key}, form_words(self.coupling)
        )
        _check(refusal is None, str(refusal))
        _check(
            self.parallel.dp == 1 or not self.checkpoint.remap,
            "checkpoint.remap is not available with parallel.dp > 1",
        )
        check_ft_run(self)
        if self.train.epochs == 0:  # else once train.epochs has set train.steps (replica_dist.recipe)
            self.check_run_length()
        regression = self.data.name == "seed" or (self.data.name == "file" and self.data.task == "regression")
        _check(
            self.optim.label_smoothing == 0 or not regression,
            f"optim.label_smoothing is for classification only; data.name={self.data.name} is a regression",
        )

    def check_run_length(self) -> None:
        """What must fit in the run's train.steps."""
        steps = f"train.steps ({self.train.steps}" + (
            f", from train.epochs={self.train.epochs})" if self.train.epochs else ")"
        )
        _check(
            self.optim.warmup_steps < self.train.steps,
            f"optim.warmup_steps must be < {steps}; got {self.optim.warmup_steps}",
        )


def register_configs() -> None:
    """Register the schema under `base_config`; conf/ holds the YAML options of each group,
    which Hydra merges into this typed schema (so a wrong key or type fails there)."""
    ConfigStore.instance().store(name="base_config", node=Config)
