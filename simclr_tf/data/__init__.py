"""Input: sources, the augmentation ops and programs, the CLI's pipelines, and the `fit()` datasets."""


def __getattr__(name: str):
    # Imported on first use, so `import simclr_tf.data.ops` does not build the whole pipeline module.
    if name in ("pretraining_dataset", "eval_dataset", "steps_per_epoch", "as_source"):
        from simclr_tf.data import views

        return getattr(views, name)
    raise AttributeError(f"module 'simclr_tf.data' has no attribute {name!r}")
