"""Frozen settings, one section per concern, handed down whole.

`config.Config` (the flat flags) builds each section once; the code below it takes a section instead of a list
of loose arguments, so a new augmentation knob is one field here and one flag in `config.py`, not a change to
every signature on the way down. Each section validates itself on construction and raises `ArgumentError`
naming its own field; only `config.py` translates field names into `--flag` names for the command line.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

from simclr_tf.errors import ArgumentError

BRIGHTNESS_IMPLS = ("v1", "v2")
VALID_DEPTHS = (18, 34, 50, 101, 152, 200)
PROJ_HEAD_MODES = ("none", "linear", "nonlinear")
OPTIMIZERS = ("momentum", "adam", "lars")
LR_SCALINGS = ("linear", "sqrt")


def _check(ok: bool, argument: str, message: str) -> None:
    if not ok:
        raise ArgumentError(argument, message)


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """The paper's view generation (crop + resize, flip, colour jitter, grayscale, blur).

    Args:
        image_size: side of the square views in pixels.
        color_jitter_strength: s of the colour jitter (brightness/contrast/saturation 0.8 s, hue 0.2 s).
        use_blur: Gaussian blur with probability 0.5 (pretraining views only, as in the reference).
        brightness: "v2" multiplicative brightness (reference default) or "v1" additive.
    """

    image_size: int = 224
    color_jitter_strength: float = 1.0
    use_blur: bool = True
    brightness: str = "v2"

    def __post_init__(self) -> None:
        _check(self.image_size >= 8, "image_size", f"must be >= 8, got {self.image_size}")
        _check(self.color_jitter_strength >= 0, "color_jitter_strength",
               f"must be >= 0, got {self.color_jitter_strength}")
        _check(self.brightness in BRIGHTNESS_IMPLS, "brightness",
               f"must be one of {BRIGHTNESS_IMPLS}, got {self.brightness!r}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Backbone + heads of `SimCLRModel` (everything but the number of classes, which the data decides).

    Args:
        resnet_depth: 18, 34, 50, 101, 152 or 200.
        width_multiplier: channel multiplier (fractions allowed).
        sk_ratio: selective-kernel ratio (0: off). Any depth takes the ResNet-D stem and shortcuts; only
            bottleneck blocks have a 3x3 conv for SK to replace (as in the reference).
        se_ratio: squeeze-excitation ratio (0: off).
        image_size: input side; 32 px and below use the CIFAR stem.
        proj_head_mode: "none", "linear" or "nonlinear".
        proj_out_dim: width of the last projection layer.
        num_proj_layers: layers of the nonlinear head.
        ft_proj_selector: projection layer the supervised head reads (0: h itself, -1: last).
        batch_norm_decay: BN moving-average momentum.
        global_bn: BN statistics over all replicas.
        fine_tune_after_block: freeze the backbone up to this block (-1: train everything).
        linear_eval_stop_gradient: the supervised head sees stop_gradient(h) (online linear eval).
        supervised_head: build a supervised head when the data has classes (no head when nothing would train
            it: pretraining without online linear eval).
        recompute: training keeps only the stem's and each residual block's input and recomputes its
            activations in the backward pass (less memory, one more forward pass; the same numbers).
        recompute_groups: with `recompute`, only the stem and block groups 1..k are recomputed (0..4).
    """

    resnet_depth: int = 50
    width_multiplier: float = 1.0
    sk_ratio: float = 0.0
    se_ratio: float = 0.0
    image_size: int = 224
    proj_head_mode: str = "nonlinear"
    proj_out_dim: int = 128
    num_proj_layers: int = 3
    ft_proj_selector: int = 0
    batch_norm_decay: float = 0.9
    global_bn: bool = True
    fine_tune_after_block: int = -1
    linear_eval_stop_gradient: bool = True
    supervised_head: bool = True
    recompute: bool = False
    recompute_groups: int = 4

    def __post_init__(self) -> None:
        _check(self.resnet_depth in VALID_DEPTHS, "resnet_depth",
               f"must be one of {VALID_DEPTHS}, got {self.resnet_depth}")
        _check(self.width_multiplier > 0, "width_multiplier", f"must be > 0, got {self.width_multiplier}")
        _check(self.sk_ratio >= 0, "sk_ratio", "must be >= 0")
        _check(self.se_ratio >= 0, "se_ratio", "must be >= 0")
        _check(0 <= self.recompute_groups <= 4, "recompute_groups", f"must be in 0..4, got {self.recompute_groups}")
        _check(-1 <= self.fine_tune_after_block <= 4, "fine_tune_after_block",
               f"must be in -1..4, got {self.fine_tune_after_block}")
        _check(self.proj_head_mode in PROJ_HEAD_MODES, "proj_head_mode",
               f"must be one of {PROJ_HEAD_MODES}, got {self.proj_head_mode!r}")
        _check(self.proj_head_mode != "nonlinear" or self.num_proj_layers >= 1, "num_proj_layers",
               f"must be >= 1 with a nonlinear head, got {self.num_proj_layers}")
        top = {"none": 0, "linear": 1, "nonlinear": self.num_proj_layers}[self.proj_head_mode]
        _check(-1 <= self.ft_proj_selector <= top, "ft_proj_selector",
               f"must be in -1..{top} for --proj_head_mode={self.proj_head_mode}, got {self.ft_proj_selector}")

    def model_kwargs(self, num_classes: int) -> dict:
        """Keyword arguments of `SimCLRModel` for `num_classes` supervised outputs (0: no supervised head)."""
        kwargs = dataclasses.asdict(self)
        del kwargs["supervised_head"]
        return dict(kwargs, num_classes=num_classes if self.supervised_head else 0)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """The optimizer; its learning rate comes from the schedule (see ScheduleConfig).

    Args:
        optimizer: "lars", "momentum" or "adam".
        momentum: momentum of LARS / SGD.
        weight_decay: L2 coefficient (decoupled in LARS, a loss term otherwise).
    """

    optimizer: str = "lars"
    momentum: float = 0.9
    weight_decay: float = 1e-6

    def __post_init__(self) -> None:
        _check(self.optimizer in OPTIMIZERS, "optimizer", f"must be one of {OPTIMIZERS}, got {self.optimizer!r}")


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """How long to train and how often to checkpoint; turned into step counts by `schedules.Schedule`.

    Args:
        train_batch_size: global batch.
        train_steps: steps to train (0: from train_epochs).
        train_epochs: epochs to train when train_steps is 0.
        warmup_epochs: epochs of linear warmup.
        checkpoint_steps: steps between checkpoints (0: from checkpoint_epochs).
        checkpoint_epochs: epochs between checkpoints when checkpoint_steps is 0.
        steps_per_loop: steps per host round trip (0: up to a checkpoint, at most 100).
        learning_rate: the base rate: per 256 examples ("linear") or the sqrt rule's constant ("sqrt").
        learning_rate_scaling: "linear" or "sqrt".
    """

    train_batch_size: int = 512
    train_steps: int = 0
    train_epochs: float = 100
    warmup_epochs: float = 10
    checkpoint_steps: int = 0
    checkpoint_epochs: float = 1
    steps_per_loop: int = 0
    learning_rate: float = 0.3
    learning_rate_scaling: str = "linear"

    def __post_init__(self) -> None:
        _check(self.train_batch_size > 0, "train_batch_size", f"must be > 0, got {self.train_batch_size}")
        _check(self.train_steps >= 0, "train_steps", "must be >= 0")
        _check(self.train_epochs >= 0, "train_epochs", "must be >= 0")
        _check(self.learning_rate_scaling in LR_SCALINGS, "learning_rate_scaling",
               f"must be one of {LR_SCALINGS}, got {self.learning_rate_scaling!r}")


