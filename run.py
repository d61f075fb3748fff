"""SimCLR v1/v2 for TensorFlow 2 / Keras 3: the command line, flag-compatible with the official tf2/run.py.

  python run.py --mode=train_then_eval --train_mode=pretrain --dataset=cifar10 --model_dir=/tmp/simclr ...
  python run.py --flagfile=flags/cifar10_pretrain.flags --model_dir=...
"""
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

from simclr_tf import config as config_lib  # noqa: E402
from simclr_tf.errors import UsageError  # noqa: E402

config_lib.define_flags()


def main(argv):
    config = config_lib.from_command_line(argv, flags.FLAGS)
    from simclr_tf import hardware

    hardware.keep_jax_out()  # before TensorFlow's import, which would import it
    if config.tune_malloc:  # before TensorFlow starts its threads
        hardware.tune_malloc()
    # TF is imported only once the flags are known to be good.
    from simclr_tf import app as simclr_app
    from simclr_tf.train import NonFiniteLossError

    simclr_app.configure_logging()
    try:
        with hardware.HeapTrimmer(config.malloc_trim_secs):
            simclr_app.main(config)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    app.run(main)
