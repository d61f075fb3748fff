"""What `run.py` does with a Config: train, eval (following checkpoints) or both, then export."""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Dict, Iterator, Optional

import keras
import tensorflow as tf
from absl import logging

from simclr_tf import checkpoints as ckpt_lib
from simclr_tf import evaluate as eval_lib
from simclr_tf.config import Config
from simclr_tf.data.sources import DataSource, build_source
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


def prepare(config: Config) -> tuple:
    """Everything that can reject the input, before any work: strategy, batch sizes, data source."""
    strategy = build_strategy(config.strategy, num_cpu_replicas=config.num_cpu_replicas,
                              use_tpu=config.use_tpu, use_tpu_explicit=config.use_tpu_explicit,
                              tpu_name=config.tpu_name, tpu_zone=config.tpu_zone,
                              gcp_project=config.gcp_project, master=config.master)
    if config.mode != "eval":
        check_batch_divisible(config.train_batch_size, strategy, "--train_batch_size")
    source = build_source(config.dataset, config.data_dir, config.train_split, config.eval_split)
    wants_eval = config.mode != "train" and (config.train_mode != "pretrain"
                                             or config.lineareval_while_pretraining)
    if wants_eval and not source.eval_has_labels:
        raise UsageError("--eval_split", f"split {config.eval_split!r} of {config.dataset} has no labels; "
                         "pick a labelled split or use --mode=train")
    if config.train_mode == "finetune" and config.mode != "eval" and source.num_classes < 1:
        raise UsageError("--train_split", "fine-tuning needs labels")
    return strategy, source


def main(config: Config, log: Callable[[str], None] = print) -> Dict[str, float]:
    if config.seed is not None:
        keras.utils.set_random_seed(config.seed)  # initial weights; the input pipeline has its own seeds
    strategy, source = prepare(config)
    with _writing(f"cannot create {config.model_dir}"):
        tf.io.gfile.makedirs(config.model_dir)
    log(f"dataset {source.name}: {source.num_train} train / {source.num_eval} eval examples, "
        f"{source.num_classes} classes")
    result: Dict[str, float] = {}
    if config.mode in ("train", "train_then_eval"):
        with _writing(f"cannot write {os.path.join(config.model_dir, 'flags.json')}"):
            write_flags_json(config)
        teacher = (_build_teacher(config, strategy, source.num_classes) if config.train_mode == "distill"
                   else None)
        trainer = Trainer(config, strategy, source, teacher=teacher, log=log)
        trainer.train()
        if trainer.preempted:
            return result
        model, step = trainer.model, int(trainer.global_step.numpy())
        # Non-chief workers of a multi-worker run do the same (collective) work but write apart.
        out_config = config if trainer.is_chief else config.replace(model_dir=trainer.manager.directory)
        if config.mode == "train_then_eval":
            result = evaluate_and_record(out_config, model, source, strategy, step, log)
        export_run(out_config, model, step, log)
    else:
        result = follow_and_evaluate(config, source, strategy, log)
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
    else:
        result = eval_lib.evaluate(model, source, strategy, image_size=config.image_size,
                                   eval_batch_size=config.eval_batch_size, eval_steps=config.eval_steps)
        log(f"eval at step {step}: top-1 {result['top1']:.4f} top-5 {result['top5']:.4f} "
            f"over {result['num_examples']} examples")
    if config.knn_every_steps > 0:
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
                        timeout: float = EVAL_FOLLOW_TIMEOUT_SECONDS) -> Dict[str, float]:
    """`--mode=eval`: evaluates each new checkpoint in model_dir until the last training step.

    Reads only checkpoints named by the `checkpoint` state file, which TF updates after a checkpoint is
    completely written, so a checkpoint being written is never read.
    """
    final_step = Schedule.from_config(config.schedule, source.num_train).train_steps
    model = build_model(config.model, source.num_classes, strategy, mixed_precision=config.mixed_precision)
    step_var = tf.Variable(0, dtype=tf.int64)
    ckpt = tf.train.Checkpoint(model=model, global_step=step_var)
    result: Dict[str, float] = {}
    if tf.train.latest_checkpoint(config.model_dir) is None and config.checkpoint:
        # Nothing trained here: evaluate and export the given checkpoint (ours or an official one).
        prefix = ckpt_lib.initialise_from_checkpoint(model, config.checkpoint, use_ema=config.use_ema)
        step = ckpt_lib.checkpoint_step(prefix) or 0
        log(f"evaluating {prefix}")
        result = evaluate_and_record(config, model, source, strategy, step, log)
        export_run(config, model, step, log)
        return result
    for prefix in tf.train.checkpoints_iterator(config.model_dir, timeout=timeout):
        try:
            ckpt.read(prefix).expect_partial()
        except tf.errors.NotFoundError:  # removed by keep_checkpoint_max meanwhile: a newer one exists
            continue
        step = int(step_var.numpy())
        result = evaluate_and_record(config, model, source, strategy, step, log)
        if step >= final_step:
            # The trainer exports its last step itself; export here only what it has not.
            if not tf.io.gfile.exists(os.path.join(config.model_dir, "saved_model", str(step))):
                export_run(config, model, step, log)
            break
    else:
        log(f"no new checkpoint in {config.model_dir} for {timeout:.0f} s; stopping")
    return result


def export_run(config: Config, model, step: int, log: Callable[[str], None]) -> Optional[str]:
    """Exports `model` at `step` as a SavedModel under model_dir/saved_model/<step>; returns its path."""
    from simclr_tf import export

    with _writing(f"cannot write the SavedModel of step {step} in {config.model_dir}",
                  "; earlier exports are untouched"):
        path = export.export_model(model, model_dir=config.model_dir, step=step, image_size=config.image_size,
                                   keep=config.keep_hub_module_max)
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
