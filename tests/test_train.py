"""The pretraining engine end to end: replicas vs single device, multi-worker, resume, eval mode."""
import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO, TINY_FLAGS, write_npz


@pytest.fixture()
def tiny_npz(tmp_path):
    return write_npz(tmp_path / "tiny.npz", classes=4)


def run_py(*args, timeout=300, env=None, cwd=REPO):
    proc = subprocess.run([sys.executable, str(REPO / "run.py"), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def run_worker(tmp_path, replicas, tiny_npz, batch_path, init_path, optimizer="lars"):
    out = tmp_path / f"out_{optimizer}_{replicas}.npz"
    args = [sys.executable, str(REPO / "tests" / "replica_step_worker.py"), f"--replicas={replicas}",
            f"--data={tiny_npz}", f"--batch={batch_path}", f"--model_dir={tmp_path / f'm{replicas}'}",
            f"--out={out}", f"--optimizer={optimizer}"]
    args += [f"--init={init_path}"] if replicas > 1 else [f"--save_init={init_path}"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(np.load(out))


@pytest.fixture(scope="module")
def single_device_step(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("replicas")
    tiny = write_npz(tmp_path / "tiny.npz", classes=4)
    rng = np.random.RandomState(1)
    batch_path = tmp_path / "batch.npz"
    np.savez(batch_path, images=rng.rand(8, 16, 16, 6).astype(np.float32), labels=rng.randint(0, 4, 8))
    init = tmp_path / "init.npz"
    return tmp_path, tiny, batch_path, init, run_worker(tmp_path, 1, tiny, batch_path, init)


# 4 logical replicas on 2 cores take minutes (every collective waits for all four threads): slow set only. The
# default run checks the 2-replica step against one device in tests/test_keras_fit.py (one worker process that
# also compares fit() with the CLI), so this separate 2-replica worker runs in the slow set too.
@pytest.mark.parametrize("replicas", [pytest.param(2, marks=pytest.mark.slow), pytest.param(4, marks=pytest.mark.slow)])
def test_replicas_equal_single_device_step(single_device_step, replicas):
    """Loss, gradients and weights after one LARS step with sync BN: N replicas == 1 device."""
    tmp_path, tiny, batch_path, init, single = single_device_step
    multi = run_worker(tmp_path, replicas, tiny, batch_path, init)
    assert set(multi) == set(single)
    np.testing.assert_allclose(multi["loss"], single["loss"], rtol=1e-5)
    np.testing.assert_allclose(multi["step_loss"], single["step_loss"], rtol=1e-5)
    initial = np.load(init)
    changed = 0
    for key in single:
        # Sync BN and the gathered logits sum in another order: ~3e-5 of each array's scale.
        scale = max(float(np.abs(single[key]).max()), 1e-6)
        np.testing.assert_allclose(multi[key], single[key], atol=1e-4 * scale + 1e-7, err_msg=key)
        if key.startswith("w"):
            changed += not np.array_equal(single[key], initial[key])
    # The step really trained: weights (and BN statistics) moved.
    assert changed > 10


# 1 replica: the whole step is one XLA program. Several: XLA clusters per device between the collectives
# (which once failed: "Trying to access resource .../replica_1/... located in device CPU:1 from device CPU:0").
# Compiling the 2-replica step takes 3-5 minutes on 2 cores, a sixth of the CI budget: it runs with `make
# test-all`. The default run compiles the 1-replica step in tests/test_keras_fit.py's worker (beside other tests),
# so this 1-replica worker of its own is in the slow set too.
@pytest.mark.parametrize("replicas", [pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow),
                                      pytest.param(4, marks=pytest.mark.slow)])
def test_jit_compiled_step_equals_single_device_step(single_device_step, replicas):
    """--jit_compile on N replicas: the same step as the plain single-device step, compiled by XLA."""
    tmp_path, tiny, batch_path, init, single = single_device_step
    out = tmp_path / f"out_jit_{replicas}.npz"
    args = [sys.executable, str(REPO / "tests" / "replica_step_worker.py"), f"--replicas={replicas}",
            f"--data={tiny}", f"--batch={batch_path}", f"--model_dir={tmp_path / f'jit{replicas}'}",
            f"--out={out}", f"--init={init}", "--jit_compile"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=900, cwd=REPO,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Compiled cluster using XLA" in proc.stderr  # XLA really ran the step
    jit = dict(np.load(out))
    assert set(jit) == set(single)
    np.testing.assert_allclose(jit["loss"], single["loss"], rtol=1e-5)
    np.testing.assert_allclose(jit["step_loss"], single["step_loss"], rtol=1e-5)
    for key in single:
        # XLA fuses and reorders float32 sums: ~2e-5 of each array's scale after one LARS step.
        scale = max(float(np.abs(single[key]).max()), 1e-6)
        np.testing.assert_allclose(jit[key], single[key], atol=1e-4 * scale + 1e-7, err_msg=key)


# Slow set for the same reason as the replica tests above; tests/test_recompute.py checks recompute against the
# plain model on one device in the default run.
@pytest.mark.slow
def test_recomputed_step_on_two_replicas_equals_single_device_step(single_device_step):
    """--recompute with sync BN on 2 replicas (the recomputation gathers BN statistics again in the backward
    pass): the plain single-device step's loss, gradients, weights and BN statistics."""
    tmp_path, tiny, batch_path, init, single = single_device_step
    out = tmp_path / "out_recompute_2.npz"
    args = [sys.executable, str(REPO / "tests" / "replica_step_worker.py"), "--replicas=2", f"--data={tiny}",
            f"--batch={batch_path}", f"--model_dir={tmp_path / 'recompute2'}", f"--out={out}", f"--init={init}",
            "--recompute"]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recomputed = dict(np.load(out))
    assert set(recomputed) == set(single)
    np.testing.assert_allclose(recomputed["loss"], single["loss"], rtol=1e-5)
    for key in single:
        scale = max(float(np.abs(single[key]).max()), 1e-6)
        np.testing.assert_allclose(recomputed[key], single[key], atol=1e-4 * scale + 1e-7, err_msg=key)


def summary_tags(directory):
    """Tags of every summary in the TensorBoard event files directly in `directory`."""
    import tensorflow as tf

    tags = set()
    for path in tf.io.gfile.glob(os.path.join(str(directory), "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            tags.update(value.tag for value in event.summary.value)
    return tags


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_multi_worker_two_processes_end_with_identical_weights(tmp_path, tiny_npz):
    import tensorflow as tf

    ports = [free_port(), free_port()]
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    model_dir = tmp_path / "mw"
    procs = []
    for index in range(2):
        env = dict(os.environ, TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker",
                                                                                    "index": index}}))
        procs.append(subprocess.Popen(
            [sys.executable, str(REPO / "run.py"), "--strategy=multi_worker", "--mode=train",
             f"--dataset=npz:{tiny_npz}", "--train_split=train", "--eval_split=test", f"--model_dir={model_dir}",
             "--train_batch_size=8", "--train_steps=3", "--checkpoint_steps=2", "--warmup_epochs=0",
             "--seed=0", *TINY_FLAGS],
            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True))
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=420)[0])
    finally:
        for proc in procs:  # TF ignores SIGTERM while blocked in collectives: kill hard
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out[-4000:]
    chief = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(model_dir)))
    other = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(model_dir / "worker_1")))
    names = [n for n in chief.get_variable_to_shape_map() if "/.ATTRIBUTES/VARIABLE_VALUE" in n]
    assert chief.get_tensor("global_step/.ATTRIBUTES/VARIABLE_VALUE") == 3
    for name in names:
        np.testing.assert_array_equal(chief.get_tensor(name), other.get_tensor(name), err_msg=name)
    assert len(names) > 50


