"""The training loop: runs a task's steps, checkpoints, logs and monitors on the schedule's boundaries.

What is trained and how the loss is formed lives in `simclr_tf.tasks`; this module only drives it. Many steps
run per host round trip (a `tf.range` loop inside one `tf.function`), sized so that checkpoints land exactly
on `checkpoint_steps` boundaries and training stops exactly at `train_steps`.

`Trainer.run_steps` is the one public way to run training steps on batches the caller gives: tests,
benchmarks and external equivalence checks use it, and `Trainer.train` runs the same compiled loop on the
input pipeline.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import keras
import numpy as np
import tensorflow as tf

from simclr_tf import checkpoints as ckpt_lib
from simclr_tf import knn, optimizers, progress, schedules, tasks, xla
from simclr_tf.config import Config
from simclr_tf.data import pipeline
from simclr_tf.data.sources import DataSource
from simclr_tf.data.sources.decoding import SkippedImages
from simclr_tf.errors import NonFiniteLossError
from simclr_tf.files import write_text_atomically
from simclr_tf.models import build_model, mixed_precision_policy
from simclr_tf.strategy import is_chief, is_tpu

__all__ = ["NonFiniteLossError", "Trainer", "write_flags_json"]

Batch = Tuple[np.ndarray, np.ndarray]


class Trainer:
    """Owns the model, optimizer, checkpoints and summaries of one run in `config.model_dir`.

    Args:
        config: the run's settings.
        strategy: where the model's variables live and steps run.
        source: the data (its size fixes the schedule; its class count the supervised head).
        teacher: images -> logits of the frozen teacher (distillation only).
        log: where progress lines go.
        eval_source: the labelled data of the kNN monitor (`--eval_dataset`); None: `source`.
    """

    def __init__(self, config: Config, strategy: tf.distribute.Strategy, source: DataSource,
                 teacher: Optional[Callable] = None, log: Callable[[str], None] = print,
                 eval_source: Optional[DataSource] = None) -> None:
        self.config, self.strategy, self.source, self.log = config, strategy, source, log
        self.eval_source = source if eval_source is None else eval_source
        self.schedule = schedules.Schedule.from_config(config.schedule, source.num_train)
        self.model = build_model(config.model, source.num_classes, strategy,
                                 mixed_precision=config.mixed_precision_request)
        self.task = tasks.build_task(config, self.model, teacher, strategy=strategy)
        with strategy.scope():
            self.global_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
            rate = schedules.WarmupCosineSchedule(self.schedule.learning_rate, self.schedule.warmup_steps,
                                                  self.schedule.train_steps)
            # float16 gradients underflow without loss scaling; bfloat16 has float32's range.
            self.optimizer = optimizers.optimizer_for(
                self.model, config.optim, schedules.at_step(rate, self.global_step),
                loss_scaling=mixed_precision_policy(strategy, config.mixed_precision_request) == "mixed_float16")
        # The architecture travels inside every checkpoint, so whoever rebuilds the model from it (a
        # distillation teacher) builds the network that was trained, whatever flags they pass.
        # The task's own state (the memory of negatives: docs/design.md §4.4) is part of an exact resume.
        parts = dict(model=self.model, optimizer=self.optimizer, global_step=self.global_step,
                     **self.task.trackables())
        self.checkpoint = tf.train.Checkpoint(**parts, architecture=ckpt_lib.RecordedArchitecture(config.model))
        self._legacy_checkpoint = tf.train.Checkpoint(**parts)  # reads checkpoints written before that
        self.is_chief = is_chief(strategy)
        # Every multi-worker replica must save (saving is collective), but only the chief's copy is the
        # run's; the others keep their last one apart, in worker_<id>/, where it can be compared.
        ckpt_dir = config.model_dir if self.is_chief else os.path.join(
            config.model_dir, f"worker_{strategy.cluster_resolver.task_id}")
        self.manager = tf.train.CheckpointManager(self.checkpoint, ckpt_dir,
                                                  max_to_keep=config.keep_checkpoint_max if self.is_chief else 1)
        self.writer = (tf.summary.create_file_writer(config.model_dir) if self.is_chief
                       else tf.summary.create_noop_writer())
        # Image files that fail to decode are skipped when read; each input pipeline lists them in model_dir
        # (a local one: remote stores cannot append), where a resumed run reads them back.
        self.skipped = SkippedImages(None if "://" in config.model_dir else config.model_dir)
        self._loop_fn = None
        # Set by SIGTERM (preemption) or request_stop(): the loop finishes its chunk of steps, saves, returns.
        self._stop = threading.Event()
        self.preempted = False

    def restore(self) -> str:
        """Resumes from model_dir, else initialises the model from --checkpoint. Returns what happened."""
        cfg = self.config
        if ckpt_lib.resume(self.checkpoint, self.manager, legacy=self._legacy_checkpoint):
            return f"resumed from {self.manager.latest_checkpoint} at step {int(self.global_step.numpy())}"
        return ckpt_lib.initialise(self.model, cfg.checkpoint, use_ema=cfg.use_ema,
                                   zero_init_logits_layer=cfg.zero_init_logits_layer)

    def gradients_fn(self) -> Callable:
        """Per-replica `(images, labels) -> (metrics, grads)`; grads are of this replica's share of the loss."""
        replicas = self.strategy.num_replicas_in_sync
        scale_loss = isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer)

        def compute(images, labels):
            with tf.GradientTape() as tape:
                loss, metrics = self.task.loss(images, labels)
                # Gradients are summed over replicas, so each replica contributes its share of the mean.
                scaled = loss / replicas
                if scale_loss:
                    scaled = self.optimizer.scale_loss(scaled)
            return metrics, tape.gradient(scaled, self.model.trainable_variables)

        return compute

    def run_steps(self, batches: Union[Sequence[Batch], object], num_steps: Optional[int] = None
                  ) -> Dict[str, float]:
        """Runs training steps through the same compiled loop as `train()`; returns the mean metrics.

        Args:
            batches: global `(images, labels)` batches, one per step (replica r of R takes rows
                [r * b, (r + 1) * b) of each, b = batch / R); or an iterator over a distributed dataset,
                such as `strategy.distribute_datasets_from_function(input_fn)` gives.
            num_steps: how many steps; defaults to `len(batches)` (required with an iterator).

        Raises:
            NonFiniteLossError: a step's loss was NaN/Inf (the steps up to it were applied).
        """
        if isinstance(batches, (list, tuple)):
            num_steps = len(batches) if num_steps is None else num_steps
            batches = iter(self.strategy.distribute_datasets_from_function(_replica_shards(batches)))
        if num_steps is None:
            raise ValueError("num_steps: required when batches is an iterator")
        if self._loop_fn is None:
            self._loop_fn = _build_loop_fn(self.strategy, self._step_fn(), self.global_step)
        self.task.before_steps()  # e.g. the memory's momentum copy starts as a copy of a fresh run's weights
        means, bad_step = self._loop_fn(batches, tf.constant(num_steps))
        if int(bad_step) >= 0:
            raise NonFiniteLossError(f"non-finite loss at step {int(bad_step)}; training stopped without "
                                     f"saving. Last good checkpoint: {ckpt_lib.last_complete(self.manager)}")
        return {k: float(v) for k, v in means.items()}

    def request_stop(self) -> None:
        """Asks `train()` to stop after its current chunk of steps, saving a checkpoint (as SIGTERM does)."""
        self._stop.set()

    def train(self, on_checkpoint: Optional[Callable[[int], None]] = None) -> Dict[str, float]:
        """Trains from the restored step to the schedule's end, or until a stop is requested.

        Args:
            on_checkpoint: called with the step after each checkpoint is written.
        """
        cfg, sch = self.config, self.schedule
        self.log(self.restore())
        step = int(self.global_step.numpy())
        if step >= sch.train_steps:
            self.log(f"nothing to train: step {step} >= train_steps {sch.train_steps}")
            return {}
        input_fn = pipeline.build_input_fn(
            self.source, mode=cfg.train_mode, global_batch_size=cfg.train_batch_size, augment=cfg.augment,
            cache_dataset=cfg.cache_dataset, seed=cfg.seed, start_step=step, skipped=self.skipped)
        input_fn = _ending_after(input_fn, sch.train_steps - step)
        iterator = iter(self.strategy.distribute_datasets_from_function(input_fn))
        self.log(f"training {cfg.train_mode} from step {step} to {sch.train_steps} "
                 f"(batch {cfg.train_batch_size}, {self.strategy.num_replicas_in_sync} replica(s), "
                 f"lr {sch.learning_rate:g}, warmup {sch.warmup_steps} steps, checkpoint every "
                 f"{sch.checkpoint_steps})")
        if cfg.train_mode == "pretrain" and self.is_chief:
            progress.write_view_sample(self.writer, self.source, cfg.augment, step, seed=cfg.seed)
        _stop_on_sigterm(self._stop)
        shown = progress.Progress(self.writer, sch.train_steps, cfg.train_batch_size, self.log, step)
        knn_every = cfg.knn_every_steps
        knn_monitor = knn.make_monitor(  # weighted kNN top-1 of h, logged as knn/top1
            self.model, self.eval_source, image_size=cfg.image_size, batch_size=cfg.eval_batch_size, k=cfg.knn_k,
            temperature=cfg.knn_temperature, strategy=self.strategy, writer=self.writer,
            log=self.log) if knn_every > 0 else None
        metrics: Dict[str, float] = {}
        while step < sch.train_steps:
            n = sch.steps_until_event(step, sch.checkpoint_steps, knn_every)
            t0 = time.monotonic()
            metrics = self.run_steps(iterator, n)
            step = int(self.global_step.numpy())
            if self.is_chief:
                shown.chunk_done(step, metrics, n, time.monotonic() - t0,
                                 optimizers.current_learning_rate(self.optimizer), skipped=self.skipped.count)
            if sch.is_time(step, sch.checkpoint_steps):
                self._save(step)
                if on_checkpoint is not None:
                    on_checkpoint(step)
            if knn_monitor is not None and sch.is_time(step, knn_every, at_end=False):
                knn_monitor(step)
            if self._stop.is_set() and step < sch.train_steps:
                if not sch.is_time(step, sch.checkpoint_steps):
                    self._save(step)
                self.preempted = True
                self.log(f"stop requested (SIGTERM): saved checkpoint at step {step}; re-run the same "
                         "command to resume")
                break
        self.writer.flush()
        return metrics

    def _step_fn(self) -> Callable:
        compute, optimizer, variables = self.gradients_fn(), self.optimizer, self.model.trainable_variables
        task = self.task

        def step(images, labels):
            metrics, grads = compute(images, labels)
            # Head layers past --ft_proj_selector take no part in a fine-tuning loss: no gradient, no update.
            optimizer.apply_gradients([(g, v) for g, v in zip(grads, variables) if g is not None])
            task.after_step()  # after the update, in this trace: it reads the updated weights
            return metrics

        if self.config.jit_compile:
            return xla.compile_step(step, self.strategy)
        if is_tpu(self.strategy) or isinstance(self.strategy, tf.distribute.MultiWorkerMirroredStrategy):
            # A TPU program is compiled whole; the collective ops of several hosts must stay in the loop's
            # own graph (out of line, the while loop's feed of them failed).
            return step
        # The loop calls the step twice (the first step outside tf.range, the rest inside). As a function of
        # its own, kept out of line, the step is traced, optimised and instantiated once instead of twice:
        # ResNet-50 launch -> first step 9 s sooner, and one copy of its graph in memory (docs/design.md §7.2).
        return tf.function(step, experimental_attributes={"_noinline": True})

    def _save(self, step: int) -> None:
        ckpt_lib.save_if_finite(self.manager, step, list(self.model.variables) + list(self.optimizer.variables))


