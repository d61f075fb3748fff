"""--eval_split left at its default: datasets without `validation` are evaluated on `test` (said in the log);
a run that evaluates nothing needs no eval split; a named split is used as given. Also the warmup warning of
app.main (the function itself is tested in test_schedules.py)."""
import numpy as np
import pytest
from absl import flags
from PIL import Image

from simclr_tf import config as config_lib
from simclr_tf.errors import UsageError
from tests.conftest import TINY_FLAGS, write_npz


def config_from(*args: str) -> config_lib.Config:
    fv = flags.FlagValues()
    config_lib.define_flags(fv)
    fv(["run.py", *args])
    return config_lib.from_flags(fv)


def write_folder(root, splits, classes=("cat", "dog"), per_class=4, size=16):
    """`root/<split>/<class>/<i>.png`, small random images."""
    rng = np.random.default_rng(0)
    for split in splits:
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(image).save(root / split / name / f"{i}.png")
    return str(root)


def prepared(*args: str):
    from simclr_tf import app

    messages = []
    _, source = app.prepare(config_from(*args), log=messages.append)
    return source, messages


def test_only_a_typed_eval_split_is_explicit():
    assert not config_from("--model_dir=/tmp/x").eval_split_explicit
    assert not config_from("--model_dir=/tmp/x").eval_split_named
    assert config_from("--model_dir=/tmp/x", "--eval_split=validation").eval_split_explicit
    assert config_from("--model_dir=/tmp/x", "--eval_split=test").eval_split_named
    # A Config built in code names its split whenever it is not the default.
    assert config_lib.Config(eval_split="test").eval_split_named
    assert not config_lib.Config().eval_split_named


def test_default_eval_split_falls_back_to_test_and_says_so(tmp_path):
    npz = write_npz(tmp_path / "d.npz", classes=3, n_test=11)
    source, messages = prepared(f"--dataset=npz:{npz}", f"--model_dir={tmp_path / 'run'}",
                                "--mode=train_then_eval", *TINY_FLAGS)
    assert source.eval_split == "test" and source.num_eval == 11
    assert messages == [f"--eval_split: no 'validation' split in npz:{npz}; evaluating on 'test'"]

    folder = write_folder(tmp_path / "images", ["train", "test"])
    source, messages = prepared(f"--dataset=folder:{folder}", f"--model_dir={tmp_path / 'run2'}", "--mode=eval",
                                *TINY_FLAGS)
    assert source.eval_split == "test" and source.num_eval == 8 and source.eval_has_labels
    assert len(messages) == 1 and "evaluating on 'test'" in messages[0], messages


def test_named_eval_split_is_used_or_refused_as_given(tmp_path):
    npz = write_npz(tmp_path / "d.npz", classes=3, n_test=11)
    common = [f"--dataset=npz:{npz}", f"--model_dir={tmp_path / 'run'}", *TINY_FLAGS]
    for mode in ("train", "train_then_eval"):  # a typed split is checked even when nothing evaluates
        with pytest.raises(UsageError, match=r"^--eval_split: unknown split 'validation'"):
            prepared(*common, f"--mode={mode}", "--eval_split=validation")
    source, messages = prepared(*common, "--mode=train_then_eval", "--eval_split=test[:5]")
    assert source.eval_split == "test[:5]" and source.num_eval == 5 and messages == []


def test_without_validation_or_test_only_runs_that_evaluate_fail(tmp_path):
    folder = write_folder(tmp_path / "images", ["train"])
    common = [f"--dataset=folder:{folder}", f"--model_dir={tmp_path / 'run'}", *TINY_FLAGS]
    # Pretraining with the online head trains it on train labels: nothing reads an eval split.
    source, messages = prepared(*common, "--mode=train")
    assert source.eval_split is None and source.num_eval == 0 and source.num_train == 8 and messages == []
    for extra in (["--mode=train_then_eval"], ["--mode=eval"], ["--mode=train", "--knn_every_steps=5"],
                  ["--mode=train_then_eval", "--train_mode=finetune"]):
        with pytest.raises(UsageError) as e:
            prepared(*common, *extra)
        assert str(e.value) == (f"--eval_split: folder:{folder} has no 'validation' or 'test' split; name one "
                                "with --eval_split"), extra
    # Nothing to evaluate after headless pretraining either.
    source, _ = prepared(*common, "--mode=train_then_eval", "--lineareval_while_pretraining=false")
    assert source.eval_split is None


def test_pretraining_accepts_unlabelled_train_data(tmp_path):
    npz = write_npz(tmp_path / "u.npz", classes=3, y_train=np.full(64, -1), y_test=None)
    source, _ = prepared(f"--dataset=npz:{npz}", f"--model_dir={tmp_path / 'run'}", "--mode=train", *TINY_FLAGS)
    assert source.num_train == 64 and source.num_classes == 0
    with pytest.raises(UsageError, match=r"^--train_split: fine-tuning needs labels"):
        prepared(f"--dataset=npz:{npz}", f"--model_dir={tmp_path / 'run'}", "--mode=train",
                 "--train_mode=finetune", *TINY_FLAGS)


def test_main_evaluates_on_test_warns_about_warmup_and_exports_class_names(tmp_path):
    """A folder dataset with default flags: app.main trains, evaluates on `test` and exports its class names."""
    import tensorflow as tf

    from simclr_tf import app
    from simclr_tf.export import exported_class_names, latest_export

    folder = write_folder(tmp_path / "images", ["train", "test"], classes=("dog", "cat"), per_class=4)
    model_dir = tmp_path / "run"
    messages = []
    # 8 train images, batch 8: 2 steps under the default 10 warmup epochs (10 steps).
    result = app.main(config_from(f"--dataset=folder:{folder}", f"--model_dir={model_dir}", "--mode=train_then_eval",
                                  "--train_batch_size=8", "--train_epochs=1", "--checkpoint_steps=2", *TINY_FLAGS),
                      log=messages.append)
    assert any(m.startswith("--eval_split: no 'validation' split") for m in messages), messages
    warnings = [m for m in messages if "--warmup_epochs" in m]
    assert len(warnings) == 1 and "10 warmup steps" in warnings[0] and "2 training steps" in warnings[0], messages
    assert result["num_examples"] == 8
    loaded = tf.saved_model.load(latest_export(str(model_dir)))
    assert exported_class_names(loaded) == ("cat", "dog")  # sorted class folders, as the labels are
