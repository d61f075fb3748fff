"""Load the official SimCLR v1/v2 TF1 checkpoints (google-research/simclr) into a `SimCLRModel`.

The official code names variables with `tf.layers` defaults, numbered per variable scope in creation order,
and creates them in forward order. So the name of every variable follows from the model's structure:
walk the model's conv/BN/dense leaves in that order (`leaf_layers()`) and count. No name table is involved,
which is why any depth, width, SK or SE setting maps without a fixture:

* backbone `base_model/conv2d{,_1,...}/kernel` (+ `/bias` for squeeze-excite convs) and
  `base_model/batch_normalization{,_1,...}/{gamma,beta,moving_mean,moving_variance}`, independent counters;
* projection head `head_contrastive/nl_<j>/{dense/kernel, batch_normalization/...}` (`l_0` in linear mode),
  no beta in the last layer;
* supervised head `head_supervised/linear_layer/dense/{kernel,bias}`.

Optimizer slots (`<var>/Momentum`, ...) and `global_step` are skipped; `ema_model/<name>` copies are read
instead of `<name>` with `use_ema` (backbone and projection head; the supervised head has no copy).
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from simclr_tf.checkpoints import resolve_checkpoint
from simclr_tf.errors import UsageError, first_line
from simclr_tf.models.resnet import BLOCKS_PER_DEPTH, GROUP_BASE_FILTERS, SK_MIN_DIM, scaled
from simclr_tf.models.simclr import SimCLRModel

WHERE = "--checkpoint"
BACKBONE = "base_model/"
PROJECTION = "head_contrastive/"
SUPERVISED = "head_supervised/"
EMA = "ema_model/"
# Released SimCLRv2 SK checkpoints use 0.0625; at widths <= 1x the SK mixing width is max(int(f*r), 32) = 32
# for every r <= 0.0625, so the checkpoint cannot tell r apart and this is the honest default.
DEFAULT_SK_RATIO = 0.0625
_SLOT_SUFFIXES = ("/Momentum", "/Adam", "/Adam_1", "/RMSProp", "/RMSProp_1")
_NON_MODEL = ("global_step", "beta1_power", "beta2_power")
_NUMBERED = re.compile(r"^(conv2d|batch_normalization)(?:_(\d+))?/")


def _numbered(base: str, index: int) -> str:
    return base if index == 0 else f"{base}_{index}"


def _layer_variables(layer: keras.layers.Layer) -> list[tuple[str, Any]]:
    """(TF1 variable suffix, Keras variable) of one leaf layer, in TF1 order."""
    if isinstance(layer, keras.layers.BatchNormalization):
        pairs = [("gamma", layer.gamma), ("beta", layer.beta), ("moving_mean", layer.moving_mean),
                 ("moving_variance", layer.moving_variance)]
        return [(n, v) for n, v in pairs if v is not None]
    if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
        return [(n, v) for n, v in (("kernel", layer.kernel), ("bias", layer.bias)) if v is not None]
    raise TypeError(f"no TF1 naming rule for layer {layer.name} of type {type(layer).__name__}")


def official_variable_map(model: SimCLRModel) -> dict[str, Any]:
    """TF1 name -> Keras variable for every variable of `model`, in TF1 creation order."""
    if not model.built:
        size = model.image_size
        model.build((None, size, size, 3))
    names: dict[str, Any] = {}
    counters = {"conv2d": 0, "batch_normalization": 0}
    for layer in model.backbone.leaf_layers():
        base = "batch_normalization" if isinstance(layer, keras.layers.BatchNormalization) else "conv2d"
        scope = BACKBONE + _numbered(base, counters[base])
        counters[base] += 1
        for suffix, variable in _layer_variables(layer):
            names[f"{scope}/{suffix}"] = variable
    head = model.projection_head
    prefix = "l_" if head.proj_head_mode == "linear" else "nl_"
    for j, (dense, bn) in enumerate(zip(head.dense_layers, head.bn_layers)):
        for leaf, scope in ((dense, "dense"), (bn, "batch_normalization")):
            for suffix, variable in _layer_variables(leaf):
                names[f"{PROJECTION}{prefix}{j}/{scope}/{suffix}"] = variable
    if model.supervised_head is not None:
        for suffix, variable in _layer_variables(model.supervised_head.dense):
            names[f"{SUPERVISED}linear_layer/dense/{suffix}"] = variable
    return names


def _read_shapes(prefix: str) -> dict[str, list[int]]:
    try:
        return {name: list(shape) for name, shape in tf.train.list_variables(prefix)}
    except (tf.errors.OpError, ValueError) as error:
        raise UsageError(WHERE, f"{prefix}: unreadable checkpoint ({first_line(error)})") from None


def _is_skipped(name: str) -> bool:
    return name in _NON_MODEL or name.endswith(_SLOT_SUFFIXES)


@dataclasses.dataclass(frozen=True)
class ArchitectureSpec:
    """What an official checkpoint's variables say about the model that wrote it."""

    resnet_depth: int
    width_multiplier: float
    sk_ratio: float
    se_ratio: float
    cifar_stem: bool
    proj_head_mode: str | None  # None: the checkpoint has no projection head (released SimCLRv1)
    num_proj_layers: int
    proj_out_dim: int
    num_classes: int  # 0: no supervised head
    supervised_input_dim: int
    has_ema: bool

    def describe(self) -> str:
        sk = f", SK {self.sk_ratio}" if self.sk_ratio else ""
        se = f", SE {self.se_ratio}" if self.se_ratio else ""
        stem = "CIFAR stem" if self.cifar_stem else "ImageNet stem"
        head = (f"{self.proj_head_mode} head with {self.num_proj_layers} layer(s) to {self.proj_out_dim}"
                if self.proj_head_mode else "no projection head")
        classes = f"{self.num_classes} classes" if self.num_classes else "no supervised head"
        return f"ResNet-{self.resnet_depth} {self.width_multiplier:g}x{sk}{se}, {stem}, {head}, {classes}"

    def model_kwargs(self, image_size: int | None = None, ft_proj_selector: int = 0) -> dict[str, Any]:
        """Arguments of a `SimCLRModel` with exactly this checkpoint's variables."""
        if image_size is None:
            image_size = 32 if self.cifar_stem else 224
        self.check_against(image_size=image_size)
        return {"resnet_depth": self.resnet_depth, "width_multiplier": self.width_multiplier,
                "sk_ratio": self.sk_ratio, "se_ratio": self.se_ratio, "image_size": image_size,
                "proj_head_mode": self.proj_head_mode or "none", "num_proj_layers": self.num_proj_layers,
                "proj_out_dim": self.proj_out_dim, "num_classes": self.num_classes or None,
                "ft_proj_selector": ft_proj_selector}

    def check_against(self, *, resnet_depth: int | None = None, width_multiplier: float | None = None,
                      sk_ratio: float | None = None, se_ratio: float | None = None, image_size: int | None = None,
                      proj_head_mode: str | None = None, num_proj_layers: int | None = None,
                      proj_out_dim: int | None = None, num_classes: int | None = None) -> None:
        """Raise a UsageError naming the first flag that disagrees with the checkpoint (None = not checked)."""
        def fail(flag: str, found: Any, wanted: Any) -> None:
            raise UsageError(flag, f"{wanted} does not match the checkpoint ({found}; it is {self.describe()})")

        if resnet_depth is not None and resnet_depth != self.resnet_depth:
            fail("--resnet_depth", self.resnet_depth, resnet_depth)
        if width_multiplier is not None and any(
                scaled(n, width_multiplier) != scaled(n, self.width_multiplier) for n in GROUP_BASE_FILTERS):
            fail("--width_multiplier", self.width_multiplier, width_multiplier)
        if sk_ratio is not None and (sk_ratio > 0) != (self.sk_ratio > 0):
            fail("--sk_ratio", self.sk_ratio, sk_ratio)
        if se_ratio is not None and (se_ratio > 0) != (self.se_ratio > 0):
            fail("--se_ratio", self.se_ratio, se_ratio)
        if image_size is not None and (image_size <= 32) != self.cifar_stem:
            stem = "the CIFAR stem (image_size <= 32)" if self.cifar_stem else "the ImageNet stem (image_size > 32)"
            fail("--image_size", stem, image_size)
        if self.proj_head_mode is not None:
            if proj_head_mode is not None and proj_head_mode != self.proj_head_mode:
                fail("--proj_head_mode", self.proj_head_mode, proj_head_mode)
            if (num_proj_layers is not None and self.proj_head_mode == "nonlinear"
                    and num_proj_layers != self.num_proj_layers):
                fail("--num_proj_layers", self.num_proj_layers, num_proj_layers)
            if proj_out_dim is not None and proj_out_dim != self.proj_out_dim:
                fail("--proj_out_dim", self.proj_out_dim, proj_out_dim)
        if num_classes is not None and self.num_classes and num_classes != self.num_classes:
            fail("--num_classes", self.num_classes, num_classes)