@dataclasses.dataclass(frozen=True)
class ContrastConfig:
    """The NT-Xent loss of pretraining, and SimCLRv2's memory of negatives (docs/design.md §4.4).

    Args:
        temperature: tau of the softmax over similarities.
        hidden_norm: L2-normalise the projections first (cosine similarity).
        memory_size: K, the projections of past batches (from a momentum copy of the encoder) kept as extra
            negatives; 0: no memory, plain SimCLR.
        memory_momentum: m of the momentum copy's update w_m <- m w_m + (1 - m) w, in [0, 1).
    """

    temperature: float = 0.1
    hidden_norm: bool = True
    memory_size: int = 0
    memory_momentum: float = 0.999

    def __post_init__(self) -> None:
        _check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        _check(self.memory_size >= 0, "memory_size", f"must be >= 0 (0: no memory), got {self.memory_size}")
        _check(0.0 <= self.memory_momentum < 1.0, "memory_momentum",
               f"must be in [0, 1), got {self.memory_momentum}")


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """Distillation from a frozen teacher.

    Args:
        teacher_checkpoint: the teacher's model_dir, checkpoint prefix or SavedModel.
        distill_temperature: tau of both softmaxes.
        distill_alpha: weight of the label cross-entropy (0: pure distillation).
        teacher_resnet_depth / teacher_width_multiplier / teacher_sk_ratio: the teacher's architecture when
            its checkpoint does not say.
    """

    teacher_checkpoint: Optional[str] = None
    distill_temperature: float = 1.0
    distill_alpha: float = 0.0
    teacher_resnet_depth: Optional[int] = None
    teacher_width_multiplier: Optional[float] = None
    teacher_sk_ratio: Optional[float] = None

    def __post_init__(self) -> None:
        _check(0.0 <= self.distill_alpha <= 1.0, "distill_alpha", f"must be in [0, 1], got {self.distill_alpha}")
        _check(self.distill_temperature > 0, "distill_temperature",
               f"must be > 0, got {self.distill_temperature}")


def section_from(cls: type, values: Any, **overrides: Any) -> Any:
    """Builds section `cls` from an object (or mapping) whose attributes share the section's field names."""
    get = values.get if isinstance(values, dict) else lambda name: getattr(values, name)
    fields = {f.name: get(f.name) for f in dataclasses.fields(cls) if f.name not in overrides}
    return cls(**fields, **overrides)
