"""Flags: the official names/defaults, our additions, and one-line errors naming the flag."""
import subprocess
import sys

import pytest
from absl import flags

from simclr_tf import config as config_lib
from simclr_tf.errors import UsageError
from tests.conftest import REPO

# name -> default, exactly as in the official tf2/run.py.
OFFICIAL_DEFAULTS = {
    "learning_rate": 0.3, "learning_rate_scaling": "linear", "warmup_epochs": 10, "weight_decay": 1e-6,
    "batch_norm_decay": 0.9, "train_batch_size": 512, "train_split": "train", "train_epochs": 100,
    "train_steps": 0, "eval_steps": 0, "eval_batch_size": 256, "checkpoint_epochs": 1, "checkpoint_steps": 0,
    "eval_split": "validation", "dataset": "imagenet2012", "cache_dataset": False, "mode": "train",
    "train_mode": "pretrain", "lineareval_while_pretraining": True, "checkpoint": None,
    "zero_init_logits_layer": False, "fine_tune_after_block": -1, "master": None, "model_dir": None,
    "data_dir": None, "use_tpu": True, "tpu_name": None, "tpu_zone": None, "gcp_project": None,
    "optimizer": "lars", "momentum": 0.9, "eval_name": None, "keep_checkpoint_max": 5,
    "keep_hub_module_max": 1, "temperature": 0.1, "hidden_norm": True, "proj_head_mode": "nonlinear",
    "proj_out_dim": 128, "num_proj_layers": 3, "ft_proj_selector": 0, "global_bn": True,
    "width_multiplier": 1, "resnet_depth": 50, "sk_ratio": 0.0, "se_ratio": 0.0, "image_size": 224,
    "color_jitter_strength": 1.0, "use_blur": True,
}
OFFICIAL_ENUMS = {
    "learning_rate_scaling": ["linear", "sqrt"], "mode": ["train", "eval", "train_then_eval"],
    "optimizer": ["momentum", "adam", "lars"], "proj_head_mode": ["none", "linear", "nonlinear"],
}


def parse(*args: str) -> flags.FlagValues:
    fv = flags.FlagValues()
    config_lib.define_flags(fv)
    fv(["run.py", *args])
    return fv


def config_from(*args: str) -> config_lib.Config:
    return config_lib.from_flags(parse(*args))


def test_every_official_flag_parses_with_its_official_default():
    fv = parse()
    for name, default in OFFICIAL_DEFAULTS.items():
        assert name in fv, name
        assert fv[name].value == default, (name, fv[name].value, default)
        assert fv[name].default == default, name
    for name, values in OFFICIAL_ENUMS.items():
        assert set(values) <= set(fv[name].parser.enum_values), name


def test_config_dataclass_holds_every_flag_and_is_frozen():
    config = config_from("--model_dir=/tmp/x", "--width_multiplier=0.25", "--train_mode=finetune")
    assert config.width_multiplier == 0.25 and config.train_mode == "finetune"
    with pytest.raises(Exception):
        config.image_size = 3  # frozen
    fv = parse()
    for name in OFFICIAL_DEFAULTS:
        assert hasattr(config, name), name
    # The dataclass defaults agree with the flag defaults, so library users get the same behaviour.
    defaults = config_lib.Config()
    for name in OFFICIAL_DEFAULTS:
        assert getattr(defaults, name) == fv[name].default, name


def test_integer_width_still_parses_like_the_official_integer_flag():
    assert config_from("--model_dir=/tmp/x", "--width_multiplier=2").width_multiplier == 2.0


def test_use_tpu_explicit_is_recorded():
    assert not config_from("--model_dir=/tmp/x").use_tpu_explicit
    assert config_from("--model_dir=/tmp/x", "--use_tpu=true").use_tpu_explicit
    assert not config_from("--model_dir=/tmp/x", "--use_tpu=false").use_tpu_explicit


@pytest.mark.parametrize("args, flag", [
    (["--image_size=4"], "--image_size"),
    (["--fine_tune_after_block=2"], "--fine_tune_after_block"),
    (["--train_mode=finetune", "--fine_tune_after_block=7"], "--fine_tune_after_block"),
    (["--resnet_depth=42"], "--resnet_depth"),
    (["--width_multiplier=0"], "--width_multiplier"),
    (["--temperature=0"], "--temperature"),
    (["--proj_head_mode=linear", "--ft_proj_selector=2"], "--ft_proj_selector"),
    (["--checkpoint=/nonexistent/ckpt"], "--checkpoint"),
    (["--train_mode=distill"], "--teacher_checkpoint"),
    (["--resnet_depth=18", "--sk_ratio=-0.0625"], "--sk_ratio"),
    (["--malloc_trim_secs=-1"], "--malloc_trim_secs"),
    (["--recompute", "--recompute_groups=5"], "--recompute_groups"),
])
def test_invalid_input_names_the_flag(args, flag):
    with pytest.raises(UsageError) as e:
        config_from("--model_dir=/tmp/x", *args)
    message = str(e.value)
    assert message.startswith(flag + ":"), message
    assert "\n" not in message


def test_model_dir_is_required():
    with pytest.raises(UsageError, match="^--model_dir:"):
        config_from()


@pytest.mark.parametrize("args, flag", [
    (["--mode=bogus"], "mode"), (["--optimizer=sgd"], "optimizer"), (["--strategy=gpu_farm"], "strategy"),
    (["--train_mode=supervised"], "train_mode"),
])
def test_unknown_enum_values_fail_naming_the_flag(args, flag):
    with pytest.raises(flags.IllegalFlagValueError, match=flag):
        parse(*args)


def test_run_py_prints_one_line_error_and_exits_nonzero(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "run.py"), f"--model_dir={tmp_path}", "--image_size=4"],
        capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert lines[-1] == "error: --image_size: must be >= 8, got 4", proc.stderr


@pytest.mark.parametrize("flagfile", sorted((REPO / "flags").glob("*.flags")), ids=lambda p: p.name)
def test_every_recipe_flagfile_parses_and_validates(flagfile):
    args = [f"--flagfile={flagfile}", "--model_dir=/tmp/x"]
    if "--train_mode=distill" in flagfile.read_text():
        # Distillation recipes leave the teacher to the user, and say so when it is missing.
        with pytest.raises(UsageError, match="^--teacher_checkpoint:"):
            config_from(*args)
        parse(*args)  # every line of the recipe is a known flag with a valid value
        return
    config = config_from(*args)
    # A recipe must say at least what it trains and on what.
    text = flagfile.read_text()
    assert "--dataset=" in text and "--train_mode=" in text
    assert config.dataset in text


def test_selective_kernels_with_basic_blocks_are_accepted():
    """The reference builds ResNet-18/34 with --sk_ratio > 0 (ResNet-D stem and shortcuts, no SK convs)."""
    config = config_from("--model_dir=/tmp/x", "--resnet_depth=18", "--sk_ratio=0.0625")
    assert config.model.sk_ratio == 0.0625 and config.model.resnet_depth == 18
