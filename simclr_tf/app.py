"""What `run.py` does with a Config: train, eval (following checkpoints) or both, then export."""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Dict, Iterator, Optional, Sequence, Tuple, Union

import keras
import tensorflow as tf
from absl import logging

from simclr_tf import checkpoints as ckpt_lib
from simclr_tf import evaluate as eval_lib
from simclr_tf.config import Config
from simclr_tf.data.sources import DEFAULT_EVAL_SPLITS, DataSource, build_source
from simclr_tf.errors import UsageError, first_line
from simclr_tf.strategy import build_strategy, check_batch_divisible
from simclr_tf.models import build_model
from simclr_tf.schedules import Schedule
from simclr_tf.train import Trainer, write_flags_json

# What a failing write raises: permissions, no space (ResourceExhausted), file too large (OutOfRange), a path
# through a file (FailedPrecondition), a vanished directory (NotFound), remote stores (Unavailable).
_WRITE_ERRORS = (tf.errors.PermissionDeniedError, tf.errors.ResourceExhaustedError, tf.errors.OutOfRangeError,
                 tf.errors.FailedPreconditionError, tf.errors.NotFoundError, tf.errors.UnavailableError,
                 tf.errors.AlreadyExistsError, OSError)

# An eval job gives up when no new checkpoint appears for this long (the trainer probably died).
EVAL_FOLLOW_TIMEOUT_SECONDS = 6 * 3600


def prepare(config: Config, log: Callable[[str], None] = print) -> tuple:
    """Everything that can reject the input, before any work: strategy, batch sizes, data source.

    Args:
        config: the run.
        log: where the note goes when the default --eval_split is replaced by the dataset's `test` split.

    Returns:
        `(strategy, source)`.

    Raises:
        UsageError: naming the flag at fault (no usable eval split, unlabelled data where labels are needed,
            a batch the replicas cannot share).
    """
    strategy = build_strategy(config.strategy, num_cpu_replicas=config.num_cpu_replicas,
                              use_tpu=config.use_tpu, use_tpu_explicit=config.use_tpu_explicit,
                              tpu_name=config.tpu_name, tpu_zone=config.tpu_zone,
                              gcp_project=config.gcp_project, master=config.master)
    if config.mode != "eval":
        check_batch_divisible(config.train_batch_size, strategy, "--train_batch_size")
    needs_eval = evaluates(config)
    separate = config.eval_dataset is not None  # then the training data needs no eval role
    # The folder source keeps its file index in model_dir, so a re-run (or the eval job) does not list the
    # folder again.
    source = build_source(config.dataset, config.data_dir, config.train_split,
                          None if separate else eval_split_request(config, needs_eval), index_dir=config.model_dir)
    if not separate:
        _check_eval_role(config, source, needs_eval, config.dataset, log)
        wants_labels = config.mode != "train" and (config.train_mode != "pretrain"
                                                   or config.lineareval_while_pretraining)
        if wants_labels and not source.eval_has_labels:
            raise UsageError("--eval_split", f"split {source.eval_split!r} of {config.dataset} has no labels; "
                             "pick a labelled split or use --mode=train")
    # Pretraining reads no label (the online head skips unlabelled examples), so only fine-tuning needs them.
    if config.train_mode == "finetune" and config.mode != "eval" and source.num_classes < 1:
        raise UsageError("--train_split", "fine-tuning needs labels")
    return strategy, source


def eval_source_for(config: Config, source: DataSource, log: Callable[[str], None] = print) -> DataSource:
    """The data that evaluation and the kNN monitor read: `--eval_dataset` when given, else `source`.

    `--eval_dataset` is for pretraining on unlabelled images while watching a labelled set: its `train`
    split is the kNN memory and its eval split (`--eval_split`, or the default's fallback) the held-out part;
    both must be labelled.

    Args:
        config: the run.
        source: the training data (`prepare`'s).
        log: where the note goes when the default --eval_split is replaced by `test`.
    """
    if config.eval_dataset is None:
        return source
    evaluation = build_source(config.eval_dataset, config.data_dir, "train", eval_split_request(config, True),
                              index_dir=config.model_dir)
    _check_eval_role(config, evaluation, True, config.eval_dataset, log)
    if evaluation.num_classes < 1 or not evaluation.eval_has_labels:
        raise UsageError("--eval_dataset", f"{config.eval_dataset} must be labelled (class folders, labels) in "
                                           f"its train and eval splits: kNN and evaluation compare labels")
    return evaluation


def _check_eval_role(config: Config, source: DataSource, needed: bool, dataset: str,
                     log: Callable[[str], None]) -> None:
    if needed and source.eval_split is None:
        raise UsageError("--eval_split", f"{dataset} has no {DEFAULT_EVAL_SPLITS[0]!r} or "
                         f"{DEFAULT_EVAL_SPLITS[1]!r} split; name one with --eval_split")
    if needed and not config.eval_split_named and source.eval_split != config.eval_split:
        log(f"--eval_split: no {config.eval_split!r} split in {dataset}; evaluating on {source.eval_split!r}")