def test_train_stops_exactly_and_eval_mode_writes_results(tmp_path, tiny_npz):
    model_dir = tmp_path / "run"
    common = [f"--dataset=npz:{tiny_npz}", "--train_split=train", "--eval_split=test", f"--model_dir={model_dir}",
              "--train_batch_size=8", "--train_steps=5", "--checkpoint_steps=2", "--steps_per_loop=2",
              "--keep_checkpoint_max=2", *TINY_FLAGS]
    proc = run_py("--mode=train", *common)
    import tensorflow as tf

    latest = tf.train.latest_checkpoint(str(model_dir))
    reader = tf.train.load_checkpoint(latest)
    assert reader.get_tensor("global_step/.ATTRIBUTES/VARIABLE_VALUE") == 5  # not 6: no overshoot
    assert latest.endswith("-5")
    assert len(tf.io.gfile.glob(str(model_dir / "ckpt-*.index"))) == 2  # keep_checkpoint_max
    assert "step 5/5" in proc.stdout and "img/s" in proc.stdout and "ETA" in proc.stdout
    flags_json = json.loads((model_dir / "flags.json").read_text())
    assert flags_json["train_steps"] == 5 and flags_json["resnet_depth"] == 18
    # TensorBoard: scalars for the metrics and the learning rate.
    tags = summary_tags(model_dir)
    assert {"train/total_loss", "train/contrast_acc", "train/learning_rate", "train/sup_acc"} <= tags, tags

    run_py("--mode=eval", *common)
    result = json.loads((model_dir / "result.json").read_text())
    assert result["global_step"] == 5 and result["num_examples"] == 20  # 20 = 2*7 + 6: remainder counted
    assert 0.0 <= result["top1"] <= result["top5"] <= 1.0
    assert (model_dir / "result_5.json").exists()


