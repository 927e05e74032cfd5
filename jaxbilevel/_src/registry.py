"""The table of jaxbilevel's methods: one entry per public method.

:data:`jaxbilevel.METHODS` maps a method's name to a :class:`MethodInfo`:
its constructor, the class of its state, its diagnostics and its properties
(penalty, ``gamma``, randomness, Hessian-vector products, coupled
constraints, a value tracker). It is the one place a method is registered:
the test suites (common, vocabulary, bad input, optax combinators), the
benchmarks' labels, the library's messages and the generated tables of
``docs/`` read it, and ``tests/test_registry.py`` checks each property
against the method's behaviour.

Adding a method: write its module under ``jaxbilevel/_src/`` (a constructor
wrapped with ``programs.bilevel_method``, a ``NamedTuple`` state with a
``diagnostics`` field, a ``DIAGNOSTICS`` tuple), export the constructor and
its state in ``jaxbilevel/__init__.py`` and add one :class:`MethodInfo` to
``_ENTRIES`` below; then regenerate the documentation's tables with
``python docs/method_tables.py`` and give the method its settings in the
test tables that ``tests/test_registry.py`` names when it fails.
"""

from __future__ import annotations

import inspect
import types
from typing import Callable, Mapping, NamedTuple, Optional

from jaxbilevel._src import aid as aid_lib
from jaxbilevel._src import alright as alright_lib
from jaxbilevel._src import alt_pbgd as alt_pbgd_lib
from jaxbilevel._src import bome as bome_lib
from jaxbilevel._src import continuation
from jaxbilevel._src import f2sa as f2sa_lib
from jaxbilevel._src import fo_blo as fo_blo_lib
from jaxbilevel._src import itd as itd_lib
from jaxbilevel._src import pbgd_blocc as pbgd_blocc_lib
from jaxbilevel._src import pbgd_free as pbgd_free_lib
from jaxbilevel._src import v_pbgd as v_pbgd_lib

SHARED_ARGUMENTS = ("f", "g", "upper_optimizer", "lower_optimizer")
"""The arguments every method takes (docs/vocabulary.md, "The shared call")."""


class MethodInfo(NamedTuple):
  """What jaxbilevel knows about one method, as data.

  Attributes:
    name: the public name, ``jaxbilevel.<name>``.
    label: the name in papers, tables and plots, e.g. ``"PBGD-Free"``.
    constructor: the public function that builds the method's
      :class:`optax.GradientTransformationExtraArgs`.
    state: the class of the state its ``init`` returns (a ``NamedTuple``
      with a ``diagnostics`` field).
    diagnostics: the keys of ``state.diagnostics``:
      :data:`jaxbilevel.COMMON_DIAGNOSTICS` and the method's own.
    penalty: the step descends a penalty or value-function reformulation
      ``f + lambda (g - min_y g)`` of the bilevel problem, with a penalty
      weight it records as a diagnostic (``gamma``, or BOME's
      ``multiplier``).
    gamma_free: the method has no penalty constant ``gamma`` to choose. A
      method with ``gamma_free=False`` takes ``gamma=`` (a number, a schedule
      or ``"auto"``, see :class:`jaxbilevel.GammaContinuation`) and records
      it in the diagnostic ``gamma``.
    stochastic: the step draws random numbers: the method takes a
      ``jax.random`` ``key`` and keeps it in its state.
    needs_hvp: the step takes second derivatives of ``g``
      (Hessian-vector or cross-derivative products, or a differentiated
      inner loop); ``False`` means gradients of ``f`` and ``g`` only.
    constraints: the method takes coupled lower-level constraints
      ``c(x, y, batch) <= 0`` as its third argument ``c``.
    value_tracker: the state keeps a second lower iterate ``state.y_g``
      that tracks ``argmin_y g(x, y)``.
    preset_of: the name of the general constructor this method is a preset
      of (``"hypergradient_descent"`` for ``aid``, ``itd``, ``fo_blo`` and
      ``ufo_blo``, one ``adjoint=`` each), or ``None``. A general
      constructor has no entry of its own: its state, diagnostics and
      properties are those of the preset its arguments select.
  """

  name: str
  label: str
  constructor: Callable
  state: type
  diagnostics: tuple
  penalty: bool
  gamma_free: bool
  stochastic: bool
  needs_hvp: bool
  constraints: bool
  value_tracker: bool
  preset_of: Optional[str] = None

  @property
  def required_arguments(self) -> tuple:
    """The constructor's arguments without a default, besides the shared call.

    Examples:
      >>> import jaxbilevel as jbl
      >>> jbl.METHODS["pbgd_blocc"].required_arguments
      ('c', 'gamma', 'dual_step_size')
    """
    parameters = inspect.signature(self.constructor).parameters
    return tuple(name for name, p in parameters.items()
                 if p.default is inspect.Parameter.empty
                 and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                 and name not in SHARED_ARGUMENTS)


