r"""Flatness diagnostics: is PBGD-Free's dropped correction expected to be small?

PBGD-Free drops the value-function correction
:math:`b_\gamma=\gamma[\nabla_xg(x,y_\gamma^*)-\nabla_xg(x,y_g^*)]`, whose
size does not shrink with :math:`\gamma` when ``f`` is merely Lipschitz in
``y`` (bias G5 of :doc:`/methods`). It is small when ``f`` is *flat* near
:math:`y_g^*` (Jiang et al., NeurIPS 2025, arXiv:2507.20400):
:math:`|f(x,y_g^*)-f(x,y)|\le c\|y_g^*-y\|^\alpha+\delta` with
:math:`\alpha>1` and a small residual :math:`\delta`.

:func:`flatness_report` evaluates the residual estimate

.. math::

  \hat\delta(x_t)=\max\big\{|f(x_t,y_{g,t})-f(x_t,y_{\gamma,t})|
    -c\|y_{g,t}-y_{\gamma,t}\|^\alpha,\ 0\big\},

along a trajectory that tracks both :math:`y_g` and :math:`y_\gamma` (an
ALT-PBGD run), on a grid of :math:`(c,\alpha)`, next to the Lipschitz proxy
:math:`\|\nabla_yf(x_t,y_{g,t})\|`, and states a verdict. From a run::

  params, state, history = jaxbilevel.run(
      jaxbilevel.alt_pbgd(f, g, gamma=16.0, ...), params0, num_steps=5000,
      record=flatness.record_trackers)
  report = flatness.flatness_report(
      f, *flatness.trajectory_from_history(history, every=100,
                                           x0=params0.x), g=g, gamma=16.0)
  print(report.summary())
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxbilevel._src import base
from jaxbilevel._src import objectives
from jaxbilevel._src import tree as tree_lib

DEFAULT_C = (0.1, 0.5, 1.0, 2.0)
DEFAULT_ALPHA = (1.1, 1.2, 1.3, 1.5)


class FlatnessReport(NamedTuple):
  """The flatness estimate along a trajectory (NumPy arrays).

  Attributes:
    c: the moduli of the grid, shape ``(n_c,)``.
    alpha: the exponents of the grid, shape ``(n_alpha,)``.
    delta: :math:`\\hat\\delta(x_t)` for every sample and grid point, shape
      ``(T, n_c, n_alpha)``.
    delta_max: :math:`\\max_t\\hat\\delta`, shape ``(n_c, n_alpha)``.
    delta_mean: :math:`\\mathrm{mean}_t\\hat\\delta` (the trajectory average
      of Theorem 3), shape ``(n_c, n_alpha)``.
    lipschitz_proxy: :math:`\\|\\nabla_yf(x_t,y_{g,t})\\|`, shape ``(T,)``.
    value_gap: :math:`f(x_t,y_{g,t})-f(x_t,y_{\\gamma,t})`, shape ``(T,)``;
      normally :math:`\\ge0`, since :math:`y_\\gamma` trades lower-level
      value for upper-level value.
    distance: :math:`\\|y_{g,t}-y_{\\gamma,t}\\|`, shape ``(T,)``.
    bias_norm: with ``g`` and ``gamma``: the correction PBGD-Free drops,
      :math:`\\|b_\\gamma\\|=\\gamma\\|\\nabla_xg(x_t,y_{\\gamma,t})-\\nabla_x
      g(x_t,y_{g,t})\\|`, shape ``(T,)``; otherwise None.
    direction_norm: with ``g`` and ``gamma``: PBGD-Free's direction
      :math:`\\|\\nabla_xf(x_t,y_{\\gamma,t})\\|`, shape ``(T,)``; otherwise
      None.
    flat: the verdict (see :func:`flatness_report`).
    best: ``(c, alpha, mean delta)`` of the grid point with :math:`\\alpha>1`
      and the smallest mean residual.
    rtol: the relative tolerance of the verdict.
  """

  c: np.ndarray
  alpha: np.ndarray
  delta: np.ndarray
  delta_max: np.ndarray
  delta_mean: np.ndarray
  lipschitz_proxy: np.ndarray
  value_gap: np.ndarray
  distance: np.ndarray
  bias_norm: Optional[np.ndarray]
  direction_norm: Optional[np.ndarray]
  flat: bool
  best: tuple
  rtol: float

  def at(self, c: float, alpha: float) -> tuple:
    """``(max_t delta, mean_t delta)`` at the grid point ``(c, alpha)``."""
    i = np.flatnonzero(np.isclose(self.c, c))
    j = np.flatnonzero(np.isclose(self.alpha, alpha))
    if not len(i) or not len(j):
      raise KeyError(f"({c}, {alpha}) is not on the grid c={self.c.tolist()}, "
                     f"alpha={self.alpha.tolist()}.")
    return float(self.delta_max[i[0], j[0]]), float(self.delta_mean[i[0],
                                                                     j[0]])

  def summary(self) -> str:
    """A plain-language account of the estimate and the verdict."""
    c, alpha, mean = self.best
    worst, _ = self.at(c, alpha)
    proxy_max = float(np.max(self.lipschitz_proxy))
    proxy_mean = float(np.mean(self.lipschitz_proxy))
    lines = [
        f"flatness along {len(self.distance)} samples: best grid point "
        f"(c, alpha) = ({c:g}, {alpha:g}) with mean delta = {mean:.3g} and "
        f"max delta = {worst:.3g}; Lipschitz proxy |grad_y f| mean "
        f"{proxy_mean:.3g}, max {proxy_max:.3g}; final |y_g - y_gamma| = "
        f"{float(self.distance[-1]):.4g}.",
    ]
    if self.bias_norm is not None:
      lines.append(
          f"measured dropped correction |b_gamma|: mean "
          f"{float(np.mean(self.bias_norm)):.3g}, max "
          f"{float(np.max(self.bias_norm)):.3g}, last "
          f"{float(self.bias_norm[-1]):.3g} (PBGD-Free direction "
          f"|grad_x f(x, y_gamma)|: last "
          f"{float(self.direction_norm[-1]):.3g}).")
    if self.flat:
      lines.append(
          f"FLAT: the residual is below {self.rtol:g} x the Lipschitz proxy, "
          "so PBGD-Free's dropped correction (its bias) is expected to be "
          "small here.")
    else:
      lines.append(
          f"NOT FLAT: no grid point with alpha > 1 brings the mean residual "
          f"below {self.rtol:g} x the Lipschitz proxy; f behaves as merely "
          "Lipschitz in y, so PBGD-Free's bias is NOT expected to be small "
          "(and does not shrink with gamma). Use a method that keeps the "
          "value-function correction (alt_pbgd, v_pbgd, pbgd_blocc).")
    negative = int(np.sum(self.value_gap < 0))
    if negative:
      lines.append(
          f"warning: f(x, y_g) < f(x, y_gamma) at {negative} sample(s); "
          "y_gamma is expected to lower f, so the trackers may be inaccurate.")
    return "\n".join(lines)


def _grid(values, name):
  arr = np.asarray(values, dtype=float).ravel()
  if arr.size == 0 or not np.all(np.isfinite(arr)) or np.any(arr < 0):
    raise base.BilevelValidationError(
        f"flatness_report: {name} must be a non-empty sequence of finite "
        f"numbers >= 0, got {values!r}.")
  return arr


def _leading_length(tree, name):
  leaves = jax.tree.leaves(tree)
  if not leaves:
    raise base.BilevelValidationError(
        f"flatness_report: {name} has no array leaves.")
  lengths = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None for leaf in leaves}
  if None in lengths or len(lengths) != 1:
    raise base.BilevelValidationError(
        f"flatness_report: every leaf of {name} must have the same leading "
        f"(trajectory) axis; got leading sizes {sorted(map(str, lengths))}.")
  return lengths.pop()


def flatness_report(f: base.Objective, xs, y_gs, y_gammas, *,
                    g: Optional[base.Objective] = None,
                    gamma: Optional[float] = None,
                    c: Sequence[float] = DEFAULT_C,
                    alpha: Sequence[float] = DEFAULT_ALPHA,
                    batch: Any = None,
                    rtol: float = 1e-2,
                    batch_size: Optional[int] = None) -> FlatnessReport:
  r"""Estimates the flatness residual :math:`\hat\delta` along a trajectory.

  ``xs``, ``y_gs`` and ``y_gammas`` are pytrees whose leaves have a leading
  trajectory axis of the same length ``T`` (e.g. from
  :func:`trajectory_from_history`). :math:`\hat\delta` is
  :func:`jaxbilevel.objectives.flatness_residual`, ``vmap``-ed over the
  :math:`(c,\alpha)` grid (``f`` is evaluated once per sample: it does not
  depend on the grid) and over the trajectory.

  **Verdict.** The problem is declared flat when some grid point with
  :math:`\alpha>1` has a trajectory-averaged residual (the quantity of
  Theorem 3) below ``rtol`` times the mean Lipschitz proxy
  :math:`\|\nabla_yf(x_t,y_{g,t})\|`: the residual is then negligible
  against the first-order variation of ``f`` that makes PBGD-Free biased
  when flatness fails. This threshold is a heuristic of this library, not a
  constant of the paper.

  Args:
    f: upper objective ``f(x, y, batch) -> scalar``.
    xs: upper iterates :math:`x_t` (leading axis ``T``).
    y_gs: lower-solution estimates :math:`y_{g,t}` at :math:`x_t`.
    y_gammas: penalized-solution estimates :math:`y_{\gamma,t}` at
      :math:`x_t`.
    g: optional lower objective; with ``gamma`` the report also measures the
      correction PBGD-Free drops, :math:`\|b_\gamma\|`, next to PBGD-Free's
      direction :math:`\|\nabla_xf\|`.
    gamma: the penalty constant of the trajectory (needed with ``g``).
    c: moduli of the grid (default ``(0.1, 0.5, 1, 2)``).
    alpha: exponents of the grid (default ``(1.1, 1.2, 1.3, 1.5)``).
    batch: passed to ``f`` (the same batch for every sample, e.g. a held-out
      batch).
    rtol: relative tolerance of the verdict.
    batch_size: evaluate the trajectory in chunks of this many samples with
      ``lax.map`` (for large models); default: all samples at once.

  Returns:
    A :class:`FlatnessReport`; ``report.summary()`` states the verdict.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxbilevel import flatness
    >>> f = lambda x, y, batch: x ** 2 + 10.0 * y   # Lipschitz, not flat
    >>> xs = jnp.array([0.0, 1.0])
    >>> report = flatness.flatness_report(f, xs, xs - 1.0, xs - 1.0 - 1 / 3)
    >>> report.flat
    False
    >>> round(report.at(0.5, 1.5)[0], 4)   # 10/3 - 0.5 * (1/3)^1.5
    3.2371
  """
  f = base.scalar_objective(f, "f")
  if (g is None) != (gamma is None):
    raise base.BilevelValidationError(
        "flatness_report: pass both g and gamma (to measure the dropped "
        "correction b_gamma) or neither.")
  if g is not None:
    g = base.scalar_objective(g, "g")
    if callable(gamma):
      raise base.BilevelValidationError(
          "flatness_report: gamma must be the trajectory's (constant) penalty "
          "value, not a schedule.")
    gamma = base.check_hyperparameter(gamma, "gamma")
  c_grid, alpha_grid = _grid(c, "c"), _grid(alpha, "alpha")
  length = _leading_length(xs, "xs")
  for name, tree in (("y_gs", y_gs), ("y_gammas", y_gammas)):
    if _leading_length(tree, name) != length:
      raise base.BilevelValidationError(
          f"flatness_report: xs has {length} samples but {name} has "
          f"{_leading_length(tree, name)}.")
  base.check_same_structure(jax.tree.map(lambda v: v[0], y_gs),
                            jax.tree.map(lambda v: v[0], y_gammas), "y_gs",
                            "y_gammas", "flatness_report")
  if batch_size is not None:
    batch_size = base.check_static_int(batch_size, "batch_size")
  dtype = tree_lib.tree_dtype((xs, y_gs, y_gammas))
  cc, aa = (jnp.asarray(v, dtype) for v in np.meshgrid(c_grid, alpha_grid,
                                                       indexing="ij"))

  def per_sample(sample):
    x, y_g, y_gam = sample
    residual = lambda ci, ai: objectives.flatness_residual(
        f, x, y_g, y_gam, ci, ai, batch)
    delta = jax.vmap(jax.vmap(residual))(cc, aa)
    f_g, grad_y = jax.value_and_grad(f, argnums=1)(x, y_g, batch)
    out = (delta, tree_lib.tree_norm(grad_y), f_g - f(x, y_gam, batch),
           tree_lib.tree_norm(tree_lib.tree_sub(y_g, y_gam)))
    if g is None:
      return out
    grad_gx = jax.grad(g)
    bias = tree_lib.tree_sub(grad_gx(x, y_gam, batch), grad_gx(x, y_g, batch))
    direction = jax.grad(f)(x, y_gam, batch)
    return out + (jnp.asarray(gamma, dtype) * tree_lib.tree_norm(bias),
                  tree_lib.tree_norm(direction))

  @jax.jit
  def evaluate(samples):
    if batch_size is None:
      return jax.vmap(per_sample)(samples)
    return jax.lax.map(per_sample, samples, batch_size=batch_size)

  delta, proxy, gap, dist, *bias = (np.asarray(v) for v in evaluate(
      (xs, y_gs, y_gammas)))
  bias_norm, direction_norm = bias if bias else (None, None)
  delta_max, delta_mean = delta.max(axis=0), delta.mean(axis=0)
  superlinear = alpha_grid > 1.0
  if not np.any(superlinear):
    raise base.BilevelValidationError(
        "flatness_report: the alpha grid needs at least one exponent > 1 "
        "(alpha = 1 is plain Lipschitz continuity, which never makes "
        "PBGD-Free's bias small).")
  masked = np.where(superlinear[None, :], delta_mean, np.inf)
  i, j = np.unravel_index(np.argmin(masked), masked.shape)
  best = (float(c_grid[i]), float(alpha_grid[j]), float(masked[i, j]))
  flat = bool(best[2] <= rtol * float(np.mean(proxy)))
  return FlatnessReport(c_grid, alpha_grid, delta, delta_max, delta_mean,
                        proxy, gap, dist, bias_norm, direction_norm, flat, best,
                        float(rtol))


def record_trackers(params: base.BilevelParams, state) -> dict:
  """A ``record=`` function for :func:`jaxbilevel.run` with a two-tracker method.

  Records ``x`` (``params.x``), ``y_g`` (``state.y_g``) and ``y_gamma``
  (``params.y``), as kept by :func:`jaxbilevel.alt_pbgd` and
  :func:`jaxbilevel.pbgd_blocc`. ``run`` records *after* each step, so
  ``x`` is already the next iterate; see :func:`trajectory_from_history`.
  """
  state = getattr(state, "inner_state", state)  # gamma="auto"
  if not hasattr(state, "y_g"):
    from jaxbilevel._src import registry  # pylint: disable=g-import-not-at-top
    trackers = ", ".join(m.name for m in registry.METHODS.values()
                         if m.value_tracker)
    raise base.BilevelValidationError(
        "record_trackers needs a method whose state tracks y_g (a value "
        f"tracker: {trackers}); got a state of type {type(state).__name__}.")
  return {"x": params.x, "y_g": state.y_g, "y_gamma": params.y}


def trajectory_from_history(history: dict, *, every: int = 1, x0=None):
  """``(xs, y_gs, y_gammas)`` sampled every ``every`` steps from a run's history.

  The history must come from ``jaxbilevel.run(..., record=record_trackers)``.
  Step ``t`` of such a run computes :math:`y_{g,t}, y_{\\gamma,t}` at
  :math:`x_t` and records them after the step, next to :math:`x_{t+1}`. With
  ``x0`` (the initial ``params.x``) the upper iterates are shifted back by
  one step so that each sample is :math:`(x_t, y_{g,t}, y_{\\gamma,t})`, as
  in the authors' estimator; without it the recorded :math:`x_{t+1}` is
  used. Samples are taken at steps ``0, every, 2 every, ...``.
  """
  every = base.check_static_int(every, "every")
  record = history.get("record") if isinstance(history, dict) else None
  if not isinstance(record, dict) or not {"x", "y_g", "y_gamma"} <= set(
      record):
    raise base.BilevelValidationError(
        "trajectory_from_history needs history['record'] with keys x, y_g, "
        "y_gamma: run with record=jaxbilevel.flatness.record_trackers.")
  xs = record["x"]
  if x0 is not None:
    xs = jax.tree.map(
        lambda first, rest: np.concatenate(
            [np.asarray(first, rest.dtype)[None], rest[:-1]], axis=0), x0, xs)
  pick = lambda tree: jax.tree.map(lambda v: v[::every], tree)
  return pick(xs), pick(record["y_g"]), pick(record["y_gamma"])
