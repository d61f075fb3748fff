"""NT-Xent and distillation loss against naive NumPy implementations, on one and on 2/4 replicas."""
import json
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from simclr_tf.errors import UsageError
from simclr_tf.losses import distillation_loss, nt_xent
from tests.conftest import REPO


def _naive_nt_xent(z: np.ndarray, tau: float, hidden_norm: bool):
    """Row-by-row NT-Xent in float64 with the self term left out of the sum (no -1e9 mask)."""
    z = z.astype(np.float64)
    if hidden_norm:
        z = z / np.sqrt(np.maximum((z * z).sum(1, keepdims=True), 1e-12))
    n = z.shape[0] // 2
    z1, z2 = z[:n], z[n:]
    total, correct, entropy = 0.0, 0, 0.0
    for anchors, others in ((z1, z2), (z2, z1)):
        for i in range(n):
            cross = [anchors[i] @ others[j] / tau for j in range(n)]
            same = [anchors[i] @ anchors[j] / tau for j in range(n) if j != i]
            logits = np.array(cross + same)
            top = logits.max()
            log_denominator = top + np.log(np.exp(logits - top).sum())
            total += log_denominator - cross[i]
    for i in range(n):  # metrics use view-1 rows against view-2 only
        cross = np.array([z1[i] @ z2[j] / tau for j in range(n)])
        correct += int(np.argmax(cross) == i)
        p = np.exp(cross - cross.max())
        p /= p.sum()
        entropy += -(p * np.log(p)).sum()
    return total / n, correct / n, entropy / n


@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("tau", [0.1, 0.5, 1.0])
@pytest.mark.parametrize("hidden_norm", [True, False])
def test_nt_xent_matches_naive_loop(batch, tau, hidden_norm):
    rng = np.random.default_rng(batch * 100 + int(tau * 10) + hidden_norm)
    z = rng.normal(size=(2 * batch, 16)).astype(np.float32)
    if not hidden_norm:
        z *= 0.3  # keep unnormalised logits in a range where the comparison is about the formula
    out = nt_xent(tf.constant(z), temperature=tau, hidden_norm=hidden_norm)
    loss, acc, entropy = _naive_nt_xent(z, tau, hidden_norm)
    np.testing.assert_allclose(out.loss.numpy(), loss, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(out.contrast_acc.numpy(), acc, atol=1e-7)
    np.testing.assert_allclose(out.contrast_entropy.numpy(), entropy, rtol=2e-5, atol=1e-6)
    assert out.loss.dtype == tf.float32 and out.logits_ab.dtype == tf.float32
    np.testing.assert_array_equal(out.labels.numpy(), np.arange(batch))
    assert out.logits_ab.shape == (batch, batch)


def test_nt_xent_positive_pairs_identical_gives_low_loss_and_full_accuracy():
    # With view 2 == view 1 and well-separated directions, every positive is the argmax.
    z1 = np.eye(4, 8, dtype=np.float32) * 5.0
    out = nt_xent(tf.constant(np.concatenate([z1, z1])), temperature=0.1)
    assert out.contrast_acc.numpy() == 1.0
    assert out.loss.numpy() < 1e-3
    loss, _, _ = _naive_nt_xent(np.concatenate([z1, z1]), 0.1, True)
    np.testing.assert_allclose(out.loss.numpy(), loss, atol=1e-6)


def test_nt_xent_float16_input_gives_finite_float32_loss():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(8, 16)).astype(np.float16)
    out = nt_xent(tf.constant(z), temperature=0.1)
    assert out.loss.dtype == tf.float32
    assert np.isfinite(out.loss.numpy())
    loss, _, _ = _naive_nt_xent(z.astype(np.float32), 0.1, True)
    np.testing.assert_allclose(out.loss.numpy(), loss, rtol=1e-4)


def test_nt_xent_rejects_non_positive_temperature():
    with pytest.raises(UsageError, match="--temperature"):
        nt_xent(tf.zeros([4, 3]), temperature=0.0)


