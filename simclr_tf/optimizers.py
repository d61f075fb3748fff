"""LARS (Keras 3), the optimizer factory, and the weight-decay term added to the loss.

docs/design.md §6. Weight decay lives in two places, as in the reference:
* LARS applies it inside the update (g <- g + wd * w) for every variable not excluded; the excluded ones
  (BN parameters, biases, the supervised head) get neither decay nor the trust ratio. The supervised head's
  kernel is then decayed through the loss instead: `weight_decay_loss` returns wd * sum(l2_loss(kernel)).
* Nesterov momentum and Adam have no decay inside; `weight_decay_loss` returns wd * sum(l2_loss(v)) over the
  trainable variables that are not exempt. l2_loss(v) = sum(v**2) / 2 (tf.nn.l2_loss), as in the reference.

Variables are always identified by object, never by name.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import keras
from keras import ops

from simclr_tf.errors import UsageError
from simclr_tf.models import weight_decay_exempt_variables
from simclr_tf.sections import OptimConfig

OPTIMIZERS = ("lars", "momentum", "adam")


@keras.saving.register_keras_serializable(package="simclr_tf")
class LARS(keras.optimizers.Optimizer):
    """Layer-wise adaptive rate scaling with classic (non-Nesterov) momentum, as in the SimCLR reference.

    For each variable w with gradient g, unless w is excluded:
        g <- g + weight_decay * w
        trust = eeta * ||w|| / ||g||  if ||w|| > 0 and ||g|| > 0, else 1
        v <- momentum * v + lr * trust * g
        w <- w - v
    Excluded variables take plain momentum: v <- momentum * v + lr * g; w <- w - v.

    Construct and build it inside the strategy scope that owns the variables (Keras captures the strategy
    at construction). `exclude` takes variable objects (keras or tf Variables, e.g. from
    `model.trainable_variables`); it is not part of `get_config`, so pass it again when re-creating the
    optimizer. Exclusions are resolved when the update step is traced, so set them before the first step.
    """

    def __init__(
        self,
        learning_rate: float | keras.optimizers.schedules.LearningRateSchedule = 0.001,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eeta: float = 0.001,
        exclude: Iterable[Any] | None = None,
        name: str = "LARS",
        **kwargs: Any,
    ) -> None:
        # Keras's own `weight_decay` is decoupled (w -= lr * wd * w after the step); LARS folds the decay
        # into the gradient before the trust ratio, so the base class must not see it.
        super().__init__(learning_rate=learning_rate, weight_decay=None, name=name, **kwargs)
        if not 0.0 <= momentum < 1.0:
            raise UsageError("--momentum", f"must be in [0, 1), got {momentum}")
        if weight_decay < 0:
            raise UsageError("--weight_decay", f"must be >= 0, got {weight_decay}")
        if eeta <= 0:
            raise UsageError("LARS", f"eeta must be > 0, got {eeta}")
        self.momentum = float(momentum)
        self.lars_weight_decay = float(weight_decay)
        self.eeta = float(eeta)
        # A frozenset: Keras would wrap a mutable set into a tracked container of the optimizer's state.
        self._excluded_keys: frozenset[Any] = frozenset()
        if exclude is not None:
            self.exclude_variables(exclude)

    def exclude_variables(self, variables: Iterable[Any]) -> None:
        """Adds variables (by object) that get neither weight decay nor the trust ratio."""
        self._excluded_keys = self._excluded_keys | {self._var_key(v) for v in variables}

    def exclude_from_weight_decay(self, var_list: Iterable[Any] | None = None,
                                  var_names: Sequence[str] | None = None) -> None:
        """Keras's hook, routed to `exclude_variables`; name patterns are refused (selection is by object)."""
        if var_names:
            raise UsageError("LARS", "exclude variables by object, not by name patterns")
        self.exclude_variables(var_list or ())

    def is_excluded(self, variable: Any) -> bool:
        return self._var_key(variable) in self._excluded_keys

    def build(self, variables: Sequence[Any]) -> None:
        if self.built:
            return
        super().build(variables)
        self.momentums = [self.add_variable_from_reference(v, name="momentum") for v in variables]

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        # keras.ops only, so LARS runs on every Keras backend (fit() under JAX too).
        dtype = variable.dtype
        lr = ops.cast(learning_rate, dtype)
        grad = ops.cast(gradient, dtype)
        velocity = self.momentums[self._get_variable_index(variable)]
        if self.is_excluded(variable):
            scaled_grad = lr * grad
        else:
            w = ops.convert_to_tensor(variable)
            grad = grad + ops.cast(self.lars_weight_decay, dtype) * w
            w_norm = ops.sqrt(ops.sum(ops.square(w)))
            g_norm = ops.sqrt(ops.sum(ops.square(grad)))
            usable = ops.logical_and(w_norm > 0, g_norm > 0)
            # The divisor is 1 where g_norm is 0, so the branch `where` drops is finite too.
            ratio = ops.cast(self.eeta, dtype) * w_norm / ops.where(g_norm > 0, g_norm, ops.ones_like(g_norm))
            trust = ops.where(usable, ratio, ops.ones_like(w_norm))
            scaled_grad = (lr * trust) * grad
        new_velocity = ops.cast(self.momentum, dtype) * ops.convert_to_tensor(velocity) + scaled_grad
        self.assign(velocity, new_velocity)
        self.assign_sub(variable, new_velocity)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            {"momentum": self.momentum, "weight_decay": self.lars_weight_decay, "eeta": self.eeta}
        )
        return config


