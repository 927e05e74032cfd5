r"""Choosing the method and checking the penalty constant.

:func:`choose_method` runs a short ALT-PBGD probe and reads its flatness
report; :func:`gamma_check` compares ``f`` at a method's lower iterate with
``f`` at the re-fitted lower solution and warns (:class:`PenaltyGapWarning`)
when they disagree, the sign that :math:`\gamma` is too small.
"""

from __future__ import annotations

import time
import warnings
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxbilevel._src import base
from jaxbilevel._src import evaluation
from jaxbilevel._src import flatness

GAMMA_RTOL = 0.02
"""Default relative disagreement of f at the iterate and at the lower solution."""


class PenaltyGapWarning(UserWarning):
  """The penalty constant looks too small: f at the method's y and at y*(x) disagree."""


def _inner_state(state):
  return getattr(state, "inner_state", state)


def gamma_check(f: base.Objective, g: base.Objective, *,
                lower_optimizer: Optional[optax.GradientTransformation] = None,
                num_steps: Optional[int] = None, batch: Any = None,
                y_star: Optional[Callable] = None,
                rtol: float = GAMMA_RTOL, atol: float = 1e-8) -> Callable:
  r"""Builds ``check(params, state=None) -> dict``: is :math:`\gamma` large enough?

  A penalty method's lower iterate :math:`y_\gamma` trades lower-level value
  for upper-level value: :math:`f(x,y_\gamma)\le f(x,y^*(x))` up to
  :math:`O(1/\gamma)`. ``check`` re-fits the lower solution :math:`\bar y`
  with :func:`jaxbilevel.lower_level_evaluation` and returns (jittable; use it
  as ``record=`` of :func:`jaxbilevel.run` to follow it along a run):

  * ``f_at_iterate`` :math:`f(x, y)`, ``f_at_lower_solution``
    :math:`f(x,\bar y)`, ``lower_gap`` :math:`g(x,y)-g(x,\bar y)`;
  * ``disagreement`` :math:`|f(x,y)-f(x,\bar y)|/\max(|f(x,\bar y)|,
    \text{atol})`;
  * ``gamma``: the penalty of the state (NaN without a state that has one);
  * ``too_small``: ``disagreement > rtol``.

  :func:`warn_if_gamma_small` turns the numbers into a
  :class:`PenaltyGapWarning`; ``jaxbilevel.run(..., check_gamma=check)``
  does it at the end of the run (and at every recorded row when ``check`` is
  also its ``record=``).

  Args:
    f: upper objective.
    g: lower objective.
    lower_optimizer: optimizer of the re-fit (see
      :func:`jaxbilevel.lower_level_evaluation`).
    num_steps: steps of the re-fit.
    batch: the batch of the evaluation.
    y_star: a closed-form lower solution ``y_star(x, batch)`` instead of the
      re-fit.
    rtol: the relative disagreement above which :math:`\gamma` is called too
      small (default 2%).
    atol: the floor of the denominator.

  Returns:
    ``check(params, state=None) -> dict`` of scalars.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import jaxbilevel as jbl
    >>> f = lambda x, y, batch: jnp.sum((y - 1.0) ** 2) + 0.1 * jnp.sum(x ** 2)
    >>> g = lambda x, y, batch: jnp.sum((y - x) ** 2)
    >>> check = jbl.gamma_check(f, g, y_star=lambda x, batch: x)
    >>> out = check(jbl.BilevelParams(x=jnp.ones(3), y=jnp.full(3, 1.05)))
    >>> round(float(out["f_at_lower_solution"]), 4), bool(out["too_small"])
    (0.3, True)

  References:
    H. Shen, T. Chen. *On Penalty-based Bilevel Gradient Descent Method*,
    ICML 2023, arXiv:2302.05185.
  """
  evaluate = evaluation.lower_level_evaluation(
      f, g, lower_optimizer=lower_optimizer, num_steps=num_steps,
      batch=batch, y_star=y_star)
  rtol = base.check_hyperparameter(rtol, "rtol")
  atol = base.check_hyperparameter(atol, "atol")

  def check(params, state=None):
    out = evaluate(params)
    dtype = jnp.result_type(out["f_at_lower_solution"])
    gap = jnp.abs(out["f_at_iterate"] - out["f_at_lower_solution"])
    disagreement = gap / jnp.maximum(jnp.abs(out["f_at_lower_solution"]),
                                     jnp.asarray(atol, dtype))
    gamma = jnp.full((), jnp.nan, dtype)
    if state is not None:
      inner = _inner_state(state)
      diag = getattr(inner, "diagnostics", None)
      if hasattr(state, "inner_state"):
        gamma = jnp.asarray(state.gamma, dtype)
      elif isinstance(diag, dict) and "gamma" in diag:
        gamma = jnp.asarray(diag["gamma"], dtype)
    return dict(f_at_iterate=out["f_at_iterate"],
                f_at_lower_solution=out["f_at_lower_solution"],
                lower_gap=out["lower_gap"], disagreement=disagreement,
                gamma=gamma, too_small=disagreement > rtol)

  check.rtol = rtol
  check._jaxbilevel_gamma_check = True  # pylint: disable=protected-access
  return check