def evaluates(config: Config) -> bool:
    """Whether the run reads its eval split: top-1/top-5 of a supervised head after training or in
    `--mode=eval`, or kNN (the monitor during training, and in the evaluation). The online head of a pretraining
    run trains on *train* labels, so `--mode=train` without the kNN monitor evaluates nothing.

    Args:
        config: the run.
    """
    has_head = config.train_mode != "pretrain" or config.lineareval_while_pretraining
    return (config.mode != "train" and has_head) or config.knn_every_steps > 0


def eval_split_request(config: Config, needed: bool) -> Union[str, Tuple[str, ...], None]:
    """What `build_source` gets for the eval role.

    A named --eval_split is used as given (an unknown split is an error, even if nothing evaluates: it is
    most likely a typo). Left at its default, the dataset's first split of `DEFAULT_EVAL_SPLITS` is used when
    the run evaluates, and none at all when it does not (a folder source then does not read the eval images).

    Args:
        config: the run.
        needed: whether the run evaluates (`evaluates(config)`).
    """
    if config.eval_split_named:
        return config.eval_split
    return DEFAULT_EVAL_SPLITS if needed else None


def warmup_warning(config: Config, num_train: int) -> Optional[str]:
    """The line to log when warmup lasts the whole run (the learning rate never reaches its peak), else None.

    `--train_epochs=1` with the default `--warmup_epochs=10` is such a run: on ImageNet-sized data it trains
    for a tenth of its warmup, at a tenth of the peak rate at most, and nothing else says so.

    Args:
        config: the run (its schedule flags).
        num_train: training examples (the step counts follow from them).
    """
    schedule = Schedule.from_config(config.schedule, num_train)
    if schedule.warmup_steps <= 0 or schedule.warmup_steps < schedule.train_steps:
        return None
    return (f"warning: --warmup_epochs={config.warmup_epochs:g} is {schedule.warmup_steps} warmup steps, not fewer "
            f"than this run's {schedule.train_steps} training steps: the learning rate never reaches its peak "
            f"{schedule.learning_rate:g}; lower --warmup_epochs")


def main(config: Config, log: Callable[[str], None] = print) -> Dict[str, float]:
    """Runs `config`: trains (then evaluates) and exports, or follows a training run's checkpoints.

    Args:
        config: the run.
        log: where progress, notes and warnings go, one line each.

    Returns:
        The last evaluation's result (empty when nothing was evaluated).
    """
    if config.seed is not None:
        keras.utils.set_random_seed(config.seed)  # initial weights; the input pipeline has its own seeds
    strategy, source = prepare(config, log)
    evaluation = eval_source_for(config, source, log)
    with _writing(f"cannot create {config.model_dir}"):
        tf.io.gfile.makedirs(config.model_dir)
    evals = f"{source.num_eval} eval examples" if source.eval_split is not None else "no eval split"
    log(f"dataset {source.name}: {source.num_train} train / {evals}, {source.num_classes} classes")
    if evaluation is not source:
        log(f"evaluating on {evaluation.name}: {evaluation.num_train} train (kNN memory) / "
            f"{evaluation.num_eval} eval examples, {evaluation.num_classes} classes")
    result: Dict[str, float] = {}
    if config.mode in ("train", "train_then_eval"):
        warning = warmup_warning(config, source.num_train)
        if warning:
            log(warning)
        with _writing(f"cannot write {os.path.join(config.model_dir, 'flags.json')}"):
            write_flags_json(config)
        teacher = (_build_teacher(config, strategy, source.num_classes) if config.train_mode == "distill"
                   else None)
        trainer = Trainer(config, strategy, source, teacher=teacher, log=log, eval_source=evaluation)
        trainer.train()
        if trainer.preempted:
            return result
        model, step = trainer.model, int(trainer.global_step.numpy())
        # Non-chief workers of a multi-worker run do the same (collective) work but write apart.
        out_config = config if trainer.is_chief else config.replace(model_dir=trainer.manager.directory)
        if config.mode == "train_then_eval":
            result = evaluate_and_record(out_config, model, evaluation, strategy, step, log)
        export_run(out_config, model, step, log, class_names=source.class_names)
    else:
        result = follow_and_evaluate(config, source, strategy, log, eval_source=evaluation)
    return result


