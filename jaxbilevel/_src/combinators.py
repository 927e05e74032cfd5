"""optax combinators adapted to bilevel methods.

A bilevel method computes the updates of both levels itself (``tx.update(None,
state, params, batch=batch)``), so the optax wrappers that act on the incoming
updates cannot work unchanged: ``optax.apply_if_finite`` checks them before the
method runs, and ``optax.MultiSteps`` accumulates them. :func:`apply_if_finite`
checks the update a method returns instead; gradient accumulation is
:func:`jaxbilevel.objectives.accumulate`. :func:`inject_hyperparams` is
``optax.inject_hyperparams`` with the static arguments of a method chosen for
the user.
"""

from __future__ import annotations

import inspect
import numbers
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxbilevel._src import base


def apply_if_finite(inner: optax.GradientTransformation,
                    max_consecutive_errors: int
                    ) -> optax.GradientTransformationExtraArgs:
  """Skips a bilevel step whose updates are not finite.

  Runs ``inner.update`` and checks the updates it *returns* (both levels).
  When one of them is NaN or infinite the step is rejected: the updates are
  zero and the state of ``inner`` is the one before the step (its optimizer
  states, trackers and step count are unchanged). After more than
  ``max_consecutive_errors`` consecutive rejected steps the update is
  accepted, as in ``optax.apply_if_finite``, whose state
  (``optax.ApplyIfFiniteState``: ``notfinite_count``, ``last_finite``,
  ``total_notfinite``, ``inner_state``) this returns.

  ``optax.apply_if_finite`` itself checks the *incoming* updates, which are
  None for a bilevel method, so it is refused with a message pointing here.
  A rejected step costs as much as an accepted one: the update is computed
  before it can be checked. A stochastic method (``alright``, ``ufo_blo``)
  draws the same random numbers again after a rejected step, since its key
  lives in the state.

  Args:
    inner: a bilevel method, e.g. ``jbl.alt_pbgd(...)``.
    max_consecutive_errors: how many consecutive non-finite steps are skipped
      before one is accepted (a Python int >= 0).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` over :class:`BilevelParams`.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import jaxbilevel as jbl
    >>> f = lambda x, y, batch: x ** 2 + 10.0 * y * batch
    >>> g = lambda x, y, batch: (y - x + 1.0) ** 2
    >>> tx = jbl.apply_if_finite(
    ...     jbl.pbgd_free(f, g, gamma=15.0, upper_optimizer=optax.sgd(0.1),
    ...                   lower_optimizer=optax.sgd(0.25)), 3)
    >>> params = jbl.BilevelParams(x=jnp.array(2.0), y=jnp.array(3.0))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(None, state, params, batch=jnp.nan)
    >>> float(updates.x), int(state.total_notfinite)
    (0.0, 1)
  """
  max_consecutive_errors = base.check_static_int(
      max_consecutive_errors, "max_consecutive_errors", minimum=0)
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return optax.ApplyIfFiniteState(
        notfinite_count=jnp.zeros([], jnp.int32),
        last_finite=jnp.array(True, jnp.bool_),
        total_notfinite=jnp.zeros([], jnp.int32),
        inner_state=inner.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    new_updates, new_inner_state = inner.update(
        updates, state.inner_state, params, **extra_args)
    leaves = jax.tree.leaves(new_updates)
    isfinite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(u)) for u in leaves]))
    notfinite_count = jnp.where(
        isfinite, jnp.zeros([], jnp.int32),
        optax.safe_increment(state.notfinite_count))
    accept = jnp.logical_or(isfinite,
                            notfinite_count > max_consecutive_errors)
    # The update is computed in any case (its finiteness is the test), so a
    # select costs less than a lax.cond that would trace the method twice.
    new_updates = jax.tree.map(
        lambda u: jnp.where(accept, u, jnp.zeros_like(u)), new_updates)
    inner_state = jax.tree.map(
        lambda new, old: jnp.where(accept, new, old), new_inner_state,
        state.inner_state)
    return new_updates, optax.ApplyIfFiniteState(
        notfinite_count=notfinite_count,
        last_finite=isfinite,
        total_notfinite=jnp.where(
            isfinite, state.total_notfinite,
            optax.safe_increment(state.total_notfinite)),
        inner_state=inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _injectable(value: Any) -> bool:
  """Whether ``value`` is a float hyperparameter (a scalar float or array)."""
  if isinstance(value, (bool, np.bool_)):
    return False
  if isinstance(value, numbers.Real) and not isinstance(value,
                                                         numbers.Integral):
    return True
  if isinstance(value, (np.ndarray, np.generic, jax.Array)):
    return bool(jnp.issubdtype(jnp.result_type(value), jnp.floating)
                and jnp.ndim(value) == 0)
  return False


def inject_hyperparams(method: Callable[..., optax.GradientTransformation],
                       *, hyperparam_dtype=None) -> Callable[
                           ..., optax.GradientTransformationExtraArgs]:
  """``optax.inject_hyperparams`` for a bilevel method, static args chosen.

  ``optax.inject_hyperparams(method, static_args=...)`` turns every numeric
  argument into state (``state.hyperparams``) and calls every callable one as
  a schedule of the step count, so for a bilevel method ``f``, ``g``,
  projections, ``init`` and integer loop lengths (``inner_steps``, ...) must
  be listed in ``static_args``. This wrapper lists them for you, from the
  values of each call: an argument is injected exactly when its value is a
  scalar float (a Python float or a 0-d floating array): ``gamma``,
  ``gamma_increment``, ``eta``, ``probability``, ``tol``,
  ``dual_step_size``, ...
  Everything else (objectives, optimizers, ints, strings, booleans, keys,
  schedules, None) is static. A float hyperparameter changed in
  ``state.hyperparams`` then takes effect at the next step without
  recompiling. A schedule passed for a hyperparameter stays a schedule of the
  method's outer step.

  Args:
    method: a bilevel method, e.g. ``jbl.alt_pbgd``.
    hyperparam_dtype: the dtype of the injected values (default: that of the
      params), as in ``optax.inject_hyperparams``.

  Returns:
    A function with the signature of ``method`` that returns an
    ``optax.GradientTransformationExtraArgs`` whose state is an
    ``optax.InjectStatefulHyperparamsState``.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import jaxbilevel as jbl
    >>> f = lambda x, y, batch: x ** 2 + 10.0 * y
    >>> g = lambda x, y, batch: (y - x + 1.0) ** 2
    >>> tx = jbl.inject_hyperparams(jbl.alt_pbgd)(
    ...     f, g, gamma=15.0, upper_optimizer=optax.sgd(0.1),
    ...     lower_optimizer=optax.sgd(0.25), inner_steps=30)
    >>> params = jbl.BilevelParams(x=jnp.array(2.0), y=jnp.array(3.0))
    >>> state = tx.init(params)
    >>> sorted(state.hyperparams)
    ['gamma']
    >>> state.hyperparams["gamma"] = jnp.asarray(30.0)  # takes effect next step
  """
  if not callable(method):
    raise base.BilevelValidationError(
        f"method must be a bilevel method such as jaxbilevel.alt_pbgd, got "
        f"{method!r}.")
  signature = inspect.signature(method)

  def wrapped(*args, **kwargs):
    try:
      bound = signature.bind(*args, **kwargs)
    except TypeError as err:
      raise base.BilevelValidationError(
          f"{getattr(method, '__name__', 'method')}: {err}") from None
    bound.apply_defaults()
    static = tuple(name for name, value in bound.arguments.items()
                   if not _injectable(value))
    return optax.inject_hyperparams(
        method, static_args=static, hyperparam_dtype=hyperparam_dtype)(
            *args, **kwargs)

  wrapped.__name__ = getattr(method, "__name__", "method")
  wrapped.__wrapped__ = method
  return wrapped