def is_gamma_check(fn) -> bool:
  """Whether ``fn`` was built by :func:`gamma_check`."""
  return getattr(fn, "_jaxbilevel_gamma_check", False)


def warn_if_gamma_small(numbers: dict, *, where: str = "jaxbilevel",
                        stacklevel: int = 2) -> bool:
  """Warns with :class:`PenaltyGapWarning` when ``numbers`` (from :func:`gamma_check`) say so.

  ``numbers`` may hold one row or many (a recorded history): the first row
  flagged ``too_small`` is reported, with its index. Returns whether it
  warned.

  Examples:
    >>> import warnings
    >>> import jaxbilevel as jbl
    >>> numbers = dict(f_at_iterate=0.09, f_at_lower_solution=0.11,
    ...                lower_gap=7e-4, disagreement=0.18, gamma=10.0,
    ...                too_small=True)
    >>> with warnings.catch_warnings(record=True) as caught:
    ...   warnings.simplefilter("always")
    ...   jbl.warn_if_gamma_small(numbers)
    True
    >>> caught[0].category.__name__
    'PenaltyGapWarning'
  """
  flags = np.atleast_1d(np.asarray(numbers["too_small"]))
  if not flags.any():
    return False
  i = int(np.argmax(flags))
  row = {k: float(np.atleast_1d(np.asarray(numbers[k]))[i])
         for k in ("f_at_iterate", "f_at_lower_solution", "lower_gap",
                   "disagreement", "gamma")}
  at = f" (recorded row {i})" if flags.size > 1 else ""
  gamma = ("" if np.isnan(row["gamma"]) else
           f" at gamma = {row['gamma']:.4g}")
  warnings.warn(
      f"{where}: the penalty constant looks too small{gamma}{at}: f at the "
      f"method's y is {row['f_at_iterate']:.6g} but f at the re-fitted lower "
      f"solution is {row['f_at_lower_solution']:.6g} (relative disagreement "
      f"{row['disagreement']:.3g}; lower gap g(x, y) - g(x, y*) = "
      f"{row['lower_gap']:.3g}). The penalty's error is O(1/gamma): raise "
      "gamma (e.g. tenfold), or pass gamma='auto' to grow it by "
      "continuation, and compare runs by f_at_lower_solution.",
      PenaltyGapWarning, stacklevel=stacklevel)
  return True


def after_run(check: Optional[Callable], record: Optional[Callable],
              history: dict, params, state, *, where: str) -> None:
  """The end-of-run check of :func:`jaxbilevel.run` (``check_gamma=``)."""
  if check is None:
    return
  if not callable(check):
    raise base.BilevelValidationError(
        f"{where}: check_gamma must be a function from jaxbilevel.gamma_check"
        f"(f, g, ...), got {check!r}.")
  if record is not None and is_gamma_check(record) and "record" in history:
    if warn_if_gamma_small(history["record"], where=where, stacklevel=4):
      return
  numbers = jax.device_get(check(params, state))
  warn_if_gamma_small(numbers, where=where, stacklevel=4)


class MethodChoice(NamedTuple):
  """The result of :func:`choose_method`.

  Attributes:
    method: ``"pbgd_free"`` or ``"alt_pbgd"``.
    build: the constructor (``jaxbilevel.pbgd_free`` or
      ``jaxbilevel.alt_pbgd``).
    reason: the evidence in words.
    f_depends_on_x: whether ``f`` reads ``x`` at all (PBGD-Free needs it).
    flat: the flatness verdict of the probe (None without a probe).
    bias_ratio: mean dropped correction :math:`\\|b_\\gamma\\|` over mean
      PBGD-Free direction :math:`\\|\\nabla_x f\\|` along the probe (None
      without a probe).
    report: the :class:`jaxbilevel.flatness.FlatnessReport` (or None).
    probe_steps: outer steps of the ALT-PBGD probe (0 without one).
    seconds: wall-clock time of the probe, compilation included.
  """

  method: str
  build: Callable
  reason: str
  f_depends_on_x: bool
  flat: Optional[bool]
  bias_ratio: Optional[float]
  report: Optional[flatness.FlatnessReport]
  probe_steps: int
  seconds: float