def evaluate_and_record(config: Config, model, source: DataSource, strategy, step: int,
                        log: Callable[[str], None]) -> Dict[str, float]:
    """Top-1/top-5 of the supervised head and, with --knn_every_steps, kNN top-1; written to result.json.

    Args:
        config: the run (eval split, batch, kNN settings, model_dir).
        model: the trained model.
        source: the data.
        strategy: where eval runs.
        step: the training step the model is at (recorded with the result).
        log: where the result line goes.
    """
    result: Dict[str, float] = {}
    if config.train_mode == "pretrain" and not config.lineareval_while_pretraining:
        log("no supervised head (--lineareval_while_pretraining=false): skipping top-1/top-5 eval")
    elif config.eval_dataset is not None and config.train_mode == "pretrain":
        log("the online head learns the training data's classes, not --eval_dataset's: skipping top-1/top-5 eval")
    elif model.supervised_head is None:
        log("no supervised head (the training data has no labels): skipping top-1/top-5 eval")
    else:
        result = eval_lib.evaluate(model, source, strategy, image_size=config.image_size,
                                   eval_batch_size=config.eval_batch_size, eval_steps=config.eval_steps)
        log(f"eval at step {step}: top-1 {result['top1']:.4f} top-5 {result['top5']:.4f} "
            f"over {result['num_examples']} examples")
    if config.knn_every_steps > 0 or config.eval_dataset is not None:
        from simclr_tf import knn

        result.update(knn.evaluate_knn(model, source, image_size=config.image_size,
                                       batch_size=config.eval_batch_size, k=config.knn_k,
                                       temperature=config.knn_temperature, strategy=strategy))
        log(f"eval at step {step}: kNN top-1 {result['knn_top1']:.4f} (k={config.knn_k}, "
            f"temperature={config.knn_temperature:g})")
    if result:
        eval_lib.write_results(config.model_dir, result, step, config.eval_name)
    return result


def follow_and_evaluate(config: Config, source: DataSource, strategy, log: Callable[[str], None],
                        timeout: float = EVAL_FOLLOW_TIMEOUT_SECONDS, *,
                        eval_source: Optional[DataSource] = None) -> Dict[str, float]:
    """`--mode=eval`: evaluates each new checkpoint in model_dir until the last training step.

    Reads only checkpoints named by the `checkpoint` state file, which TF updates after a checkpoint is
    completely written, so a checkpoint being written is never read.

    Args:
        config: the run.
        source: the training data (its size gives the last step, its classes the model's head).
        strategy: where eval runs.
        log: where result lines go.
        timeout: seconds to wait for a new checkpoint before giving up.
        eval_source: the data evaluated (`eval_source_for`); None: `source`.
    """
    evaluation = source if eval_source is None else eval_source
    final_step = Schedule.from_config(config.schedule, source.num_train).train_steps
    model = build_model(config.model, source.num_classes, strategy,
                        mixed_precision=config.mixed_precision_request)
    step_var = tf.Variable(0, dtype=tf.int64)
    ckpt = tf.train.Checkpoint(model=model, global_step=step_var)
    result: Dict[str, float] = {}
    if tf.train.latest_checkpoint(config.model_dir) is None and config.checkpoint:
        # Nothing trained here: evaluate and export the given checkpoint (ours or an official one).
        prefix = ckpt_lib.initialise_from_checkpoint(model, config.checkpoint, use_ema=config.use_ema)
        step = ckpt_lib.checkpoint_step(prefix) or 0
        log(f"evaluating {prefix}")
        result = evaluate_and_record(config, model, evaluation, strategy, step, log)
        export_run(config, model, step, log, class_names=source.class_names)
        return result
    for prefix in tf.train.checkpoints_iterator(config.model_dir, timeout=timeout):
        try:
            ckpt.read(prefix).expect_partial()
        except tf.errors.NotFoundError:  # removed by keep_checkpoint_max meanwhile: a newer one exists
            continue
        step = int(step_var.numpy())
        result = evaluate_and_record(config, model, evaluation, strategy, step, log)
        if step >= final_step:
            # The trainer exports its last step itself; export here only what it has not.
            if not tf.io.gfile.exists(os.path.join(config.model_dir, "saved_model", str(step))):
                export_run(config, model, step, log, class_names=source.class_names)
            break
    else:
        log(f"no new checkpoint in {config.model_dir} for {timeout:.0f} s; stopping")
    return result


def export_run(config: Config, model, step: int, log: Callable[[str], None], *,
               class_names: Optional[Sequence[str]] = None) -> Optional[str]:
    """Exports `model` at `step` as a SavedModel under model_dir/saved_model/<step>; returns its path.

    Args:
        config: the run (model_dir, image size, how many exports to keep).
        model: the model to export.
        step: its training step (the export's version folder).
        log: where the line naming the export goes.
        class_names: the dataset's label names (`DataSource.class_names`), stored in the export so that
            `simclr_tf.predict` can print them; None: unknown.
    """
    from simclr_tf import export

    with _writing(f"cannot write the SavedModel of step {step} in {config.model_dir}",
                  "; earlier exports are untouched"):
        path = export.export_model(model, model_dir=config.model_dir, step=step, image_size=config.image_size,
                                   keep=config.keep_hub_module_max, class_names=class_names)
    log(f"exported SavedModel to {path}")
    return path


@contextlib.contextmanager
def _writing(what: str, consequence: str = "") -> Iterator[None]:
    """Turns a failed write (read-only or full disk, a path through a file) into one line naming the flag."""
    try:
        yield
    except _WRITE_ERRORS as e:
        raise UsageError("--model_dir", f"{what}: {first_line(e)}{consequence}") from None


def _build_teacher(config: Config, strategy, num_classes: int) -> Callable:
    from simclr_tf import distill

    return distill.build_teacher(config, strategy, num_classes)


def configure_logging() -> None:
    logging.set_verbosity(logging.WARNING)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
