"""SimCLRv2's memory of negatives (docs/design.md §4.4): the loss against a naive loop, where gradients flow, the
momentum update's closed form, the queue's FIFO order, 2 replicas == 1 device, exact resume.

Run as a script (`python tests/test_memory.py WORKDIR`), this file is the 2-replica worker of
`test_two_replicas_equal_single_device`: logical devices must be configured before TensorFlow starts.
"""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from tests.conftest import REPO, TINY, write_npz  # noqa: E402

K = 24  # not a multiple of the 16 keys a step writes (batch 8, two views): the second step wraps around
MOMENTUM = 0.9  # large steps of the copy, so the closed form is not dominated by the initial weights
STEPS = 4
BATCH = 8


def _config(model_dir, data, **overrides):
    from simclr_tf.config import Config, validate

    values = dict(TINY, model_dir=str(model_dir), dataset=f"npz:{data}", train_split="train", eval_split="test",
                  train_batch_size=BATCH, train_steps=STEPS, checkpoint_steps=2, warmup_epochs=0,
                  learning_rate=0.5, weight_decay=1e-4, seed=0, memory_size=K, memory_momentum=MOMENTUM)
    values.update(overrides)
    return validate(Config(**values))


def _normalise(x):
    return x / np.sqrt(np.maximum((x * x).sum(-1, keepdims=True), 1e-12))


def _naive_loss_with_memory(z, memory, filled, tau, hidden_norm):
    """Row-by-row float64 NT-Xent with extra negatives: each anchor's positive is its other view; its negatives
    are both views of every other image (the 2n - 2 in-batch rows that are neither the anchor nor its positive)
    and the first `filled` memory rows (the others are left out of the sum, not masked)."""
    z = z.astype(np.float64)
    if hidden_norm:
        z = _normalise(z)
    queue = memory.astype(np.float64)[:filled]
    n = len(z) // 2
    z1, z2 = z[:n], z[n:]
    total = 0.0
    for anchors, others in ((z1, z2), (z2, z1)):
        for i in range(n):
            positive = anchors[i] @ others[i] / tau
            negatives = [anchors[i] @ others[j] / tau for j in range(n) if j != i]
            negatives += [anchors[i] @ anchors[j] / tau for j in range(n) if j != i]
            negatives += [anchors[i] @ q / tau for q in queue]
            logits = np.array([positive] + negatives)
            top = logits.max()
            total += top + np.log(np.exp(logits - top).sum()) - positive
    correct, entropy = 0, 0.0
    for i in range(n):  # metrics: view-1 rows against the view-2 rows and the memory
        candidates = np.array([z1[i] @ z2[j] / tau for j in range(n)] + [z1[i] @ q / tau for q in queue])
        correct += int(np.argmax(candidates) == i)
        p = np.exp(candidates - candidates.max())
        p /= p.sum()
        entropy += -(p * np.log(np.maximum(p, 1e-300))).sum()
    return total / n, correct / n, entropy / n


def _random_problem(seed, batch, d=6, size=7, hidden_norm=True):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(2 * batch, d)).astype(np.float32) * (1.0 if hidden_norm else 0.4)
    memory = rng.normal(size=(size, d)).astype(np.float32)
    memory = _normalise(memory) if hidden_norm else memory * 0.4
    return z, memory.astype(np.float32)


# ------------------------------------------------------------------------------------------------ the flags


@pytest.mark.parametrize("args, flag", [
    (["--memory_size=-1"], "--memory_size"),
    (["--memory_momentum=1.0"], "--memory_momentum"),
    (["--memory_momentum=-0.1"], "--memory_momentum"),
    (["--memory_size=64", "--train_mode=finetune"], "--memory_size"),
])
def test_bad_memory_flags_name_the_flag(args, flag):
    from absl import flags

    from simclr_tf import config as config_lib
    from simclr_tf.errors import UsageError

    fv = flags.FlagValues()
    config_lib.define_flags(fv)
    fv(["run.py", "--model_dir=/tmp/x", *args])
    with pytest.raises(UsageError, match=f"^{flag}: "):
        config_lib.from_flags(fv)