def _scope_shapes(shapes: dict[str, list[int]], prefix: str, base: str) -> list[dict[str, list[int]]]:
    """Per numbered layer (`conv2d`, `conv2d_1`, ...) under prefix: {variable suffix: shape}, in index order."""
    layers: dict[int, dict[str, list[int]]] = {}
    for name, shape in shapes.items():
        if not name.startswith(prefix) or _is_skipped(name):
            continue
        match = _NUMBERED.match(name[len(prefix):])
        if match and match.group(1) == base:
            index = int(match.group(2) or 0)
            layers.setdefault(index, {})[name[len(prefix) + match.end():]] = shape
    return [layers[i] for i in sorted(layers)]


def _infer(shapes: dict[str, list[int]], source: str) -> ArchitectureSpec:
    def fail(message: str) -> UsageError:
        return UsageError(WHERE, f"{source}: not an official SimCLR checkpoint ({message})")

    convs = _scope_shapes(shapes, BACKBONE, "conv2d")
    bns = _scope_shapes(shapes, BACKBONE, "batch_normalization")
    if not convs or "kernel" not in convs[0]:
        raise fail(f"no {BACKBONE}conv2d/kernel")
    kernels = [c.get("kernel") for c in convs]
    if any(k is None or len(k) != 4 for k in kernels):
        raise fail("a backbone conv without a 4-d kernel")
    stem_k = kernels[0]
    deep_stem = stem_k[:2] == [3, 3] and len(kernels) > 1 and kernels[1][:3] == [3, 3, stem_k[3]]
    cifar_stem = stem_k[:2] == [3, 3] and not deep_stem
    num_stem = 3 if deep_stem else 1
    stem_width = kernels[num_stem - 1][3]
    shortcut_out = kernels[num_stem][3]  # group 1, block 0: the projection shortcut comes first
    bottleneck = shortcut_out == 4 * stem_width
    se_convs = sum(1 for c in convs if "bias" in c)
    sk = len(convs) - se_convs > len(bns)  # each SK unit adds one conv without BN
    per_block = (4 if sk else 3) if bottleneck else 2
    blocks, remainder = divmod(len(bns) - num_stem - 4, per_block)
    depth = next((d for d, (kind, counts) in BLOCKS_PER_DEPTH.items()
                  if (kind == "bottleneck") == bottleneck and sum(counts) == blocks), None)
    if remainder or depth is None:
        raise fail(f"{len(bns)} backbone BN layers fit no ResNet depth")
    group4_width = kernels[-1 - 2 * bool(se_convs)][3] // (4 if bottleneck else 1)
    width = group4_width / 512
    if deep_stem and not sk:
        raise fail("deep stem without selective kernels")
    sk_ratio = 0.0
    if sk:
        # The mixing conv of the last block: out = max(int(f * r), 32) with f the group-4 width.
        mid = kernels[-3 - 2 * bool(se_convs)][3]
        sk_ratio = mid / group4_width if mid > SK_MIN_DIM else DEFAULT_SK_RATIO
    se_ratio = 0.0
    if se_convs:
        reduced = kernels[-2][3]
        se_ratio = max(reduced, 1) / group4_width

    head_scopes = sorted({n[len(PROJECTION):].split("/")[0] for n in shapes
                          if n.startswith(PROJECTION) and not _is_skipped(n)})
    mode, num_layers, out_dim = None, 0, 128
    if head_scopes == ["l_0"]:
        mode, num_layers = "linear", 1
    elif head_scopes:
        mode, num_layers = "nonlinear", len(head_scopes)
        if set(head_scopes) != {f"nl_{j}" for j in range(num_layers)}:
            raise fail(f"unexpected projection head scopes {head_scopes}")
    if mode:
        last = f"{PROJECTION}{head_scopes[-1] if mode == 'linear' else f'nl_{num_layers - 1}'}/dense/kernel"
        if last not in shapes:
            raise fail(f"no {last}")
        out_dim = shapes[last][1]
    sup = shapes.get(f"{SUPERVISED}linear_layer/dense/kernel")
    return ArchitectureSpec(
        resnet_depth=depth, width_multiplier=width, sk_ratio=sk_ratio, se_ratio=se_ratio, cifar_stem=cifar_stem,
        proj_head_mode=mode, num_proj_layers=num_layers if mode else 0, proj_out_dim=out_dim,
        num_classes=sup[1] if sup else 0, supervised_input_dim=sup[0] if sup else 0,
        has_ema=any(n.startswith(EMA + BACKBONE) for n in shapes))