def test_resume_equals_uninterrupted_run(tmp_path, tiny_npz):
    """k steps, stop, resume k more == a straight 2k run: step, LR, weights and optimizer slots."""
    import shutil

    import tensorflow as tf

    from simclr_tf import app
    from simclr_tf.config import Config

    def config(model_dir):
        return Config(model_dir=str(model_dir), dataset=f"npz:{tiny_npz}", train_split="train",
                      eval_split="test", mode="train", resnet_depth=18, width_multiplier=0.125, image_size=16,
                      num_proj_layers=2, temperature=0.5, color_jitter_strength=0.5, use_blur=False,
                      train_batch_size=8, train_steps=4, checkpoint_steps=2, warmup_epochs=1,
                      learning_rate=0.5, weight_decay=1e-4, seed=7, keep_checkpoint_max=5)

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    app.main(config(straight), log=lambda _: None)
    # The "stopped" run: only what existed after step 2 (as after a crash right after that checkpoint).
    resumed.mkdir()
    for path in straight.glob("ckpt-2.*"):
        shutil.copy(path, resumed / path.name)
    (resumed / "checkpoint").write_text('model_checkpoint_path: "ckpt-2"\nall_model_checkpoint_paths: "ckpt-2"\n')
    messages = []
    app.main(config(resumed), log=messages.append)
    assert any("resumed from" in m and "at step 2" in m for m in messages), messages

    a = tf.train.load_checkpoint(str(straight / "ckpt-4"))
    b = tf.train.load_checkpoint(str(resumed / "ckpt-4"))
    names = sorted(n for n in a.get_variable_to_shape_map() if n.endswith("VARIABLE_VALUE"))
    assert names == sorted(n for n in b.get_variable_to_shape_map() if n.endswith("VARIABLE_VALUE"))
    slots = [n for n in names if n.startswith("optimizer/")]
    assert len(slots) > 20  # momentum slots and the iteration counter are in the checkpoint
    assert a.get_tensor("global_step/.ATTRIBUTES/VARIABLE_VALUE") == 4
    assert a.get_tensor("optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE") == 4
    for name in names:
        x, y = a.get_tensor(name), b.get_tensor(name)
        np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6 * max(1.0, float(np.abs(x).max())), err_msg=name)
    # Not trivially equal: the second half of training changed the weights.
    c = tf.train.load_checkpoint(str(straight / "ckpt-2"))
    assert any(not np.array_equal(a.get_tensor(n), c.get_tensor(n)) for n in slots)