def test_memory_flags_default_to_plain_simclr():
    from simclr_tf.config import Config

    contrast = Config(model_dir="/tmp/x", memory_size=65536, memory_momentum=0.99).contrast
    assert (contrast.memory_size, contrast.memory_momentum) == (65536, 0.99)
    assert (Config().contrast.memory_size, Config().contrast.memory_momentum) == (0, 0.999)


# ------------------------------------------------------------------------------------------------ the loss


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("filled", [0, 3, 7])
@pytest.mark.parametrize("hidden_norm", [True, False])
def test_loss_with_memory_matches_naive_loop(batch, filled, hidden_norm):
    import tensorflow as tf

    from simclr_tf.losses import nt_xent

    tau = 0.5
    z, memory = _random_problem(batch * 10 + filled, batch, hidden_norm=hidden_norm)
    garbage = memory.copy()
    garbage[filled:] = 50.0  # rows not filled yet: whatever they hold must not count
    out = nt_xent(tf.constant(z), temperature=tau, hidden_norm=hidden_norm, memory=tf.constant(garbage),
                  memory_filled=tf.constant(filled, tf.int64))
    loss, acc, entropy = _naive_loss_with_memory(z, memory, filled, tau, hidden_norm)
    np.testing.assert_allclose(out.loss.numpy(), loss, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(out.contrast_acc.numpy(), acc, atol=1e-7)
    np.testing.assert_allclose(out.contrast_entropy.numpy(), entropy, rtol=2e-5, atol=1e-6)
    assert out.loss.dtype == tf.float32


def test_without_memory_or_with_an_empty_one_the_loss_is_nt_xent_exactly():
    import tensorflow as tf

    from simclr_tf.losses import nt_xent

    z, memory = _random_problem(5, 4)
    plain = nt_xent(tf.constant(z), temperature=0.2)
    for queue in (memory, np.zeros((0, memory.shape[1]), np.float32)):  # empty, and K = 0
        out = nt_xent(tf.constant(z), temperature=0.2, memory=tf.constant(queue), memory_filled=tf.constant(0))
        for field in ("loss", "contrast_acc", "contrast_entropy", "logits_ab", "labels"):
            np.testing.assert_array_equal(getattr(out, field).numpy(), getattr(plain, field).numpy(), err_msg=field)
    # A filled memory does change the loss (the comparison above is not vacuous).
    full = nt_xent(tf.constant(z), temperature=0.2, memory=tf.constant(memory), memory_filled=tf.constant(7))
    assert abs(float(full.loss) - float(plain.loss)) > 1e-3


def test_loss_gradient_includes_the_memory_and_never_reaches_it():
    """d loss / d z against central differences of the float64 loop; the memory changes it; no gradient
    reaches the memory itself."""
    import tensorflow as tf

    from simclr_tf.losses import nt_xent

    tau, filled = 0.5, 5
    z, memory = _random_problem(11, 3)
    queue = tf.Variable(memory)
    z_t = tf.constant(z)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(z_t)
        with_memory = nt_xent(z_t, temperature=tau, memory=queue, memory_filled=tf.constant(filled)).loss
        without = nt_xent(z_t, temperature=tau).loss
    grad = tape.gradient(with_memory, z_t).numpy()
    assert tape.gradient(with_memory, queue) is None
    eps, numeric = 1e-5, np.zeros(z.shape)
    for index in np.ndindex(*z.shape):
        up, down = z.astype(np.float64), z.astype(np.float64)
        up[index] += eps
        down[index] -= eps
        numeric[index] = (_naive_loss_with_memory(up, memory, filled, tau, True)[0]
                          - _naive_loss_with_memory(down, memory, filled, tau, True)[0]) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, atol=2e-4 * np.abs(numeric).max())
    assert np.abs(grad - tape.gradient(without, z_t).numpy()).max() > 1e-2 * np.abs(grad).max()


# ------------------------------------------------------------------------ real steps through Trainer.run_steps


