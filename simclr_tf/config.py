"""Flags -> a frozen `Config`: the only module that touches absl FLAGS.

Every flag of the official `tf2/run.py` is defined here with the same name, type, default and meaning, so
existing commands and flagfiles keep working. Deliberate differences (documented in README):

* `--width_multiplier` is a float (default 1) so fractional widths (0.25, 0.5) work; integers parse as before.
* `--use_tpu` keeps its default True but means "use a TPU when one is present"; only an explicit
  `--use_tpu=true` demands a TPU. The strategy otherwise follows the hardware (`--strategy=auto`).
* `--train_mode` also accepts `distill`.
* `--eval_split` keeps its default `validation`, but left at it, a dataset without that split (npz, folder and
  embedded datasets) is evaluated on its `test` split; a run that evaluates nothing needs no eval split.

Everything below this module takes explicit arguments (or this dataclass), never FLAGS.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import sys
from typing import Any, Iterator, Optional, Union

from absl import flags

from simclr_tf.errors import ArgumentError, UsageError
from simclr_tf.hardware import MIXED_PRECISION_DTYPES
from simclr_tf.sections import (AugmentConfig, ContrastConfig, DistillConfig, ModelConfig, OptimConfig,
                                ScheduleConfig, section_from)

STRATEGIES = ("auto", "one_device", "mirrored", "tpu", "multi_worker")
# The official default of --eval_split. Left at it, a dataset without this split is evaluated on its `test`
# split instead (app.prepare), since npz, folder and embedded datasets have no `validation`.
DEFAULT_EVAL_SPLIT = "validation"


def define_flags(fv: flags.FlagValues = flags.FLAGS) -> None:
    """Defines every flag on `fv` (idempotent per FlagValues)."""
    if "learning_rate" in fv:
        return
    f = dict(flag_values=fv)
    # ---- The official tf2/run.py flags: names, types, defaults and meanings unchanged. ----
    flags.DEFINE_float("learning_rate", 0.3, "Initial learning rate per batch size of 256.", **f)
    flags.DEFINE_enum("learning_rate_scaling", "linear", ["linear", "sqrt"],
                      "How to scale the learning rate as a function of batch size.", **f)
    flags.DEFINE_float("warmup_epochs", 10, "Number of epochs of warmup.", **f)
    flags.DEFINE_float("weight_decay", 1e-6, "Amount of weight decay to use.", **f)
    flags.DEFINE_float("batch_norm_decay", 0.9, "Batch norm decay parameter.", **f)
    flags.DEFINE_integer("train_batch_size", 512, "Batch size for training.", **f)
    flags.DEFINE_string("train_split", "train", "Split for training (TFDS slicing such as train[:10%] works).", **f)
    flags.DEFINE_integer("train_epochs", 100, "Number of epochs to train for.", **f)
    flags.DEFINE_integer("train_steps", 0, "Number of steps to train for. If provided, overrides train_epochs.", **f)
    flags.DEFINE_integer("eval_steps", 0, "Number of steps to eval for. If not provided, evals over entire dataset.", **f)
    flags.DEFINE_integer("eval_batch_size", 256, "Batch size for eval.", **f)
    flags.DEFINE_integer("checkpoint_epochs", 1, "Number of epochs between checkpoints/summaries.", **f)
    flags.DEFINE_integer("checkpoint_steps", 0, "Number of steps between checkpoints/summaries. "
                         "If provided, overrides checkpoint_epochs.", **f)
    flags.DEFINE_string("eval_split", DEFAULT_EVAL_SPLIT, "Split for evaluation. Left at its default, a dataset "
                        "without a 'validation' split is evaluated on its 'test' split.", **f)
    flags.DEFINE_string("dataset", "imagenet2012", "Name of a TFDS dataset, folder:PATH, npz:PATH, or the "
                        "embedded default (see README).", **f)
    flags.DEFINE_bool("cache_dataset", False, "Whether to cache the entire decoded dataset in memory.", **f)
    flags.DEFINE_enum("mode", "train", ["train", "eval", "train_then_eval"],
                      "Whether to perform training or evaluation.", **f)
    flags.DEFINE_enum("train_mode", "pretrain", ["pretrain", "finetune", "distill"],
                      "The train mode controls different objectives and trainable components.", **f)
    flags.DEFINE_bool("lineareval_while_pretraining", True,
                      "Whether to finetune supervised head while pretraining.", **f)
    flags.DEFINE_string("checkpoint", None, "Loading from the given checkpoint for fine-tuning if a finetuning "
                        "checkpoint does not already exist in model_dir. Accepts a simclr_tf model_dir or "
                        "checkpoint prefix, or an official SimCLR TF1 checkpoint.", **f)
    flags.DEFINE_bool("zero_init_logits_layer", False,
                      "If True, zero initialize layers after avg_pool for supervised learning.", **f)
    flags.DEFINE_integer("fine_tune_after_block", -1, "The layers after which block that we will fine-tune. -1 "
                         "means fine-tuning everything. 0 means fine-tuning after stem block. 4 means "
                         "fine-tuning just the linear head.", **f)
    flags.DEFINE_string("master", None, "Address/name of the TensorFlow master to use.", **f)
    flags.DEFINE_string("model_dir", None, "Model directory for training.", **f)
    flags.DEFINE_string("data_dir", None, "Directory where dataset is stored.", **f)
    flags.DEFINE_bool("use_tpu", True, "Whether to run on TPU. Default: use a TPU when one is present; "
                      "an explicit --use_tpu=true requires one.", **f)
    flags.DEFINE_string("tpu_name", None, "The Cloud TPU to use for training.", **f)
    flags.DEFINE_string("tpu_zone", None, "[Optional] GCE zone where the Cloud TPU is located in.", **f)
    flags.DEFINE_string("gcp_project", None, "[Optional] Project name for the Cloud TPU-enabled project.", **f)
    flags.DEFINE_enum("optimizer", "lars", ["momentum", "adam", "lars"], "Optimizer to use.", **f)
    flags.DEFINE_float("momentum", 0.9, "Momentum parameter.", **f)
    flags.DEFINE_string("eval_name", None, "Name for eval.", **f)
    flags.DEFINE_integer("keep_checkpoint_max", 5, "Maximum number of checkpoints to keep.", **f)
    flags.DEFINE_integer("keep_hub_module_max", 1, "Maximum number of exported SavedModels to keep.", **f)
    flags.DEFINE_float("temperature", 0.1, "Temperature parameter for contrastive loss.", **f)
    flags.DEFINE_boolean("hidden_norm", True, "Whether to L2-normalise the projections in the contrastive loss.", **f)
    flags.DEFINE_integer("memory_size", 0, "SimCLRv2's memory of negatives: keep the projections of this many "
                         "past examples, from a momentum copy of the encoder, as extra negatives (0: off, plain "
                         "SimCLR). Pretraining only.", **f)
    flags.DEFINE_float("memory_momentum", 0.999, "Momentum m of the memory's encoder copy, updated after every "
                       "step as m * copy + (1 - m) * encoder; in [0, 1).", **f)
    flags.DEFINE_enum("proj_head_mode", "nonlinear", ["none", "linear", "nonlinear"],
                      "How the head projection is done.", **f)
    flags.DEFINE_integer("proj_out_dim", 128, "Number of head projection dimension.", **f)
    flags.DEFINE_integer("num_proj_layers", 3, "Number of non-linear head layers.", **f)
    flags.DEFINE_integer("ft_proj_selector", 0, "Which layer of the projection head to use during fine-tuning. "
                         "0 means no projection head, and -1 means the final layer.", **f)
    flags.DEFINE_boolean("global_bn", True, "Whether to aggregate BN statistics across distributed cores.", **f)
    flags.DEFINE_float("width_multiplier", 1, "Multiplier to change width of network (fractions allowed).", **f)
    flags.DEFINE_integer("resnet_depth", 50, "Depth of ResNet.", **f)
    flags.DEFINE_float("sk_ratio", 0., "If it is bigger than 0, it will enable SK. Recommendation: 0.0625.", **f)
    flags.DEFINE_float("se_ratio", 0., "If it is bigger than 0, it will enable SE.", **f)
    flags.DEFINE_integer("image_size", 224, "Input image size.", **f)
    flags.DEFINE_float("color_jitter_strength", 1.0, "The strength of color jittering.", **f)
    flags.DEFINE_boolean("use_blur", True, "Whether or not to use Gaussian blur for augmentation during "
                         "pretraining.", **f)
    # ---- Ours. ----
    flags.DEFINE_enum("strategy", "auto", list(STRATEGIES),
                      "tf.distribute strategy. auto: TPU if present, else all GPUs, else the CPU.", **f)
    flags.DEFINE_integer("num_cpu_replicas", 1, "With --strategy=mirrored on a machine without GPUs, split the "
                         "CPU into this many logical devices (replicas).", **f)
    flags.DEFINE_integer("seed", None, "Random seed for initialisation and augmentation (None: random).", **f)
    flags.DEFINE_enum("brightness", "v2", ["v1", "v2"], "Colour-jitter brightness: v2 multiplicative "
                      "(reference default), v1 additive.", **f)
    flags.DEFINE_integer("steps_per_loop", 0, "Training steps per host round-trip (0: up to checkpoint_steps, "
                         "at most 100, so progress shows regularly).", **f)
    flags.DEFINE_bool("jit_compile", False, "XLA-compile the train step (GPU/TPU users): one XLA program with one "
                      "replica; with several, each device's pieces between the cross-replica collectives "
                      "(sync BN, NT-Xent gather, gradient all-reduce).", **f)
    flags.DEFINE_bool("mixed_precision", False, "Compute in a 16-bit type (--mixed_precision_dtype); variables, "
                      "the loss and BN statistics stay float32.", **f)
    flags.DEFINE_enum("mixed_precision_dtype", "auto", list(MIXED_PRECISION_DTYPES), "With --mixed_precision: "
                      "the compute type. auto: bfloat16 where the devices compute in it natively (TPU, GPU of "
                      "compute capability 8.0+, CPU with avx512_bf16/amx), float16 with loss scaling on older "
                      "GPUs, float32 on other CPUs (bfloat16 is emulated there, many times slower).", **f)
    flags.DEFINE_bool("recompute", False, "Training keeps only the stem's and each residual block's input and "
                      "recomputes their activations in the backward pass: much less memory for one more forward "
                      "pass, the same gradients and BN statistics.", **f)
    flags.DEFINE_integer("recompute_groups", 4, "With --recompute, recompute only the stem and block groups "
                         "1..this (0..4): the early groups hold most of the activations for a quarter of the "
                         "compute each, so 2 keeps most of the memory saving for about half the extra time.", **f)
    flags.DEFINE_bool("tune_malloc", True, "Serve CPU tensors from glibc's heap, in one arena, instead of a fresh "
                      "memory map per large tensor (about 2x faster CPU training measured, lower peak RSS). No "
                      "effect without glibc or when MALLOC_* variables or LD_PRELOAD are set.", **f)
    flags.DEFINE_float("malloc_trim_secs", 0.0, "Every this many seconds, give the C heap's free pages back to "
                       "the system (glibc malloc_trim): the peak RSS follows the live memory, for some speed "
                       "(freed pages are zero-filled again when reused). With --recompute, 2 s keeps most of "
                       "the saving of 0.2 s at a fraction of its cost (BENCHMARKS.md). 0: off.", **f)
    flags.DEFINE_string("eval_dataset", None, "A labelled dataset (same forms as --dataset) for evaluation and "
                        "the kNN monitor, e.g. while pretraining on unlabelled images: its 'train' split is the kNN "
                        "memory, --eval_split its held-out split. Default: --dataset.", **f)
    flags.DEFINE_integer("knn_every_steps", 0, "Run the weighted-kNN monitor every N training steps (0: off).", **f)
    flags.DEFINE_integer("knn_k", 200, "Neighbours of the kNN monitor.", **f)
    flags.DEFINE_float("knn_temperature", 0.1, "Temperature of the kNN monitor's weights.", **f)
    flags.DEFINE_bool("use_ema", False, "Load the EMA copies of an official checkpoint where present.", **f)
    flags.DEFINE_string("teacher_checkpoint", None, "Distillation: the fine-tuned teacher (model_dir, checkpoint "
                        "or SavedModel).", **f)
    flags.DEFINE_integer("teacher_resnet_depth", None, "Teacher depth (default: teacher's flags.json, else "
                         "--resnet_depth).", **f)
    flags.DEFINE_float("teacher_width_multiplier", None, "Teacher width (default as for the depth).", **f)
    flags.DEFINE_float("teacher_sk_ratio", None, "Teacher SK ratio (default as for the depth).", **f)
    flags.DEFINE_float("distill_temperature", 1.0, "Distillation temperature tau.", **f)
    flags.DEFINE_float("distill_alpha", 0.0, "Loss = (1 - alpha) * distillation + alpha * label CE "
                       "where labels exist; 0 = pure distillation, no label is read.", **f)


@dataclasses.dataclass(frozen=True)
class Config:
    """Every setting of a run. Field names equal flag names."""

    learning_rate: float = 0.3
    learning_rate_scaling: str = "linear"
    warmup_epochs: float = 10
    weight_decay: float = 1e-6
    batch_norm_decay: float = 0.9
    train_batch_size: int = 512
    train_split: str = "train"
    train_epochs: int = 100
    train_steps: int = 0
    eval_steps: int = 0
    eval_batch_size: int = 256
    checkpoint_epochs: int = 1
    checkpoint_steps: int = 0
    eval_split: str = DEFAULT_EVAL_SPLIT
    dataset: str = "imagenet2012"
    cache_dataset: bool = False
    mode: str = "train"
    train_mode: str = "pretrain"
    lineareval_while_pretraining: bool = True
    checkpoint: Optional[str] = None
    zero_init_logits_layer: bool = False
    fine_tune_after_block: int = -1
    master: Optional[str] = None
    model_dir: Optional[str] = None
    data_dir: Optional[str] = None
    use_tpu: bool = True
    tpu_name: Optional[str] = None
    tpu_zone: Optional[str] = None
    gcp_project: Optional[str] = None
    optimizer: str = "lars"
    momentum: float = 0.9
    eval_name: Optional[str] = None
    keep_checkpoint_max: int = 5
    keep_hub_module_max: int = 1
    temperature: float = 0.1
    hidden_norm: bool = True
    memory_size: int = 0
    memory_momentum: float = 0.999
    proj_head_mode: str = "nonlinear"
    proj_out_dim: int = 128
    num_proj_layers: int = 3
    ft_proj_selector: int = 0
    global_bn: bool = True
    width_multiplier: float = 1.0
    resnet_depth: int = 50
    sk_ratio: float = 0.0
    se_ratio: float = 0.0
    image_size: int = 224
    color_jitter_strength: float = 1.0
    use_blur: bool = True
    strategy: str = "auto"
    num_cpu_replicas: int = 1
    seed: Optional[int] = None
    brightness: str = "v2"
    steps_per_loop: int = 0
    jit_compile: bool = False
    mixed_precision: bool = False
    mixed_precision_dtype: str = "auto"
    recompute: bool = False
    recompute_groups: int = 4
    tune_malloc: bool = True
    malloc_trim_secs: float = 0.0
    eval_dataset: Optional[str] = None
    knn_every_steps: int = 0
    knn_k: int = 200
    knn_temperature: float = 0.1
    use_ema: bool = False
    teacher_checkpoint: Optional[str] = None
    teacher_resnet_depth: Optional[int] = None
    teacher_width_multiplier: Optional[float] = None
    teacher_sk_ratio: Optional[float] = None
    distill_temperature: float = 1.0
    distill_alpha: float = 0.0
    # True only when the user typed --use_tpu=true (absl cannot tell an explicit default from no flag).
    use_tpu_explicit: bool = False
    # True when the user typed --eval_split (even =validation): that split or an error, never a substitute.
    # False (flag absent, or a Config built in code) still means "exactly this split" for any value other than
    # the default; see `eval_split_named`.
    eval_split_explicit: bool = False

    def replace(self, **changes: Any) -> "Config":
        return dataclasses.replace(self, **changes)

    @property
    def mixed_precision_request(self) -> Union[bool, str]:
        """What `models.build_model(mixed_precision=...)` takes: False, or the requested dtype ("auto", ...)."""
        return self.mixed_precision and self.mixed_precision_dtype

    @property
    def eval_split_named(self) -> bool:
        """Whether --eval_split names the split to use; False: the default, which may fall back to `test`."""
        return self.eval_split_explicit or self.eval_split != DEFAULT_EVAL_SPLIT

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    # The sections below are what the code takes; each is built once, on first use, from the flat fields.
    @functools.cached_property
    def augment(self) -> AugmentConfig:
        return section_from(AugmentConfig, self)

    @functools.cached_property
    def model(self) -> ModelConfig:
        # Online linear eval reads stop_gradient(h) while pretraining; fine-tuning trains through the head.
        # Pretraining without online linear eval has no head: nothing would train it, so it would only decay,
        # take momentum, be exported as meaningless logits and pass for a distillation teacher.
        pretrain = self.train_mode == "pretrain"
        return section_from(ModelConfig, self, linear_eval_stop_gradient=pretrain,
                            supervised_head=not pretrain or self.lineareval_while_pretraining)

    @functools.cached_property
    def optim(self) -> OptimConfig:
        return section_from(OptimConfig, self)

    @functools.cached_property
    def schedule(self) -> ScheduleConfig:
        return section_from(ScheduleConfig, self)

    @functools.cached_property
    def contrast(self) -> ContrastConfig:
        return section_from(ContrastConfig, self)

    @functools.cached_property
    def distill(self) -> DistillConfig:
        return section_from(DistillConfig, self)


@contextlib.contextmanager
def flag_errors() -> Iterator[None]:
    """Turns a section's `ArgumentError` (naming a field) into the `UsageError` naming its `--flag`.

    Section fields are named like their flags; this is the one place that relies on it.
    """
    try:
        yield
    except ArgumentError as e:
        raise UsageError(f"--{e.argument}", e.message) from None


def section(cls: type, **values: Any) -> Any:
    """Section `cls` from values given as command-line flags of the same names (e.g. preview's CLI).

    Args:
        cls: a section of simclr_tf.sections, e.g. AugmentConfig.
        **values: its fields.

    Raises:
        UsageError: naming the `--flag` of the first bad value.
    """
    with flag_errors():
        return cls(**values)


def validate(config: Config) -> Config:
    """Checks that need no data and no devices; raises UsageError naming the flag."""
    c = config
    with flag_errors():  # building a section runs its own checks
        for name in ("augment", "model", "schedule", "optim", "contrast") + (
                ("distill",) if c.train_mode == "distill" else ()):
            getattr(c, name)
    if c.eval_batch_size <= 0:
        raise UsageError("--eval_batch_size", f"must be > 0, got {c.eval_batch_size}")
    if c.train_mode == "pretrain" and c.fine_tune_after_block != -1:
        raise UsageError("--fine_tune_after_block", "only applies to --train_mode=finetune/distill; "
                         "pretraining trains the whole encoder (leave it at -1)")
    if c.memory_size > 0 and c.train_mode != "pretrain":
        raise UsageError("--memory_size", f"the memory of negatives is part of the contrastive loss: only "
                         f"--train_mode=pretrain uses it, not {c.train_mode} (leave it at 0)")
    if c.mixed_precision_dtype not in MIXED_PRECISION_DTYPES:
        raise UsageError("--mixed_precision_dtype",
                         f"must be one of {', '.join(MIXED_PRECISION_DTYPES)}, got {c.mixed_precision_dtype!r}")
    if c.num_cpu_replicas < 1:
        raise UsageError("--num_cpu_replicas", f"must be >= 1, got {c.num_cpu_replicas}")
    if not c.malloc_trim_secs >= 0:
        raise UsageError("--malloc_trim_secs", f"must be >= 0 seconds (0: off), got {c.malloc_trim_secs}")
    if c.keep_checkpoint_max < 1:
        raise UsageError("--keep_checkpoint_max", f"must be >= 1, got {c.keep_checkpoint_max}")
    if not c.model_dir:
        raise UsageError("--model_dir", "is required (checkpoints, summaries and results go there)")
    if c.checkpoint and not checkpoint_exists(c.checkpoint):
        raise UsageError("--checkpoint", f"no checkpoint at {c.checkpoint}")
    if c.train_mode == "distill":
        if not c.teacher_checkpoint:
            raise UsageError("--teacher_checkpoint", "is required with --train_mode=distill")
        if not checkpoint_exists(c.teacher_checkpoint):
            raise UsageError("--teacher_checkpoint", f"no checkpoint or SavedModel at {c.teacher_checkpoint}")
    if c.knn_every_steps < 0 or c.knn_k < 1:
        raise UsageError("--knn_every_steps" if c.knn_every_steps < 0 else "--knn_k", "must be positive")
    return c


def checkpoint_exists(path: str) -> bool:
    """A model_dir / directory with a checkpoint, a checkpoint prefix, or a SavedModel directory."""
    import tensorflow as tf  # deferred: flag parsing and --help should not pay TF's import time

    if tf.io.gfile.isdir(path):
        return (tf.train.latest_checkpoint(path) is not None
                or tf.io.gfile.exists(os.path.join(path, "saved_model.pb"))
                or bool(tf.io.gfile.glob(os.path.join(path, "*.index"))))
    return tf.io.gfile.exists(path + ".index")


def from_flags(fv: flags.FlagValues = flags.FLAGS) -> Config:
    """Reads the parsed flags into a validated Config."""
    names = {f.name for f in dataclasses.fields(Config)} - {"use_tpu_explicit", "eval_split_explicit"}
    values = {name: fv[name].value for name in names}
    values["width_multiplier"] = float(values["width_multiplier"])
    values["use_tpu_explicit"] = bool(fv["use_tpu"].present and fv["use_tpu"].value)
    values["eval_split_explicit"] = bool(fv["eval_split"].present)
    return validate(Config(**values))


def from_command_line(argv: list, fv: flags.FlagValues = flags.FLAGS) -> Config:
    """For absl `main(argv)` entry points: the Config, or a one-line error on stderr and exit status 2."""
    from absl import app

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        return from_flags(fv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