def test_mixed_precision_computes_in_bfloat16_with_float32_loss_and_variables(tmp_path, tiny_npz):
    import keras
    import tensorflow as tf

    from simclr_tf.config import Config
    from simclr_tf.data.sources import build_source
    from simclr_tf.train import Trainer

    config = Config(model_dir=str(tmp_path / "mp"), dataset=f"npz:{tiny_npz}", train_split="train",
                    eval_split="test", mode="train", resnet_depth=18, width_multiplier=0.125, image_size=16,
                    num_proj_layers=2, temperature=0.5, use_blur=False, train_batch_size=8, train_steps=2,
                    warmup_epochs=0, mixed_precision=True, mixed_precision_dtype="bfloat16", seed=0)
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    trainer = Trainer(config, strategy, build_source(config.dataset, None, "train", "test"),
                      log=lambda _: None)
    assert keras.config.dtype_policy().name == "float32"  # the policy was set for this model only
    assert all(v.dtype == "float32" for v in trainer.model.weights)
    out = trainer.model(tf.zeros([2, 16, 16, 3]), training=False)
    assert out["h"].dtype == tf.bfloat16 and out["logits_sup"].dtype == tf.bfloat16
    metrics = trainer.train()
    assert int(trainer.global_step.numpy()) == 2
    assert np.isfinite(metrics["contrast_loss"]) and metrics["contrast_loss"] > 0
    # The contrastive logits are computed in float32 even though the network runs in bfloat16.
    from simclr_tf import losses

    z = tf.random.normal([8, 4], dtype=tf.bfloat16)
    assert losses.nt_xent(z, temperature=0.5).loss.dtype == tf.float32


def test_mixed_precision_auto_picks_bfloat16_only_where_the_cpu_computes_in_it():
    import tensorflow as tf

    from simclr_tf.hardware import cpu_has_native_bfloat16
    from simclr_tf.models.build import mixed_precision_policy

    # /proc/cpuinfo lines of CPUs with and without bfloat16 arithmetic (x86 flags, aarch64 features).
    assert cpu_has_native_bfloat16("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16 avx512_vnni\n")
    assert cpu_has_native_bfloat16("flags\t\t: fpu avx2 amx_tile amx_bf16 amx_int8\n")
    assert cpu_has_native_bfloat16("Features\t: fp asimd sve bf16 i8mm\n")
    assert not cpu_has_native_bfloat16("flags\t\t: fpu sse2 avx avx2 fma avx512f avx512_vnni\n")
    assert not cpu_has_native_bfloat16("Features\t: fp asimd evtstrm aes\nmodel name\t: bf16 in a name\n")
    assert not cpu_has_native_bfloat16("")

    cpu = tf.distribute.OneDeviceStrategy("/cpu:0")
    assert mixed_precision_policy(cpu, False) == "float32"
    assert mixed_precision_policy(cpu, "bfloat16") == "mixed_bfloat16"
    assert mixed_precision_policy(cpu, "float16") == "mixed_float16"
    # On this machine's CPU, whatever it is: bfloat16 exactly when its cpuinfo names bfloat16 instructions.
    expected = "mixed_bfloat16" if cpu_has_native_bfloat16() else "float32"
    assert mixed_precision_policy(cpu, True) == mixed_precision_policy(cpu, "auto") == expected
    with pytest.raises(ValueError, match="request"):
        mixed_precision_policy(cpu, "int8")


def test_eval_mode_with_official_checkpoint_evaluates_and_exports_it(tmp_path, golden_dir):
    import tensorflow as tf

    expected = np.load(golden_dir / "r18_1x8_cifar" / "expected_r18_1x8_cifar.npz")
    rng = np.random.RandomState(0)
    data = tmp_path / "ten.npz"
    np.savez(data, x_train=rng.randint(0, 256, (20, 32, 32, 3), dtype=np.uint8), y_train=np.arange(20) % 10,
             x_test=rng.randint(0, 256, (13, 32, 32, 3), dtype=np.uint8), y_test=np.arange(13) % 10)
    model_dir = tmp_path / "official_eval"
    run_py("--mode=eval", f"--checkpoint={golden_dir / 'r18_1x8_cifar'}", f"--dataset=npz:{data}",
           "--train_split=train", "--eval_split=test", f"--model_dir={model_dir}", "--resnet_depth=18",
           "--width_multiplier=0.125", "--image_size=32", "--num_proj_layers=2", "--eval_batch_size=5")
    result = json.loads((model_dir / "result.json").read_text())
    assert result["num_examples"] == 13 and result["global_step"] == 0
    exports = sorted((model_dir / "saved_model").iterdir())
    loaded = tf.saved_model.load(str(exports[-1]))
    out = loaded.signatures["serving_float"](images=tf.constant(expected["x"]))
    for key in ("final_avg_pool", "logits_sup", "proj_head_output"):
        want = expected["h" if key == "final_avg_pool" else key]
        np.testing.assert_allclose(out[key].numpy(), want, atol=1e-4 * np.abs(want).max(), err_msg=key)