def _by_path(variables):
    """{path below the model: value}; the two models differ only in their own name (the path's first part)."""
    return {w.path.split("/", 1)[1]: w.numpy() for w in variables}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """STEPS steps of a 1-device run with memory, one `run_steps` call each, with the state around each step
    recorded, checkpoints after steps 2 and 4, and the initial weights / batches for the 2-replica worker."""
    import tensorflow as tf

    from simclr_tf.data.sources import build_source
    from simclr_tf.train import Trainer

    tmp = tmp_path_factory.mktemp("memory")
    data = write_npz(tmp / "tiny.npz", classes=4)
    rng = np.random.RandomState(3)
    images = rng.rand(STEPS, BATCH, 16, 16, 6).astype(np.float32)
    labels = rng.randint(0, 4, (STEPS, BATCH))
    np.savez(tmp / "batches.npz", images=images, labels=labels)
    config = _config(tmp / "single", data)
    tf.keras.utils.set_random_seed(0)
    trainer = Trainer(config, tf.distribute.OneDeviceStrategy("/cpu:0"),
                      build_source(config.dataset, None, "train", "test"), log=lambda _: None)
    memory = trainer.task.memory
    np.savez(tmp / "init.npz", **{f"w{i}": w.numpy() for i, w in enumerate(trainer.model.weights)})
    rec = dict(tmp=tmp, data=data, images=images, labels=labels, trainer=trainer, memory=memory,
               copy_before_start=_by_path(memory.model.weights), online_start=_by_path(trainer.model.weights))
    trainer.task.before_steps()  # run_steps does this too; called here to see the copy it makes
    rec["copy_after_start"] = _by_path(memory.model.weights)
    for name in ("momentum_before", "queue_before", "pointer_before", "filled_before", "online_after",
                 "momentum_after", "queue_after", "pointer_after", "filled_after", "metrics"):
        rec[name] = []
    for t in range(STEPS):
        rec["momentum_before"].append(_by_path(memory.model.weights))
        for name, v in (("queue", memory.queue), ("pointer", memory.pointer), ("filled", memory.filled)):
            rec[f"{name}_before"].append(v.numpy())
        rec["metrics"].append(trainer.run_steps([(images[t], labels[t])]))
        rec["online_after"].append(_by_path(trainer.model.weights))
        rec["momentum_after"].append(_by_path(memory.model.weights))
        for name, v in (("queue", memory.queue), ("pointer", memory.pointer), ("filled", memory.filled)):
            rec[f"{name}_after"].append(v.numpy())
        if t + 1 == 2:
            trainer.manager.save(checkpoint_number=2)
    trainer.manager.save(checkpoint_number=STEPS)
    return rec


def test_momentum_copy_starts_as_an_exact_copy(single):
    online, before, after = single["online_start"], single["copy_before_start"], single["copy_after_start"]
    assert set(after) == set(online) - {"supervised_head/dense/kernel", "supervised_head/dense/bias"}
    assert any(not np.array_equal(before[p], online[p]) for p in after)  # it was a different random init
    for path, value in after.items():  # BN moving statistics included
        np.testing.assert_array_equal(value, online[path], err_msg=path)


def test_momentum_update_follows_the_closed_form_over_three_steps(single):
    """w_m(3) = m^3 w(0) + (1 - m) (m^2 w(1) + m w(2) + w(3)), w(i) the online weights after step i; the copy's BN
    moving statistics are its own, not that average."""
    m, memory = MOMENTUM, single["memory"]
    trainable = {w.path.split("/", 1)[1] for w in memory.model.trainable_weights}
    statistics = set(single["copy_after_start"]) - trainable
    assert trainable and statistics
    w = [single["online_start"]] + single["online_after"][:3]
    copy = single["momentum_after"][2]
    for path in trainable:
        expected = m ** 3 * w[0][path].astype(np.float64) + (1 - m) * sum(
            m ** (3 - i) * w[i][path].astype(np.float64) for i in (1, 2, 3))
        np.testing.assert_allclose(copy[path], expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max(),
                                   err_msg=path)
    moved = [p for p in trainable if not np.allclose(copy[p], w[0][p], atol=1e-6)]
    assert len(moved) > len(trainable) // 2  # the steps really moved the copy
    averaged = {p: m ** 3 * w[0][p] + (1 - m) * sum(m ** (3 - i) * w[i][p] for i in (1, 2, 3)) for p in statistics}
    assert any(not np.allclose(copy[p], averaged[p], atol=1e-4) for p in statistics)


