r"""The parts that the first-order penalty methods' steps are composed of.

ALT-PBGD, V-PBGD, BOME, F2SA, PBGD-Free and the coupled-constraint methods
repeat the same few moves in one outer iteration; each move is a part here
that owns the state fields it reads and writes, and the diagnostics it can
record:

========================  ==============================  ===================
part                      state fields                    diagnostics
========================  ==============================  ===================
:class:`ValueTracker`     ``y_g``, ``value_state``        (none)
:class:`PenalizedTracker` ``lower_state``                 ``f``, ``g``,
                                                          ``lower_grad_norm``
:class:`ValueSaddle`      ``y_g``, ``mu_g``,              (none)
                          ``value_state``
:class:`PenalizedSaddle`  ``mu_F``, ``lower_state``       ``f``, ``g``,
                                                          ``lower_grad_norm``,
                                                          ``constraint_violation``
:class:`ProjectedStep`    ``upper_state`` (level x) or    ``upper_grad_norm``
                          ``lower_state`` (level y)       (level x only)
========================  ==============================  ===================

``f``, ``g`` and ``lower_grad_norm`` are those of every method: taken at the
step's incoming :math:`(x_t, y_t)`, the last being
:math:`\|\nabla_y g(x_t,y_t)\|` (:func:`jaxbilevel._src.base.incoming_record`).

A step reads like its pseudocode::

  step = method_parts.begin(params, state, diagnostics, "alt_pbgd", NAMES)
  y_g = value_tracker.update(step, state, batch)
  y_gamma = penalized_tracker.update(step, state, gamma, batch)
  direction = ...  # from step.x, y_gamma.iterate, y_g.iterate
  x_next = upper_step.update(step, state, direction)
  return step.finish(State, x_next, y_gamma, y_g, gamma=gamma, g_gap=gap)

Every part's ``update`` returns a :class:`Part`: the new iterate, the state
fields it owns and the diagnostics it contributes (values, or thunks computed
only when recorded); :meth:`Step.finish` assembles the new state from them.
The parts do exactly the computations the methods did inline (the golden
iterates of ``tests/test_golden.py`` pin them).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import optax

from jaxbilevel._src import base
from jaxbilevel._src import constrained
from jaxbilevel._src import inner
from jaxbilevel._src import objectives


class Part(NamedTuple):
  """What one part of a step returns.

  Attributes:
    iterate: the part's new iterate (``x``, ``params.y`` or a tracker).
    fields: the state fields the part owns, by name, at their new values.
    diagnostics: the diagnostics it contributes, by name: arrays, or
      zero-argument callables evaluated only when recorded (see
      :func:`jaxbilevel._src.base.diagnostics`).
  """

  iterate: base.PyTree
  fields: dict
  diagnostics: dict


class Step(NamedTuple):
  """The start of one outer step: the checked iterate and what to record.

  Attributes:
    x: the upper variables :math:`x_t`.
    y: the lower variables ``params.y``.
    dtype: the parameters' floating dtype (of every diagnostic).
    count: the number of outer steps taken before this one.
    record: the diagnostics this step computes (``recorded_names``).
    names: every diagnostic the method records, in its order.
    method: the method's name, for messages.
  """

  x: base.PyTree
  y: base.PyTree
  dtype: Any
  count: jax.Array
  record: frozenset
  names: tuple
  method: str

  def hyperparameter(self, value, name: str, *, allow_zero: bool = False):
    """``value`` (a number, array or schedule) at this step, in ``dtype``."""
    return base.resolve_hyperparameter(value, self.count, self.dtype,
                                       allow_zero=allow_zero, name=name)

  def finish(self, state_class, x_part: Part, y_part: Part, *others: Part,
             **diagnostics):
    """``(new params, new state)`` from the parts of the step.

    Args:
      state_class: the method's state ``NamedTuple``.
      x_part: the part whose iterate is the new ``params.x``.
      y_part: the part whose iterate is the new ``params.y``.
      *others: the other parts (trackers kept in the state).
      **diagnostics: the diagnostics that no part owns (``gamma``,
        ``g_gap``, ...).

    Returns:
      ``(BilevelParams(x_part.iterate, y_part.iterate), state)``, the state
      with ``count`` incremented, the parts' fields and the diagnostics in
      the order of ``names`` (NaN where not recorded).
    """
    fields, contributed = {}, {}
    for part in (x_part, y_part) + others:
      fields.update(part.fields)
      contributed.update(part.diagnostics)
    contributed.update(diagnostics)
    if set(contributed) != set(self.names):
      raise ValueError(
          f"{self.method}: the step's parts give the diagnostics "
          f"{sorted(contributed)}, but the method records {list(self.names)}.")
    record = base.diagnostics(self.dtype, self.record,
                              **{k: contributed[k] for k in self.names})
    state = state_class(count=optax.safe_increment(self.count),
                        diagnostics=record, **fields)
    return base.BilevelParams(x_part.iterate, y_part.iterate), state


def begin(params, state, diagnostics, method: str, names: tuple) -> Step:
  """The checks every step starts with, as a :class:`Step`.

  Checks ``params`` and, when the state keeps a value tracker ``y_g``, that
  it has the structure of ``params.y`` (:func:`base.begin_step`), then the
  ``diagnostics`` argument against ``names`` (:func:`base.recorded_names`).

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> from typing import NamedTuple
    >>> from jaxbilevel._src import base, method_parts
    >>> class State(NamedTuple):
    ...   count: jax.Array
    ...   upper_state: optax.OptState
    ...   value_state: optax.OptState
    ...   y_g: jax.Array
    ...   diagnostics: dict
    >>> g = lambda x, y, batch: (y - x) ** 2
    >>> tracker = method_parts.ValueTracker(g, optax.sgd(0.5), 1, None)
    >>> upper_step = method_parts.ProjectedStep(optax.sgd(0.1), None)
    >>> params = base.BilevelParams(x=jnp.array(1.0), y=jnp.array(0.0))
    >>> state = State(jnp.zeros([], jnp.int32), optax.sgd(0.1).init(params.x),
    ...               optax.sgd(0.5).init(params.y), params.y, {})
    >>> step = method_parts.begin(params, state, True, "demo",
    ...                           ("upper_grad_norm",))
    >>> y_g = tracker.update(step, state, None)  # one step on g: y_g = x
    >>> x_next = upper_step.update(step, state, step.x)  # x - 0.1 grad x^2/2
    >>> params, state = step.finish(State, x_next, y_g)
    >>> round(float(params.x), 4), float(state.y_g), int(state.count)
    (0.9, 1.0, 1)
    >>> float(state.diagnostics["upper_grad_norm"])
    1.0
  """
  trackers = {"y_g": state.y_g} if "y_g" in state._fields else {}
  params, dtype = base.begin_step(params, method, **trackers)
  record = base.recorded_names(diagnostics, names, method)
  return Step(params.x, params.y, dtype, state.count, record, tuple(names),
              method)


class ValueTracker(NamedTuple):
  r"""The value tracker :math:`y_g\approx\arg\min_y g(x_t,y)`.

  :math:`y_g\leftarrow\mathrm{Proj}_\mathcal{Y}(y_g-\eta\nabla_y g(x_t,y_g))`,
  ``num_steps`` times (:math:`K_g`, :math:`T`, :math:`T_z`). Owns the state
  fields ``y_g`` and ``value_state``; records nothing itself (the gap
  ``g_gap`` compares it with the other lower iterate).

  Attributes:
    g: lower objective ``g(x, y, batch)``.
    optimizer: the ``value_optimizer``.
    num_steps: ``value_steps`` (static).
    proj: projection onto :math:`\mathcal Y`.
    start: ``"previous"`` (warm start from ``state.y_g`` with its optimizer
      state) or ``"y"`` (from ``params.y`` with a fresh optimizer state,
      BOME's default).
  """

  g: base.Objective
  optimizer: optax.GradientTransformation
  num_steps: int
  proj: base.Projection
  start: str = "previous"

  def update(self, step: Step, state, batch) -> Part:
    """``num_steps`` steps on ``g(x_t, .)``; the iterate is the new ``y_g``."""
    if self.start == "y":
      y_g, opt_state = step.y, self.optimizer.init(step.y)
    else:
      y_g, opt_state = state.y_g, state.value_state
    y_g, opt_state, _ = inner.inner_solve(
        lambda y_: self.g(step.x, y_, batch), y_g, opt_state,
        optimizer=self.optimizer, num_steps=self.num_steps, proj=self.proj,
        grad_norm=False)
    return Part(y_g, {"y_g": y_g, "value_state": opt_state}, {})


def _trace_of(record) -> str:
  """``inner_solve``'s trace: the first step alone when the step records it.

  Unrecorded, the whole loop stays one ``lax.scan`` (one compiled body);
  recorded, the first step is taken outside it so that the record's values
  (``f`` and ``g`` at the incoming iterate, the first step's auxiliary
  values) are computed once rather than at every inner step.
  """
  return "first" if {"f", "g"} & set(record) else "every"


class PenalizedTracker(NamedTuple):
  r"""The penalized tracker :math:`y_\gamma\approx\arg\min_y h_\gamma(x_t,y)`.

  ``num_steps`` projected steps of ``optimizer`` on the penalized lower
  objective :math:`h_\gamma` (by default
  :func:`jaxbilevel.objectives.lower_penalized`,
  :math:`\gamma^{-1}f+g`). Its iterate is ``params.y``; it owns the state
  field ``lower_state`` and records ``f`` and ``g`` at the incoming
  :math:`(x_t, y_t)` (the first step's auxiliary values when it starts
  there) and ``lower_grad_norm``, :math:`\|\nabla_y g(x_t, y_t)\|`.

  Attributes:
    f: upper objective ``f(x, y, batch)``.
    g: lower objective ``g(x, y, batch)``.
    optimizer: the ``lower_optimizer``.
    num_steps: ``inner_steps`` (static).
    proj: projection onto :math:`\mathcal Y`.
    start: ``"previous"`` (warm start from ``params.y``) or ``"y_g"`` (from
      the new value tracker; ``f`` and ``g`` are then evaluated at
      ``params.y`` for the record only).
    objective: ``(x, y, gamma, batch) -> (value, {"f": ..., "g": ...})``;
      ``None`` for :math:`\gamma^{-1}f+g`.
  """

  f: base.Objective
  g: base.Objective
  optimizer: optax.GradientTransformation
  num_steps: int
  proj: base.Projection
  start: str = "previous"
  objective: Optional[Callable] = None

  def update(self, step: Step, state, gamma, batch, y_g=None) -> Part:
    """``num_steps`` steps on :math:`h_\\gamma(x_t, .)` from ``start``."""
    objective = self.objective or objectives.lower_penalized(
        self.f, self.g, has_aux=True)
    x, y = step.x, step.y
    y_gamma, opt_state, trace = inner.inner_solve(
        lambda y_: objective(x, y_, gamma, batch),
        y if self.start == "previous" else y_g, state.lower_state,
        optimizer=self.optimizer, num_steps=self.num_steps, proj=self.proj,
        has_aux=True, grad_norm=False, trace=_trace_of(step.record))
    # The first step is at (x_t, y_t) when it starts there: its f and g are
    # the record's; from y_g, f and g at (x_t, y_t) are for the record only.
    aux = inner.first_step(trace).aux if self.start == "previous" else {}
    return Part(y_gamma, {"lower_state": opt_state},
                base.incoming_record(self.f, self.g, x, y, batch,
                                     f_value=aux.get("f"),
                                     g_value=aux.get("g")))


class ValueSaddle(NamedTuple):
  r"""The constrained value tracker :math:`(y_g,\mu_g)\approx\mathrm{MaxMin}(g+\mu^\top c)`.

  :func:`jaxbilevel.constrained.primal_dual_solve` warm-started from the
  state: primal steps on :math:`y_g` and the constraint's dual (ascent) step
  on :math:`\mu_g`. Owns the state fields ``y_g``, ``mu_g`` and
  ``value_state``; records nothing itself.

  Attributes:
    g: lower objective ``g(x, y, batch)``.
    c: the coupled constraint ``c(x, y, batch) -> (m,)``.
    settings: the solve's :class:`jaxbilevel.constrained.SaddleSettings`
      (its optimizer is the ``value_optimizer``).
    proj: projection onto :math:`\mathcal Y`.
  """

  g: base.Objective
  c: constrained.Constraint
  settings: constrained.SaddleSettings
  proj: base.Projection

  def update(self, step: Step, state, batch) -> Part:
    """The warm-started solve; the iterate is the new ``y_g``."""
    x = step.x
    y_g, mu_g, opt_state, _ = self.settings.solve(
        lambda y_: self.g(x, y_, batch), lambda y_: self.c(x, y_, batch),
        state.y_g, state.mu_g, state.value_state, step.count, step.dtype,
        self.proj, grad_norm=False)
    return Part(y_g, {"y_g": y_g, "mu_g": mu_g, "value_state": opt_state},
                {})


class PenalizedSaddle(NamedTuple):
  r"""The constrained penalized tracker :math:`(y_F,\tilde\mu_F)\approx\mathrm{MaxMin}(\gamma^{-1}f+g+\tilde\mu^\top c)`.

  :func:`jaxbilevel.constrained.primal_dual_solve` warm-started from
  ``(params.y, state.mu_F)``: primal steps on :math:`y_F` (``params.y``) and
  the constraint's dual step on the scaled multipliers
  :math:`\tilde\mu_F`. Owns the state fields ``mu_F`` and ``lower_state``;
  records ``f`` and ``g`` at the first primal step (the incoming iterate),
  ``lower_grad_norm`` (:math:`\|\nabla_y g(x_t, y_t)\|`) and
  ``constraint_violation``
  (:math:`\max_i\max(c_i(x,y_F),0)` after the last round).

  Attributes:
    f: upper objective ``f(x, y, batch)``.
    g, c, settings, proj: as in :class:`ValueSaddle`; the settings'
      optimizer is the ``lower_optimizer``.
  """

  f: base.Objective
  g: base.Objective
  c: constrained.Constraint
  settings: constrained.SaddleSettings
  proj: base.Projection

  def update(self, step: Step, state, gamma, batch) -> Part:
    """The warm-started solve; the iterate is the new ``params.y``."""
    lower = objectives.lower_penalized(self.f, self.g, has_aux=True)
    x = step.x
    y_f, mu_f, opt_state, trace = self.settings.solve(
        lambda y_: lower(x, y_, gamma, batch), lambda y_: self.c(x, y_, batch),
        step.y, state.mu_F, state.lower_state, step.count, step.dtype,
        self.proj, has_aux=True, grad_norm=False)
    first = constrained.first_primal_step(trace)
    return Part(y_f, {"mu_F": mu_f, "lower_state": opt_state},
                dict(base.incoming_record(self.f, self.g, x, step.y, batch,
                                          f_value=first.aux["f"],
                                          g_value=first.aux["g"]),
                     constraint_violation=trace.violation[-1]))


class ProjectedStep(NamedTuple):
  r"""One projected optax step of a level: :math:`v\leftarrow\mathrm{Proj}(v-\eta d)`.

  The upper step (``level="x"``: owns ``upper_state``, records
  ``upper_grad_norm``, the norm of the direction ``d``) or a joint method's
  lower step (``level="y"``: owns ``lower_state``, records nothing; the
  shared ``lower_grad_norm`` is :math:`\|\nabla_y g(x_t,y_t)\|`, see
  :func:`jaxbilevel._src.base.incoming_record`).

  Attributes:
    optimizer: the level's optimizer.
    proj: the level's projection.
    level: ``"x"`` or ``"y"``.
  """

  optimizer: optax.GradientTransformation
  proj: base.Projection
  level: str = "x"

  def update(self, step: Step, state, direction) -> Part:
    """The step along ``direction`` from ``x_t`` (or ``params.y``)."""
    name = "upper" if self.level == "x" else "lower"
    new, opt_state = inner.projected_step(
        self.optimizer, direction, getattr(state, f"{name}_state"),
        step.x if self.level == "x" else step.y, self.proj)
    record = ({"upper_grad_norm": lambda: base.diagnostic_norm(direction)}
              if self.level == "x" else {})
    return Part(new, {f"{name}_state": opt_state}, record)