def build_optimizer(
    name: str,
    learning_rate: float | keras.optimizers.schedules.LearningRateSchedule,
    *,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    exclude_from_weight_decay: Iterable[Any] = (),
) -> keras.optimizers.Optimizer:
    """The reference's three optimizers. Call inside the strategy scope.

    lars: `LARS` with decay inside and `exclude_from_weight_decay` excluded from decay and trust ratio.
    momentum: Keras SGD with Nesterov momentum; adam: Keras Adam with default betas/epsilon. For these two
    `weight_decay` and the exclusions are ignored here -- add `weight_decay_loss(...)` to the loss.
    """
    if name == "lars":
        return LARS(learning_rate, momentum=momentum, weight_decay=weight_decay,
                    exclude=list(exclude_from_weight_decay))
    if name == "momentum":
        return keras.optimizers.SGD(learning_rate, momentum=float(momentum), nesterov=True)
    if name == "adam":
        return keras.optimizers.Adam(learning_rate)
    raise UsageError("--optimizer", f"must be one of {', '.join(OPTIMIZERS)}, got {name!r}")


def optimizer_for(model: Any, optim: OptimConfig,
                  learning_rate: float | keras.optimizers.schedules.LearningRateSchedule, *,
                  loss_scaling: bool = False) -> keras.optimizers.Optimizer:
    """The optimizer of a run over `model`, its slots created. Call inside the strategy scope.

    Args:
        model: the SimCLRModel; LARS leaves its BN parameters, biases and supervised head out of decay and
            trust ratio (chosen by object, see models.weight_decay_exempt_variables).
        optim: which optimizer, its momentum and weight decay.
        learning_rate: a float or a schedule of the optimizer's iterations.
        loss_scaling: wrap in a LossScaleOptimizer (float16 compute).
    """
    optimizer = build_optimizer(optim.optimizer, learning_rate=learning_rate, momentum=optim.momentum,
                                weight_decay=optim.weight_decay,
                                exclude_from_weight_decay=weight_decay_exempt_variables(model))
    if loss_scaling:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    # Slots exist now, so a restore fills them instead of deferring.
    optimizer.build(model.trainable_variables)
    return optimizer


def current_learning_rate(optimizer: keras.optimizers.Optimizer) -> float:
    """The learning rate `optimizer` applies to its next update (Keras evaluates its schedule or callable)."""
    return float(optimizer.learning_rate)


def l2_regularization(
    variables: Iterable[Any], weight_decay: float, exclude: Iterable[Any] = ()
) -> Any:
    """weight_decay * sum(l2_loss(v)) over `variables` not in `exclude` (by object), float32 scalar;
    l2_loss(v) = sum(v**2) / 2 (tf.nn.l2_loss's definition, on any backend)."""
    excluded = {id(v) for v in exclude}
    terms = [ops.sum(ops.square(ops.cast(v, "float32"))) / 2.0 for v in variables if id(v) not in excluded]
    if not terms:
        return ops.convert_to_tensor(0.0, "float32")
    return ops.cast(weight_decay, "float32") * ops.sum(ops.stack(terms))


def weight_decay_loss(
    optimizer_name: str,
    weight_decay: float,
    *,
    trainable_variables: Sequence[Any],
    supervised_head_kernels: Sequence[Any],
    exempt: Iterable[Any] = (),
) -> Any:
    """The weight-decay term the reference adds to the loss (scalar float32; 0 when nothing applies).

    lars: wd * sum(l2_loss) over `supervised_head_kernels` only -- LARS excludes the head from its own decay,
        and the reference decays the head's kernel but not its bias ('bias' not in v.name). Pass only the
        kernels that are trainable (a frozen head gets no decay).
    momentum / adam: wd * sum(l2_loss) over `trainable_variables` except `exempt`. The reference exempts only
        BN parameters (biases and the supervised head ARE decayed), so pass the BN variables as `exempt` to
        match it.
    Variables are matched by object: pass the same objects as `model.trainable_variables`.
    """
    if optimizer_name == "lars":
        return l2_regularization(supervised_head_kernels, weight_decay)
    if optimizer_name in ("momentum", "adam"):
        return l2_regularization(trainable_variables, weight_decay, exclude=exempt)
    raise UsageError("--optimizer", f"must be one of {', '.join(OPTIMIZERS)}, got {optimizer_name!r}")