def test_queue_is_fifo_of_the_copys_keys_with_wrap_around(single):
    """Each step writes the copy's normalised keys [view-1 rows; view-2 rows] at the pointer, wrapping at K, after
    its loss was computed; the copy's BN statistics move only by its own forward pass."""
    import tensorflow as tf

    memory, n = single["memory"], 2 * BATCH
    # Closed forms for K = 24 and 16 keys a step: pointer 16, 8, 0, 16; full from the second step on.
    assert [int(p) for p in single["pointer_after"]] == [16, 8, 0, 16]
    assert [int(f) for f in single["filled_after"]] == [16, 24, 24, 24]
    np.testing.assert_allclose([r["memory_fill"] for r in single["metrics"]], [0.0, 16 / 24, 1.0, 1.0])
    assert not single["queue_before"][0].any()
    for t in range(STEPS):
        # The copy as it was before step t, run in training mode on step t's views: the keys step t wrote.
        for w in memory.model.weights:
            w.assign(single["momentum_before"][t][w.path.split("/", 1)[1]])
        views = tf.concat(tf.split(tf.constant(single["images"][t]), 2, axis=-1), axis=0)
        keys = _normalise(memory.model(views, training=True)["proj_head_output"].numpy().astype(np.float64))
        expected = single["queue_before"][t].copy()
        for j in range(n):  # row by row, as a FIFO
            expected[(int(single["pointer_before"][t]) + j) % K] = keys[j]
        np.testing.assert_allclose(single["queue_after"][t], expected, atol=1e-5, err_msg=f"step {t}")
        after = single["momentum_after"][t]
        for w in memory.model.non_trainable_weights:
            np.testing.assert_allclose(w.numpy(), after[w.path.split("/", 1)[1]], rtol=1e-5, atol=1e-6)
    # After 4 steps the queue holds the last 24 keys: steps 3 and 4 (rows 0..15 from step 4, 16..23 from step 3).
    np.testing.assert_allclose(single["queue_after"][3][16:], single["queue_after"][2][16:])
    assert not np.allclose(single["queue_after"][3][:16], single["queue_after"][2][:16])


def test_enqueue_keeps_the_last_k_rows_when_more_arrive(single):
    import tensorflow as tf

    from simclr_tf.memory import NegativesMemory
    from simclr_tf.sections import ContrastConfig

    trainer = single["trainer"]
    memory = NegativesMemory(trainer.model, trainer.config.model, ContrastConfig(memory_size=5), trainer.strategy)
    rows = np.arange(16 * 128, dtype=np.float32).reshape(16, 128)
    expected, pointer = np.zeros((5, 128), np.float32), 0
    for block in (rows, rows[:3] + 0.5, rows[:7] - 0.25):  # 16 > K, then 3 and 7 rows across the end
        tf.function(memory.enqueue)(tf.constant(block))
        for row in block:  # the naive FIFO: one row at a time
            expected[pointer] = row
            pointer = (pointer + 1) % 5
        np.testing.assert_array_equal(memory.queue.numpy(), expected)
        assert int(memory.pointer.numpy()) == pointer and int(memory.filled.numpy()) == 5


def test_gradients_reach_the_online_encoder_only(single):
    import tensorflow as tf

    trainer, memory = single["trainer"], single["memory"]
    images, labels = single["images"][0], single["labels"][0]
    with tf.GradientTape() as tape:
        loss, _ = trainer.task.loss(tf.constant(images), tf.constant(labels))
    frozen = list(memory.model.weights) + [memory.queue]
    grads = tape.gradient(loss, frozen + list(trainer.model.trainable_variables))
    assert all(g is None for g in grads[:len(frozen)])
    online = grads[len(frozen):]
    assert sum(g is not None and float(tf.reduce_max(tf.abs(g))) > 0 for g in online) > len(online) // 2


def _variable_values(checkpoint_prefix):
    import tensorflow as tf

    reader = tf.train.load_checkpoint(str(checkpoint_prefix))
    return {n: np.asarray(reader.get_tensor(n), np.float64) for n in reader.get_variable_to_shape_map()
            if n.endswith("VARIABLE_VALUE")}


