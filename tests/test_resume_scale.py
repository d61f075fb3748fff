"""Exact resume when one input pipeline feeds several replicas (one host driving several devices).

A resumed run must see exactly the batches the uninterrupted run would have: each step consumes one
per-replica batch for every replica a pipeline feeds, so resuming at step k skips k * (replicas / pipelines)
batches of that pipeline's stream.
"""
import shutil

import numpy as np
import pytest
import tensorflow as tf

from simclr_tf.data import pipeline
from simclr_tf.sections import AugmentConfig
from tests.conftest import TINY_FLAGS, write_npz
from tests.test_pipeline import make_source, random_images
from tests.test_train import run_py


@pytest.mark.parametrize("pipelines, replicas", [(1, 1), (1, 2), (2, 4), (1, 4)])
def test_resumed_stream_skips_one_batch_per_replica_fed(pipelines, replicas):
    """Pipeline i of P feeding R/P replicas: the stream resumed at step k == the full stream after k*R/P batches."""
    source = make_source(random_images(40, 20, 20, seed=1), random_images(8, 20, 20, seed=2))
    per_replica, steps_done = 2, 3
    fed = replicas // pipelines
    for pipeline_id in range(pipelines):
        ctx = tf.distribute.InputContext(num_input_pipelines=pipelines, input_pipeline_id=pipeline_id,
                                         num_replicas_in_sync=replicas)

        def stream(start_step):
            return pipeline.build_input_fn(source, mode="pretrain", global_batch_size=per_replica * replicas,
                                           augment=AugmentConfig(16, use_blur=False), seed=5,
                                           start_step=start_step)(ctx)

        full = [(x.numpy(), y.numpy()) for x, y in stream(0).take(steps_done * fed + 4)]
        resumed = [(x.numpy(), y.numpy()) for x, y in stream(steps_done).take(4)]
        for (x_full, y_full), (x_res, y_res) in zip(full[steps_done * fed:], resumed):
            np.testing.assert_array_equal(y_res, y_full)
            np.testing.assert_array_equal(x_res, x_full)


# Two run.py processes on 2 logical replicas take over 2 minutes on 2 cores: slow set only. The default run
# covers the same arithmetic at the stream level (above) and whole-run resume on one replica (test_train.py).
@pytest.mark.slow
def test_resume_with_two_replicas_on_one_pipeline_equals_uninterrupted_run(tmp_path):
    """run.py with 2 CPU replicas: 2 steps, a copy of that checkpoint resumed for 2 more == a straight 4."""
    data = write_npz(tmp_path / "tiny.npz", classes=4, n_train=48)
    common = [f"--dataset=npz:{data}", "--train_split=train", "--eval_split=test", "--mode=train",
              "--strategy=mirrored", "--num_cpu_replicas=2", "--train_batch_size=8", "--train_steps=4",
              "--checkpoint_steps=2", "--warmup_epochs=0", "--learning_rate=0.5", "--weight_decay=1e-4",
              "--seed=7", "--keep_checkpoint_max=5", *TINY_FLAGS]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_py(f"--model_dir={straight}", *common)
    resumed.mkdir()
    for path in straight.glob("ckpt-2.*"):
        shutil.copy(path, resumed / path.name)
    (resumed / "checkpoint").write_text('model_checkpoint_path: "ckpt-2"\nall_model_checkpoint_paths: "ckpt-2"\n')
    proc = run_py(f"--model_dir={resumed}", *common)
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout, proc.stdout[-2000:]

    a = tf.train.load_checkpoint(str(straight / "ckpt-4"))
    b = tf.train.load_checkpoint(str(resumed / "ckpt-4"))
    c = tf.train.load_checkpoint(str(straight / "ckpt-2"))
    names = sorted(n for n in a.get_variable_to_shape_map() if n.endswith("VARIABLE_VALUE"))
    assert a.get_tensor("global_step/.ATTRIBUTES/VARIABLE_VALUE") == 4
    for name in names:
        x, y = a.get_tensor(name), b.get_tensor(name)
        np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6 * max(1.0, float(np.abs(x).max())), err_msg=name)
    assert any(not np.array_equal(a.get_tensor(n), c.get_tensor(n)) for n in names if n.startswith("optimizer/"))


def test_multi_worker_refuses_logical_cpu_replicas_it_would_not_use(tmp_path):
    """TF's collective strategy uses one CPU device per worker: asking for 2 must not silently give 1."""
    import json
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    env = dict(os.environ, TF_CONFIG=json.dumps({"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]},
                                                 "task": {"type": "worker", "index": 0}}))
    proc = subprocess.run([sys.executable, str(REPO / "run.py"), "--strategy=multi_worker", "--num_cpu_replicas=2",
                           "--dataset=mnist_5k", f"--model_dir={tmp_path / 'm'}", *TINY_FLAGS],
                          capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("error: --num_cpu_replicas:") and "worker" in error, error
