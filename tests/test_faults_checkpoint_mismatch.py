"""Fault injection, checkpoints that do not fit: own and official checkpoints of another depth or width given
to --checkpoint, a model_dir written by another architecture, a truncated checkpoint."""
from __future__ import annotations

import os
import re

import pytest

from tests.fault_harness import copy_base, fault, tiny_config

pytestmark = pytest.mark.usefixtures("background")  # the kill chain and the base run start with the first test


def test_checkpoints_of_another_architecture_name_the_variable(work, base):
    import tensorflow as tf

    from simclr_tf import app, official
    from simclr_tf import checkpoints as ckpt_lib
    from simclr_tf.errors import UsageError
    from simclr_tf.models import build_model

    strategy = tf.distribute.get_strategy()
    deeper = build_model(tiny_config(base, resnet_depth=34, train_mode="finetune").model, 4, strategy)
    wider = build_model(tiny_config(base, width_multiplier=0.25, train_mode="finetune").model, 4, strategy)

    with fault("--checkpoint: own checkpoint of another depth"):
        with pytest.raises(UsageError) as e:
            ckpt_lib.initialise_from_checkpoint(deeper, str(base))
        message = str(e.value)
        assert message.startswith("--checkpoint:") and "\n" not in message
        assert re.search(r"variable model/backbone/block_group\d/block\d+/\S+ of this model is not in the "
                         r"checkpoint", message), message

    with fault("--checkpoint: own checkpoint of another width"):
        with pytest.raises(UsageError) as e:
            ckpt_lib.initialise_from_checkpoint(wider, str(base))
        assert re.search(r"variable model/\S+ has shape \[\d+(, \d+)*\] in the checkpoint, \[\d+(, \d+)*\] in "
                         r"this model", str(e.value)), str(e.value)

    # An official (TF1, name-based) checkpoint of the tiny ResNet-18, written with the official names.
    small = build_model(tiny_config(base, train_mode="finetune").model, 4, strategy)
    names = official.official_variable_map(small)
    prefix = str(work["root"] / "official" / "model.ckpt-10")
    os.makedirs(os.path.dirname(prefix))
    tf.raw_ops.SaveV2(prefix=prefix, tensor_names=list(names), shape_and_slices=[""] * len(names),
                      tensors=[tf.constant(v.numpy()) for v in names.values()])
    ckpt_lib.initialise_from_checkpoint(build_model(tiny_config(base, train_mode="finetune").model, 4, strategy),
                                        prefix)  # the matching architecture loads
    with fault("--checkpoint: official checkpoint of another width"):
        with pytest.raises(UsageError) as e:
            ckpt_lib.initialise_from_checkpoint(wider, prefix)
        assert str(e.value).startswith("--checkpoint:") and "\n" not in str(e.value)
        assert re.search(r"variable base_model/conv2d(_\d+)?/kernel has shape \[[\d, ]+\], the model expects",
                         str(e.value)), str(e.value)
    with fault("--checkpoint: official checkpoint of another depth"):
        with pytest.raises(UsageError) as e:
            ckpt_lib.initialise_from_checkpoint(deeper, prefix)
        assert re.search(r"variable base_model/\S+", str(e.value)) and "ResNet-18" in str(e.value), str(e.value)

    with fault("resume in a model_dir written by another architecture"):
        model_dir = copy_base(base, work, "other_arch")
        with pytest.raises(UsageError) as e:
            app.main(tiny_config(model_dir, dataset=f"npz:{work['npz']}", width_multiplier=0.25,
                                 train_steps=6), log=lambda _: None)
        message = str(e.value)
        assert message.startswith("--model_dir:") and "ckpt-4" in message and "\n" not in message
        assert re.search(r"variable model/\S+ has shape", message), message

    with fault("resume from a corrupt (truncated) checkpoint"):
        model_dir = copy_base(base, work, "truncated")
        data = model_dir / "ckpt-4.data-00000-of-00001"
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
        with pytest.raises(UsageError) as e:
            app.main(tiny_config(model_dir, dataset=f"npz:{work['npz']}", train_steps=6), log=lambda _: None)
        assert str(e.value).startswith("--model_dir: cannot read checkpoint") and "ckpt-4" in str(e.value)
        assert "\n" not in str(e.value)