def test_resume_with_memory_equals_uninterrupted_run(single):
    """2 steps, checkpoint, resume and 2 more == 4 straight steps: weights, optimizer slots, momentum copy (not
    copied again), queue, pointer, fill count. A run started from --checkpoint copies the online weights anew.

    The resumed run is the straight run's trainer with every variable overwritten first (as a new process
    would start: random weights, empty memory, `initialised` False), restored by `Trainer.restore` from a
    directory holding only checkpoint 2: a second Trainer would trace the step again (~30 s of CPU)."""
    import tensorflow as tf

    from simclr_tf.train import Trainer

    tmp, straight = single["tmp"], single["tmp"] / "single"
    resumed = tmp / "resumed"
    resumed.mkdir()
    for path in straight.glob("ckpt-2.*"):
        shutil.copy(path, resumed / path.name)
    (resumed / "checkpoint").write_text('model_checkpoint_path: "ckpt-2"\nall_model_checkpoint_paths: "ckpt-2"\n')
    trainer, memory = single["trainer"], single["memory"]
    rng = np.random.default_rng(0)
    for v in (list(trainer.model.weights) + list(trainer.optimizer.variables) + memory.variables()
              + [trainer.global_step]):
        dtype = tf.as_dtype(v.dtype)
        v.assign(rng.normal(size=v.shape).astype(dtype.as_numpy_dtype) if dtype.is_floating
                 else np.zeros(v.shape, dtype.as_numpy_dtype))
    trainer.manager = tf.train.CheckpointManager(trainer.checkpoint, str(resumed), max_to_keep=5)
    assert "at step 2" in trainer.restore()
    trainer.run_steps([(single["images"][t], single["labels"][t]) for t in (2, 3)])
    trainer.manager.save(checkpoint_number=STEPS)

    a, b = _variable_values(straight / f"ckpt-{STEPS}"), _variable_values(resumed / f"ckpt-{STEPS}")
    assert sorted(a) == sorted(b)
    for part in ("memory/queue/", "memory/pointer/", "memory/filled/", "memory/initialised/", "memory/model/"):
        assert any(n.startswith(part) for n in a), part
    for name, x in a.items():
        np.testing.assert_allclose(b[name], x, rtol=1e-5, atol=1e-6 * max(1.0, float(np.abs(x).max())),
                                   err_msg=name)
    c = _variable_values(straight / "ckpt-2")
    assert any(not np.array_equal(a[n], c[n]) for n in a if n.startswith("memory/model/"))

    # A fresh run from --checkpoint (weights only): the copy starts from the loaded online weights.
    fresh = Trainer(_config(tmp / "fresh", single["data"], checkpoint=str(straight)), trainer.strategy,
                    trainer.source, log=lambda _: None)
    assert "initialised model weights from" in fresh.restore()
    fresh.task.before_steps()
    online, copy = _by_path(fresh.model.weights), _by_path(fresh.task.memory.model.weights)
    for path, value in copy.items():
        np.testing.assert_array_equal(value, online[path], err_msg=path)
    saved_copy = single["momentum_after"][-1]  # the straight run's copy lags its online weights: not that one
    assert any(not np.allclose(value, saved_copy[path]) for path, value in copy.items())
    assert int(fresh.task.memory.filled.numpy()) == 0 and not fresh.task.memory.queue.numpy().any()


# ------------------------------------------------------------------------------------------------ 2 replicas


