"""Pretraining without online linear eval has no supervised head: nothing trains one, so none is built,
decayed, exported or accepted as a distillation teacher; fine-tuning from such a run still works."""
import pytest
import tensorflow as tf

from tests.conftest import TINY, write_npz


def test_pretraining_without_linear_eval_builds_exports_and_distils_no_head(tmp_path):
    from simclr_tf import app
    from simclr_tf.config import Config, validate
    from simclr_tf.distill import build_teacher
    from simclr_tf.errors import UsageError
    from simclr_tf.train import Trainer

    data = write_npz(tmp_path / "tiny.npz", classes=4)
    common = dict(TINY, dataset=f"npz:{data}", train_split="train", eval_split="test", train_batch_size=8,
                  train_steps=2, checkpoint_steps=2, warmup_epochs=0, seed=0, strategy="one_device")
    pretrain = validate(Config(**common, model_dir=str(tmp_path / "pre"), lineareval_while_pretraining=False))
    strategy, source = app.prepare(pretrain)
    assert source.num_classes == 4  # the data has labels; the run just does not use them
    trainer = Trainer(pretrain, strategy, source, log=lambda _: None)
    assert trainer.model.supervised_head is None
    assert "logits_sup" not in trainer.model(tf.zeros([2, 16, 16, 3]), training=False)
    metrics = trainer.run_steps([(tf.random.uniform([8, 16, 16, 6]), tf.zeros([8], tf.int64))])
    assert "sup_loss" not in metrics and "weight_decay" in metrics

    app.main(pretrain, log=lambda _: None)  # train + export
    export = tf.saved_model.load(str(tmp_path / "pre" / "saved_model" / "2"))
    assert int(export.num_classes.numpy()) == 0
    outputs = export.signatures["serving_float"](images=tf.zeros([1, 16, 16, 3]))
    assert "final_avg_pool" in outputs and "logits_sup" not in outputs and "probabilities" not in outputs

    student = validate(Config(**common, model_dir=str(tmp_path / "student"), train_mode="distill",
                              teacher_checkpoint=str(tmp_path / "pre")))
    with pytest.raises(UsageError, match="no supervised head"):
        build_teacher(student, strategy, 4)

    finetune = validate(Config(**common, model_dir=str(tmp_path / "ft"), train_mode="finetune",
                               checkpoint=str(tmp_path / "pre")))
    tuned = Trainer(finetune, strategy, source, log=lambda _: None)
    assert "initialised model weights from" in tuned.restore() and tuned.model.supervised_head is not None


def test_teacher_architecture_comes_from_the_checkpoint_not_the_student(tmp_path):
    """A fine-tuned teacher (head on projection layer 1) without flags.json: its checkpoint says how to
    rebuild it; a checkpoint that records nothing is refused instead of rebuilt from the student's flags."""
    import numpy as np

    from simclr_tf import app, checkpoints
    from simclr_tf.config import Config, validate
    from simclr_tf.distill import build_teacher
    from simclr_tf.errors import UsageError
    from simclr_tf.train import Trainer

    data = write_npz(tmp_path / "tiny.npz", classes=4)
    common = dict(TINY, dataset=f"npz:{data}", train_split="train", eval_split="test", train_batch_size=8,
                  train_steps=2, checkpoint_steps=2, warmup_epochs=0, seed=0, strategy="one_device")
    teacher_config = validate(Config(**common, model_dir=str(tmp_path / "teacher"), train_mode="finetune",
                                     ft_proj_selector=1))
    strategy, source = app.prepare(teacher_config)
    trainer = Trainer(teacher_config, strategy, source, log=lambda _: None)  # no flags.json is written
    trainer.train()
    prefix = trainer.manager.latest_checkpoint
    assert not (tmp_path / "teacher" / "flags.json").exists()
    assert checkpoints.stored_architecture(prefix)["ft_proj_selector"] == 1

    student = validate(Config(**common, model_dir=str(tmp_path / "student"), train_mode="distill",
                              teacher_checkpoint=str(tmp_path / "teacher")))  # ft_proj_selector 0 here
    images = tf.random.uniform([4, 16, 16, 3], seed=1)
    teacher = build_teacher(student, strategy, 4)
    np.testing.assert_allclose(teacher(images).numpy(),
                               trainer.model(images, training=False)["logits_sup"].numpy(), atol=1e-4)

    # The same weights in a checkpoint that records no architecture (as older versions wrote them).
    legacy = tmp_path / "legacy"
    bare = tf.train.Checkpoint(model=trainer.model, optimizer=trainer.optimizer, global_step=trainer.global_step)
    bare_prefix = tf.train.CheckpointManager(bare, str(legacy), max_to_keep=1).save(checkpoint_number=2)
    assert checkpoints.stored_architecture(bare_prefix) is None
    with pytest.raises(UsageError, match="does not record its architecture"):
        build_teacher(student.replace(teacher_checkpoint=bare_prefix), strategy, 4)
    # ... and such a checkpoint still resumes (its run's own flags are given).
    resumed = Trainer(teacher_config.replace(model_dir=str(legacy)), strategy, source, log=lambda _: None)
    assert "resumed from" in resumed.restore()