_ENTRIES = (
    # Penalty-based methods.
    MethodInfo(
        "pbgd_free", "PBGD-Free", pbgd_free_lib.pbgd_free,
        pbgd_free_lib.PBGDFreeState, pbgd_free_lib.DIAGNOSTICS,
        penalty=True, gamma_free=False, stochastic=False, needs_hvp=False,
        constraints=False, value_tracker=False),
    MethodInfo(
        "alt_pbgd", "ALT-PBGD", alt_pbgd_lib.alt_pbgd,
        alt_pbgd_lib.ALTPBGDState, alt_pbgd_lib.DIAGNOSTICS,
        penalty=True, gamma_free=False, stochastic=False, needs_hvp=False,
        constraints=False, value_tracker=True),
    MethodInfo(
        "v_pbgd", "V-PBGD", v_pbgd_lib.v_pbgd, v_pbgd_lib.VPBGDState,
        v_pbgd_lib.DIAGNOSTICS,
        penalty=True, gamma_free=False, stochastic=False, needs_hvp=False,
        constraints=False, value_tracker=True),
    # Penalty-based methods for coupled lower-level constraints.
    MethodInfo(
        "pbgd_blocc", "PBGD-BLOCC", pbgd_blocc_lib.pbgd_blocc,
        pbgd_blocc_lib.PBGDBLOCCState, pbgd_blocc_lib.BLOCC_DIAGNOSTICS,
        penalty=True, gamma_free=False, stochastic=False, needs_hvp=False,
        constraints=True, value_tracker=True),
    MethodInfo(
        "pbgd_free_cc", "PBGD-Free-CC", pbgd_blocc_lib.pbgd_free_cc,
        pbgd_blocc_lib.PBGDFreeCCState, pbgd_blocc_lib.FREE_CC_DIAGNOSTICS,
        penalty=True, gamma_free=False, stochastic=False, needs_hvp=False,
        constraints=True, value_tracker=False),
    # Value-function and first-order methods.
    MethodInfo(
        "bome", "BOME", bome_lib.bome, bome_lib.BOMEState,
        bome_lib.DIAGNOSTICS,
        penalty=True, gamma_free=True, stochastic=False, needs_hvp=False,
        constraints=False, value_tracker=True),
    MethodInfo(
        "f2sa", "F2SA", f2sa_lib.f2sa, f2sa_lib.F2SAState,
        f2sa_lib.DIAGNOSTICS,
        penalty=True, gamma_free=False, stochastic=False, needs_hvp=False,
        constraints=False, value_tracker=True),
    # Bi-objective (not bilevel).
    MethodInfo(
        "alright", "ALRIGHT", alright_lib.alright, alright_lib.ALRIGHTState,
        alright_lib.DIAGNOSTICS,
        penalty=False, gamma_free=True, stochastic=True, needs_hvp=False,
        constraints=False, value_tracker=False),
    # First-order meta-learning (MAML) and its unbiased correction.
    MethodInfo(
        "fo_blo", "FO-BLO", fo_blo_lib.fo_blo, fo_blo_lib.FOBLOState,
        fo_blo_lib.DIAGNOSTICS,
        penalty=False, gamma_free=True, stochastic=False, needs_hvp=False,
        constraints=False, value_tracker=False,
        preset_of="hypergradient_descent"),
    MethodInfo(
        "ufo_blo", "UFO-BLO", fo_blo_lib.ufo_blo, fo_blo_lib.UFOBLOState,
        fo_blo_lib.UFO_DIAGNOSTICS,
        penalty=False, gamma_free=True, stochastic=True, needs_hvp=True,
        constraints=False, value_tracker=False,
        preset_of="hypergradient_descent"),
    # Hypergradient (implicit and unrolled) methods.
    MethodInfo(
        "aid", "AID", aid_lib.aid, aid_lib.AIDState, aid_lib.DIAGNOSTICS,
        penalty=False, gamma_free=True, stochastic=False, needs_hvp=True,
        constraints=False, value_tracker=False,
        preset_of="hypergradient_descent"),
    MethodInfo(
        "itd", "ITD", itd_lib.itd, itd_lib.ITDState, itd_lib.DIAGNOSTICS,
        penalty=False, gamma_free=True, stochastic=False, needs_hvp=True,
        constraints=False, value_tracker=False,
        preset_of="hypergradient_descent"),
)

METHODS: Mapping[str, MethodInfo] = types.MappingProxyType(
    {entry.name: entry for entry in _ENTRIES})
"""Every public method: name -> :class:`MethodInfo`, in the docs' order."""


def method_of_state(state) -> MethodInfo | None:
  """The entry whose method made ``state`` (through ``gamma="auto"``), or None.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import jaxbilevel as jbl
    >>> from jaxbilevel._src import registry
    >>> f = lambda x, y, batch=None: (y - 1.0) ** 2 + x ** 2
    >>> g = lambda x, y, batch=None: (y - x) ** 2
    >>> tx = jbl.alt_pbgd(f, g, gamma=10.0, upper_optimizer=optax.sgd(0.1),
    ...                   lower_optimizer=optax.sgd(0.1))
    >>> state = tx.init(jbl.BilevelParams(jnp.array(0.0), jnp.array(0.0)))
    >>> registry.method_of_state(state).name
    'alt_pbgd'
  """
  if isinstance(state, continuation.ContinuationState):  # gamma="auto"
    state = state.inner_state
  for entry in _ENTRIES:
    if type(state) is entry.state:  # pylint: disable=unidiomatic-typecheck
      return entry
  return None