def _build_loop_fn(strategy: tf.distribute.Strategy, step_fn: Callable, global_step: tf.Variable) -> Callable:
    """`loop(iterator, num_steps) -> (mean metrics, first non-finite step or -1)`, one host round trip."""

    @tf.function
    def loop(iterator, num_steps):
        first = strategy.run(step_fn, args=next(iterator))
        sums = {k: strategy.reduce(tf.distribute.ReduceOp.MEAN, v, axis=None) for k, v in first.items()}
        global_step.assign_add(1)
        bad_step = tf.constant(-1, tf.int64)
        if not tf.math.is_finite(sums["total_loss"]):
            bad_step = global_step.read_value()
        done = tf.constant(1)
        for _ in tf.range(num_steps - 1):
            if bad_step >= 0:
                break
            out = strategy.run(step_fn, args=next(iterator))
            global_step.assign_add(1)
            done += 1
            # New dicts, not item assignment: autograph cannot carry dict mutation out of the cond that
            # the `break` above wraps around the rest of the body.
            reduced = {k: strategy.reduce(tf.distribute.ReduceOp.MEAN, out[k], axis=None) for k in sums}
            sums = {k: sums[k] + reduced[k] for k in sums}
            if not tf.math.is_finite(reduced["total_loss"]):
                bad_step = global_step.read_value()
        means = {k: v / tf.cast(done, v.dtype) for k, v in sums.items()}
        return means, bad_step

    return loop


