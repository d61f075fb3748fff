"""Choosing the tf.distribute strategy: from the hardware by default, or as asked."""
from __future__ import annotations

import json
import os
from typing import Optional

import tensorflow as tf
from absl import logging

from simclr_tf.errors import UsageError


def split_cpu(num_replicas: int) -> None:
    """Splits the first CPU into `num_replicas` logical devices. Must run before TF initialises its devices."""
    if num_replicas <= 1:
        return
    cpu = tf.config.list_physical_devices("CPU")[0]
    current = tf.config.get_logical_device_configuration(cpu)
    if current and len(current) == num_replicas:
        return
    try:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(num_replicas)])
        # Collectives block until every replica joins; with fewer inter-op threads than replicas (a 2-core
        # machine split in 4) the waiting replicas occupy all threads and the step deadlocks.
        threads = tf.config.threading.get_inter_op_parallelism_threads() or os.cpu_count() or 1
        tf.config.threading.set_inter_op_parallelism_threads(max(threads, 2 * num_replicas))
    except RuntimeError as e:  # devices already initialised by earlier TF work in this process
        raise UsageError("--num_cpu_replicas", f"cannot split the CPU after TensorFlow started ({e})") from e


def _tpu_resolver(tpu_name: Optional[str], tpu_zone: Optional[str], gcp_project: Optional[str],
                  master: Optional[str]):
    try:
        return tf.distribute.cluster_resolver.TPUClusterResolver(
            tpu=tpu_name or master or "", zone=tpu_zone, project=gcp_project)
    except (ValueError, RuntimeError) as e:
        raise UsageError("--tpu_name", f"no TPU found ({e})") from e


def tpu_present() -> bool:
    if tf.config.list_physical_devices("TPU"):
        return True
    # A Cloud TPU VM exposes its chips only after the TPU system is initialised; /dev/accel* tells before.
    return any(name.startswith("accel") for name in _dev_entries())


def _dev_entries() -> list:
    try:
        return os.listdir("/dev")
    except OSError:
        return []


def build_strategy(name: str = "auto", *, num_cpu_replicas: int = 1, use_tpu: bool = True,
                   use_tpu_explicit: bool = False, tpu_name: Optional[str] = None,
                   tpu_zone: Optional[str] = None, gcp_project: Optional[str] = None,
                   master: Optional[str] = None) -> tf.distribute.Strategy:
    """Returns the strategy for `--strategy`.

    auto: TPU when present (and not --use_tpu=false), else all GPUs (MirroredStrategy), else the CPU
    (split into `num_cpu_replicas` mirrored replicas when > 1, else OneDeviceStrategy).
    """
    if name == "auto":
        if use_tpu_explicit or tpu_name:
            name = "tpu"
        elif "TF_CONFIG" in os.environ and len(json.loads(os.environ["TF_CONFIG"]).get("cluster", {})
                                                .get("worker", [])) > 1:
            name = "multi_worker"
        elif use_tpu and tpu_present():
            name = "tpu"
        elif tf.config.list_physical_devices("GPU") or num_cpu_replicas > 1:
            name = "mirrored"
        else:
            name = "one_device"
    if name == "tpu":
        resolver = _tpu_resolver(tpu_name, tpu_zone, gcp_project, master)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        strategy = tf.distribute.TPUStrategy(resolver)
    elif name == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise UsageError("--strategy", "multi_worker needs the TF_CONFIG environment variable "
                             "(cluster spec and this worker's task)")
        if num_cpu_replicas > 1 and not tf.config.list_physical_devices("GPU"):
            # TF's collective strategy takes one CPU device per worker whatever the logical split, so the
            # extra replicas would silently not exist.
            raise UsageError("--num_cpu_replicas", f"{num_cpu_replicas} with --strategy=multi_worker: "
                             "TensorFlow runs one replica per CPU worker; start more worker processes instead")
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    elif name == "mirrored":
        # Physical, not logical: listing logical devices initialises TF, after which the CPU cannot be split.
        if tf.config.list_physical_devices("GPU"):
            strategy = tf.distribute.MirroredStrategy()
        else:
            split_cpu(num_cpu_replicas)
            cpus = tf.config.list_logical_devices("CPU")
            strategy = tf.distribute.MirroredStrategy(
                [d.name for d in cpus],
                # NCCL is GPU-only; the default for CPU devices would pick it anyway and fail.
                cross_device_ops=tf.distribute.ReductionToOneDevice())
    elif name == "one_device":
        device = "/gpu:0" if tf.config.list_physical_devices("GPU") else "/cpu:0"
        strategy = tf.distribute.OneDeviceStrategy(device)
    else:
        raise UsageError("--strategy", f"unknown strategy {name!r}")
    logging.info("Strategy %s with %d replica(s)", type(strategy).__name__, strategy.num_replicas_in_sync)
    return strategy


def check_batch_divisible(global_batch: int, strategy: tf.distribute.Strategy, flag: str) -> None:
    replicas = strategy.num_replicas_in_sync
    if global_batch % replicas:
        raise UsageError(flag, f"global batch {global_batch} is not divisible by the {replicas} replicas")


def is_tpu(strategy: tf.distribute.Strategy) -> bool:
    """Whether `strategy` runs on TPUs (its steps are compiled whole, as one XLA program)."""
    return isinstance(strategy, (tf.distribute.TPUStrategy, tf.distribute.experimental.TPUStrategy))


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """True unless this process is a non-chief worker of a multi-worker strategy."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "worker" and resolver.task_id == 0 and not has_chief