def _naive_distillation(t, s, tau):
    t = t.astype(np.float64) / tau
    s = s.astype(np.float64) / tau
    p = np.exp(t - t.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    log_q = s - s.max(1, keepdims=True)
    log_q -= np.log(np.exp(log_q).sum(1, keepdims=True))
    return -(p * log_q).sum(1)


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
def test_distillation_loss_matches_numpy(tau):
    rng = np.random.default_rng(1)
    teacher = rng.normal(size=(6, 10)).astype(np.float32) * 3
    student = rng.normal(size=(6, 10)).astype(np.float32) * 3
    expected = _naive_distillation(teacher, student, tau)
    per_example = distillation_loss(tf.constant(teacher), tf.constant(student), tau, reduction="none")
    np.testing.assert_allclose(per_example.numpy(), expected, rtol=1e-5)
    mean = distillation_loss(tf.constant(teacher), tf.constant(student), tau)
    np.testing.assert_allclose(mean.numpy(), expected.mean(), rtol=1e-5)
    scaled = distillation_loss(tf.constant(teacher), tf.constant(student), tau,
                               scale_by_temperature_squared=True)
    np.testing.assert_allclose(scaled.numpy(), expected.mean() * tau ** 2, rtol=1e-5)
    half = distillation_loss(tf.constant(teacher, tf.float16), tf.constant(student, tf.float16), tau)
    assert half.dtype == tf.float32


def test_distillation_loss_gradient_reaches_student_only():
    teacher = tf.Variable([[1.0, 2.0, 0.5]])
    student = tf.Variable([[0.3, -1.0, 2.0]])
    with tf.GradientTape(persistent=True) as tape:
        loss = distillation_loss(teacher, student, 1.0)
    assert tape.gradient(loss, teacher) is None
    # d/ds of CE(p, softmax(s)) is softmax(s) - p
    p = tf.nn.softmax(teacher).numpy()
    q = tf.nn.softmax(student).numpy()
    np.testing.assert_allclose(tape.gradient(loss, student).numpy(), q - p, atol=1e-6)


_REPLICA_SCRIPT = r"""
import json, sys
import numpy as np
import tensorflow as tf

tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 4)
from simclr_tf.losses import nt_xent

# One replica count per process: two MirroredStrategies of different sizes in one process reuse collective
# group keys and the second all_gather aborts ("joining a group with size 4, but that group has size 2").
replicas = int(sys.argv[1])
strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(replicas)])
results = []
for hidden_norm, tau in [(True, 0.1), (False, 0.5)]:
    b, d = 3, 8
    rng = np.random.default_rng(replicas * 10 + int(hidden_norm))
    z1 = rng.normal(size=(replicas * b, d)).astype(np.float32) * (1.0 if hidden_norm else 0.4)
    z2 = rng.normal(size=(replicas * b, d)).astype(np.float32) * (1.0 if hidden_norm else 0.4)
    z_global = tf.constant(np.concatenate([z1, z2]))
    with tf.GradientTape() as tape:
        tape.watch(z_global)
        single = nt_xent(z_global, temperature=tau, hidden_norm=hidden_norm)
    single_grad = tape.gradient(single.loss, z_global).numpy()

    local = [np.concatenate([z1[r * b:(r + 1) * b], z2[r * b:(r + 1) * b]]) for r in range(replicas)]
    values = strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(local[ctx.replica_id_in_sync_group]))

    def replica_fn(z):
        with tf.GradientTape() as tape:
            tape.watch(z)
            out = nt_xent(z, temperature=tau, hidden_norm=hidden_norm)
            scaled = out.loss / replicas  # each replica's share of the global mean, as the trainer takes it
        return (scaled, tape.gradient(scaled, z), out.contrast_acc, out.contrast_entropy, out.labels,
                out.logits_ab)

    @tf.function
    def step(z):
        return strategy.run(replica_fn, args=(z,))

    per_replica = [[t.numpy() for t in strategy.experimental_local_results(x)] for x in step(values)]
    losses, grads, accs, entropies, labels, logits = per_replica
    grad = np.zeros_like(single_grad)
    for r in range(replicas):
        grad[r * b:(r + 1) * b] = grads[r][:b]
        grad[replicas * b + r * b:replicas * b + (r + 1) * b] = grads[r][b:]
    results.append(dict(
        replicas=replicas, tau=tau, hidden_norm=hidden_norm, z=np.concatenate([z1, z2]).tolist(),
        single_loss=float(single.loss), single_acc=float(single.contrast_acc),
        single_entropy=float(single.contrast_entropy), single_grad=single_grad.tolist(),
        single_logits_ab=single.logits_ab.numpy().tolist(),
        replica_losses=[float(x) for x in losses], grad=grad.tolist(),
        accs=[float(x) for x in accs], entropies=[float(x) for x in entropies],
        labels=[x.tolist() for x in labels], logits_ab=[x.tolist() for x in logits]))
print("RESULT" + json.dumps(results))
"""


@pytest.fixture(scope="module", params=[2, 4], ids=lambda r: f"{r}replicas")
def replica_results(request):
    proc = subprocess.run([sys.executable, "-c", _REPLICA_SCRIPT, str(request.param)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


def test_multi_replica_loss_and_gradient_equal_single_device(replica_results):
    assert len(replica_results) == 2
    for r in replica_results:
        replicas, b = r["replicas"], 3
        where = f"R={replicas} tau={r['tau']} hidden_norm={r['hidden_norm']}"
        naive, naive_acc, _ = _naive_nt_xent(np.array(r["z"], np.float32), r["tau"], r["hidden_norm"])
        np.testing.assert_allclose(r["single_loss"], naive, rtol=2e-5, err_msg=where)
        # Each replica's loss was divided by R; their sum is the global-batch mean.
        np.testing.assert_allclose(sum(r["replica_losses"]), r["single_loss"], rtol=1e-5, atol=1e-6,
                                   err_msg=where)
        np.testing.assert_allclose(np.array(r["grad"]), np.array(r["single_grad"]), rtol=1e-5, atol=1e-6,
                                   err_msg=where)
        assert np.abs(np.array(r["single_grad"])).max() > 1e-3, where  # the comparison is not vacuous
        np.testing.assert_allclose(np.mean(r["accs"]), r["single_acc"], atol=1e-6, err_msg=where)
        np.testing.assert_allclose(np.mean(r["entropies"]), r["single_entropy"], rtol=1e-5, err_msg=where)
        single_logits = np.array(r["single_logits_ab"])
        for k in range(replicas):
            np.testing.assert_array_equal(r["labels"][k], np.arange(k * b, (k + 1) * b), err_msg=where)
            np.testing.assert_allclose(np.array(r["logits_ab"][k]), single_logits[k * b:(k + 1) * b],
                                       rtol=1e-5, atol=1e-5, err_msg=where)