def _ending_after(input_fn: pipeline.InputFn, steps: int) -> pipeline.InputFn:
    """`input_fn` cut to the batches of `steps` steps. An endless pipeline keeps preparing batches ahead of the
    last step, and destroying its iterator after training waits for the ones in flight (at batch 256 that held
    the end of a run, checkpoint and export, for 10+ seconds). `take` releases the pipeline below it as soon as
    it hands out the last batch, so that wait overlaps the last step instead."""

    def bounded(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
        return input_fn(ctx).take(steps * pipeline.replicas_fed(ctx))

    return bounded


def _replica_shards(batches: Sequence[Batch]) -> pipeline.InputFn:
    """An input function whose pipelines yield, step by step, the rows of each global batch their replicas
    take, in replica order (a pipeline's iterator hands consecutive elements to its replicas in turn)."""

    def input_fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
        replicas = ctx.num_replicas_in_sync
        local = replicas // ctx.num_input_pipelines
        ids = [ctx.input_pipeline_id * local + j for j in range(local)]
        shards = []
        for images, labels in batches:
            b = len(images) // replicas
            shards += [(images[r * b:(r + 1) * b], labels[r * b:(r + 1) * b]) for r in ids]
        return tf.data.Dataset.from_tensor_slices(
            (np.stack([s[0] for s in shards]), np.stack([s[1] for s in shards])))

    return input_fn


def _stop_on_sigterm(event: threading.Event) -> None:
    """SIGTERM asks for a clean stop; a second one kills as usual (the default handler is restored)."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, frame):
        event.set()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    signal.signal(signal.SIGTERM, handler)


def write_flags_json(config: Config) -> None:
    """The run's settings as `model_dir/flags.json` (written atomically)."""
    tf.io.gfile.makedirs(config.model_dir)
    write_text_atomically(os.path.join(config.model_dir, "flags.json"), config.to_json())