def inspect_checkpoint(path: str | os.PathLike) -> ArchitectureSpec:
    """Infer the architecture of an official checkpoint from its variable names and shapes."""
    prefix = resolve_checkpoint(os.fspath(path))
    return _infer(_read_shapes(prefix), prefix)


@dataclasses.dataclass(frozen=True)
class LoadReport:
    """What `load_official_checkpoint` did: checkpoint names read, model variables left at their init."""

    prefix: str
    loaded: tuple[str, ...]
    kept_initial: tuple[str, ...]


def load_official_checkpoint(model: SimCLRModel, path: str | os.PathLike, *, use_ema: bool = False,
                             skip_supervised_head: bool = False,
                             allow_missing_projection_head: bool = False) -> LoadReport:
    """Assign an official TF1 checkpoint to `model`, refusing any missing, extra or mis-shaped variable.

    `skip_supervised_head` ignores the checkpoint's linear head and keeps the model's own (fine-tuning to a
    different class count). `allow_missing_projection_head` accepts checkpoints without `head_contrastive/`
    (released SimCLRv1) and keeps the model's projection head as initialised.
    """
    prefix = resolve_checkpoint(os.fspath(path))
    shapes = _read_shapes(prefix)
    expected = official_variable_map(model)
    has_head = any(n.startswith(PROJECTION) for n in shapes)

    def source_name(name: str) -> str:
        return EMA + name if use_ema and name.startswith((BACKBONE, PROJECTION)) else name

    if use_ema and not any(n.startswith(EMA) for n in shapes):
        raise UsageError("--use_ema", f"{prefix} has no {EMA} copies of the weights")

    def describe() -> str:
        try:
            return f"; the checkpoint is {_infer(shapes, prefix).describe()}"
        except UsageError:
            return ""

    def fail(message: str) -> UsageError:
        return UsageError(WHERE, f"{prefix}: {message}{describe()}")

    to_load: list[tuple[str, Any]] = []
    kept: list[str] = []
    for name, variable in expected.items():
        if (skip_supervised_head and name.startswith(SUPERVISED)) or (
                allow_missing_projection_head and not has_head and name.startswith(PROJECTION)):
            kept.append(name)
            continue
        source = source_name(name)
        want = list(variable.shape)
        if source not in shapes:
            raise fail(f"missing variable {source} (the model expects shape {want})")
        if shapes[source] != want:
            raise fail(f"variable {source} has shape {shapes[source]}, the model expects {want}")
        to_load.append((source, variable))

    used = {source for source, _ in to_load}
    for name in sorted(shapes):
        if name in used or _is_skipped(name):
            continue
        if skip_supervised_head and name.startswith(SUPERVISED):
            continue
        if name.startswith(EMA):
            if not use_ema:
                continue  # EMA copies (or decoys) are only read with use_ema
        elif use_ema and EMA + name in used:
            continue  # the plain copy of a variable read from its EMA copy
        raise fail(f"unexpected variable {name} {shapes[name]} (no such variable in the model)")

    reader = tf.train.load_checkpoint(prefix)
    for source, variable in to_load:
        variable.assign(np.asarray(reader.get_tensor(source), dtype=variable.dtype))
    return LoadReport(prefix=prefix, loaded=tuple(source for source, _ in to_load), kept_initial=tuple(kept))