def _run_worker(tmp, what):
    proc = subprocess.run([sys.executable, str(pathlib.Path(__file__).resolve()), what, str(tmp)], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((tmp / f"{what}.json").read_text())


@pytest.fixture(scope="module")
def two_replica_parts(tmp_path_factory):
    return _run_worker(tmp_path_factory.mktemp("parts"), "parts")


def test_two_replicas_loss_with_memory_equals_single_device_and_naive_loop(two_replica_parts):
    r = two_replica_parts["loss"]
    naive, naive_acc, naive_entropy = _naive_loss_with_memory(np.array(r["z"], np.float32),
                                                              np.array(r["memory"], np.float32), r["filled"],
                                                              r["tau"], True)
    np.testing.assert_allclose(r["single_loss"], naive, rtol=2e-5)
    # Each replica's loss was divided by R; their sum is the global-batch mean.
    np.testing.assert_allclose(sum(r["replica_losses"]), r["single_loss"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.array(r["grad"]), np.array(r["single_grad"]), rtol=1e-5, atol=1e-6)
    assert np.abs(np.array(r["single_grad"])).max() > 1e-3
    np.testing.assert_allclose(np.mean(r["accs"]), naive_acc, atol=1e-6)
    np.testing.assert_allclose(np.mean(r["entropies"]), naive_entropy, rtol=1e-5)


def test_two_replicas_write_the_same_keys_and_copy_as_one_device(two_replica_parts):
    """The memory's own step (initial copy, keys with sync BN, gather, enqueue with wrap-around, momentum update)
    on 2 replicas == on 1 device: the keys land in the single-device row order."""
    one, two = two_replica_parts["one"], two_replica_parts["two"]
    assert one["pointer"] == two["pointer"] == 8 and one["filled"] == two["filled"] == K
    for name in one["arrays"]:
        x, y = np.array(one["arrays"][name]), np.array(two["arrays"][name])
        scale = max(float(np.abs(x).max()), 1e-6)
        np.testing.assert_allclose(y, x, atol=1e-4 * scale + 1e-7, err_msg=name)
    assert not np.allclose(one["arrays"]["queue"][:8], one["arrays"]["queue"][8:16])
    assert two_replica_parts["copy_moved"]


# 2 logical replicas on 2 cores: tracing the whole step in two threads takes over a minute. Slow set; the
# default set checks the memory's own step and the loss on 2 replicas above.
@pytest.mark.slow
def test_two_replicas_train_like_one_device(single):
    """4 steps with memory on 2 replicas == on 1 device: weights, optimizer slots, momentum copy, queue (same key
    order on any number of replicas), pointer, fill count; within the replica tolerance of test_train.py."""
    result = _run_worker(single["tmp"], "trainer")
    a, b = _variable_values(single["tmp"] / "single" / f"ckpt-{STEPS}"), _variable_values(result["checkpoint"])
    assert sorted(a) == sorted(b) and "memory/queue/.ATTRIBUTES/VARIABLE_VALUE" in a
    del a["save_counter/.ATTRIBUTES/VARIABLE_VALUE"]  # the 1-device run also saved after step 2
    for name, x in a.items():
        # Sync BN and the gathered logits sum in another order: ~3e-5 of each array's scale (as test_train.py).
        scale = max(float(np.abs(x).max()), 1e-6)
        np.testing.assert_allclose(b[name], x, atol=1e-4 * scale + 1e-7, err_msg=name)


def _worker_loss(strategy) -> dict:
    """NT-Xent with a memory on 2 replicas (loss, gradient, metrics) and on the gathered batch on one device."""
    import tensorflow as tf

    from simclr_tf.losses import nt_xent

    replicas, b, tau, filled = 2, 3, 0.5, 5
    z, memory = _random_problem(21, replicas * b)
    z1, z2 = z[:replicas * b], z[replicas * b:]
    z_global = tf.constant(z)
    with tf.GradientTape() as tape:
        tape.watch(z_global)
        single = nt_xent(z_global, temperature=tau, memory=tf.constant(memory), memory_filled=tf.constant(filled))
    single_grad = tape.gradient(single.loss, z_global).numpy()
    local = [np.concatenate([z1[r * b:(r + 1) * b], z2[r * b:(r + 1) * b]]) for r in range(replicas)]
    values = strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(local[ctx.replica_id_in_sync_group]))

    def replica_fn(z_local):
        with tf.GradientTape() as tape_:
            tape_.watch(z_local)
            out = nt_xent(z_local, temperature=tau, memory=tf.constant(memory), memory_filled=tf.constant(filled))
            scaled = out.loss / replicas  # each replica's share of the global mean, as the trainer takes it
        return scaled, tape_.gradient(scaled, z_local), out.contrast_acc, out.contrast_entropy

    per_replica = [[t.numpy() for t in strategy.experimental_local_results(x)]
                   for x in tf.function(lambda v: strategy.run(replica_fn, args=(v,)))(values)]
    losses, grads, accs, entropies = per_replica
    grad = np.zeros_like(single_grad)
    for r in range(replicas):
        grad[r * b:(r + 1) * b] = grads[r][:b]
        grad[replicas * b + r * b:replicas * b + (r + 1) * b] = grads[r][b:]
    return dict(z=z.tolist(), memory=memory.tolist(), filled=filled, tau=tau, single_loss=float(single.loss),
                single_grad=single_grad.tolist(), replica_losses=[float(x) for x in losses], grad=grad.tolist(),
                accs=[float(x) for x in accs], entropies=[float(x) for x in entropies])


def _worker_memory_step(strategies) -> dict:
    """Two memory steps (keys of the views, then after_step) on each strategy, from the same online weights, with
    the online weights moved between the steps; returns the queue, pointer, fill count and the copy's weights."""
    import tensorflow as tf

    from simclr_tf.memory import NegativesMemory
    from simclr_tf.models import build_model
    from simclr_tf.sections import ContrastConfig, ModelConfig
    from tests.conftest import TINY_ARCH

    model_config = ModelConfig(**TINY_ARCH)
    contrast = ContrastConfig(memory_size=K, memory_momentum=MOMENTUM)
    rng = np.random.RandomState(5)
    images = rng.rand(2, BATCH, 16, 16, 6).astype(np.float32)
    results, init, deltas, moved = {}, None, None, False
    for name, strategy in strategies.items():
        online = build_model(model_config, 0, strategy)
        if init is None:
            init = [w.numpy() for w in online.weights]
            deltas = [rng.normal(scale=0.05, size=w.shape).astype(np.float32) for w in online.trainable_weights]
        for w, value in zip(online.weights, init):
            w.assign(value)
        memory = NegativesMemory(online, model_config, contrast, strategy)
        memory.start()
        replicas = strategy.num_replicas_in_sync

        def step(local_images):
            memory.keys(tf.concat(tf.split(local_images, 2, axis=-1), axis=0))
            memory.after_step()
            return tf.constant(0.0)

        run = tf.function(lambda batch: strategy.run(step, args=(batch,)))
        for t in range(2):
            if t == 1:  # as an optimizer step would, so the momentum update has something to follow
                for w, delta in zip(online.trainable_weights, deltas):
                    w.assign(w.numpy() + delta)
            per = BATCH // replicas
            run(strategy.experimental_distribute_values_from_function(
                lambda ctx, t=t: tf.constant(images[t][ctx.replica_id_in_sync_group * per:][:per])))
        copy = {w.path.split("/", 1)[1]: w.numpy() for w in memory.model.weights}
        moved |= any(not np.allclose(copy[w.path.split("/", 1)[1]], value)
                     for w, value in zip(online.weights, init) if w.path.split("/", 1)[1] in copy)
        arrays = {"queue": memory.queue.numpy().tolist()}
        arrays.update({f"copy/{path}": value.tolist() for path, value in copy.items()})
        results[name] = dict(pointer=int(memory.pointer.numpy()), filled=int(memory.filled.numpy()), arrays=arrays)
    return dict(results, copy_moved=bool(moved))


def _worker(what: str, tmp: pathlib.Path) -> None:
    """The 2-replica checks, in a process whose CPU is split in two before TensorFlow starts."""
    from simclr_tf.strategy import split_cpu

    split_cpu(2)
    import tensorflow as tf

    from simclr_tf.data.sources import build_source
    from simclr_tf.strategy import build_strategy
    from simclr_tf.train import Trainer

    strategy = build_strategy("mirrored", num_cpu_replicas=2)
    if what == "parts":
        result = dict(loss=_worker_loss(strategy), **_worker_memory_step(
            {"one": tf.distribute.OneDeviceStrategy("/cpu:0"), "two": strategy}))
    else:
        batches = np.load(tmp / "batches.npz")
        config = _config(tmp / "two", tmp / "tiny.npz", strategy="mirrored", num_cpu_replicas=2)
        trainer = Trainer(config, strategy, build_source(config.dataset, None, "train", "test"), log=lambda _: None)
        init = np.load(tmp / "init.npz")
        for i, w in enumerate(trainer.model.weights):
            w.assign(init[f"w{i}"])
        trainer.run_steps(list(zip(batches["images"], batches["labels"])))
        result = dict(checkpoint=trainer.manager.save(checkpoint_number=STEPS))
    (tmp / f"{what}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    _worker(sys.argv[1], pathlib.Path(sys.argv[2]))