def choose_method(f: base.Objective, g: base.Objective,
                  params: base.BilevelParams, *,
                  upper_optimizer: optax.GradientTransformation,
                  lower_optimizer: optax.GradientTransformation,
                  gamma: float = 16.0, inner_steps: int = 10,
                  probe_steps: int = 1000, samples: int = 20,
                  batch: Any = None, bias_rtol: float = 0.1,
                  rtol: float = 1e-2) -> MethodChoice:
  r"""Runs a short ALT-PBGD probe and says whether PBGD-Free applies.

  1. If ``f`` provably does not read ``x`` (``x`` enters through ``g``
     only, as a weight decay does), PBGD-Free's direction
     :math:`\nabla_x f` is zero: the choice is ALT-PBGD, without a probe.
  2. Otherwise ALT-PBGD runs ``probe_steps`` steps at ``gamma``, recording
     both lower trackers; :func:`jaxbilevel.flatness.flatness_report` on
     ``samples`` points of the trajectory gives the flatness verdict and the
     dropped correction :math:`\|b_\gamma\|` next to PBGD-Free's direction
     :math:`\|\nabla_x f(x,y_\gamma)\|`.
  3. PBGD-Free is chosen when the report is FLAT *and* the mean dropped
     correction is at most ``bias_rtol`` times the mean direction (so ``f``
     depends on ``x`` through :math:`y^*` too little to matter); ALT-PBGD
     otherwise.

  The probe is deterministic full-batch (``batch`` at every step); its cost
  (``probe_steps`` ALT-PBGD steps, compilation included) is returned.

  Args:
    f: upper objective.
    g: lower objective.
    params: starting :class:`BilevelParams`.
    upper_optimizer: optimizer of ``x`` for the probe.
    lower_optimizer: optimizer of both lower trackers for the probe.
    gamma: penalty constant of the probe.
    inner_steps: lower steps per probe step.
    probe_steps: outer steps of the probe.
    samples: trajectory points the flatness report uses.
    batch: the batch (the same at every step).
    bias_rtol: the largest mean :math:`\|b_\gamma\|/\|\nabla_xf\|` that
      still picks PBGD-Free.
    rtol: the flatness report's threshold.

  Returns:
    A :class:`MethodChoice`.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import jaxbilevel as jbl
    >>> f = lambda x, y, batch: jnp.sum((y - 1.0) ** 2)   # x only in g
    >>> g = lambda x, y, batch: jnp.sum((y - x) ** 2)
    >>> choice = jbl.choose_method(
    ...     f, g, jbl.BilevelParams(jnp.zeros(2), jnp.zeros(2)),
    ...     upper_optimizer=optax.sgd(0.1), lower_optimizer=optax.sgd(0.2))
    >>> choice.method, choice.probe_steps
    ('alt_pbgd', 0)

  References:
    L. Jiang, Q. Xiao, L. Chen, T. Chen. *Beyond Value Functions:
    Single-Loop Bilevel Optimization under Flatness Conditions*, NeurIPS
    2025, arXiv:2507.20400.
  """
  from jaxbilevel._src import alt_pbgd as alt_lib  # pylint: disable=g-import-not-at-top
  from jaxbilevel._src import pbgd_free as free_lib  # pylint: disable=g-import-not-at-top
  from jaxbilevel._src import run as run_lib  # pylint: disable=g-import-not-at-top
  params = base.check_params(params, "choose_method")
  probe_steps = base.check_static_int(probe_steps, "probe_steps")
  samples = base.check_static_int(samples, "samples")
  start = time.perf_counter()
  f_reads_x = base.depends_on(lambda x_: f(x_, params.y, batch), params.x)
  if not f_reads_x:
    return MethodChoice(
        "alt_pbgd", alt_lib.alt_pbgd,
        "f does not depend on x (x enters through g only): PBGD-Free's "
        "direction grad_x f would be zero; ALT-PBGD keeps the value-function "
        "correction, which is then the whole hypergradient.",
        False, None, None, None, 0, time.perf_counter() - start)
  tx = alt_lib.alt_pbgd(f, g, gamma=gamma, upper_optimizer=upper_optimizer,
                        lower_optimizer=lower_optimizer,
                        inner_steps=inner_steps)
  _, _, history = run_lib.run(tx, params, num_steps=probe_steps, batch=batch,
                              record=flatness.record_trackers)
  every = max(probe_steps // samples, 1)
  report = flatness.flatness_report(
      f, *flatness.trajectory_from_history(history, every=every,
                                           x0=params.x),
      g=g, gamma=gamma, batch=batch, rtol=rtol)
  bias_ratio = float(np.mean(report.bias_norm) / max(
      float(np.mean(report.direction_norm)), np.finfo(np.float64).tiny))
  seconds = time.perf_counter() - start
  if report.flat and bias_ratio <= bias_rtol:
    return MethodChoice(
        "pbgd_free", free_lib.pbgd_free,
        f"FLAT, and the correction PBGD-Free drops is {bias_ratio:.3g} of its "
        f"direction (<= {bias_rtol:g}): PBGD-Free applies.",
        True, True, bias_ratio, report, probe_steps, seconds)
  why = ("NOT FLAT" if not report.flat else
         f"FLAT, but the correction PBGD-Free drops is {bias_ratio:.3g} of "
         f"its direction (> {bias_rtol:g})")
  return MethodChoice(
      "alt_pbgd", alt_lib.alt_pbgd,
      f"{why}: f depends on x through y*(x) enough that PBGD-Free would be "
      "biased; ALT-PBGD keeps the value-function correction.",
      True, report.flat, bias_ratio, report, probe_steps, seconds)
