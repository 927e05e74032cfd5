"""Closed-form bilevel test problems (described in ``docs/problems.md``).

Each constructor returns a :class:`BilevelProblem`: the objectives, a default
starting point and the closed-form quantities the problem is known for, so
that users can check a method (or their own) against exact answers.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxbilevel._src.base import BilevelParams


class BilevelProblem(NamedTuple):
  """A bilevel problem with known answers.

  Attributes:
    f: upper objective ``f(x, y, batch)``.
    g: lower objective ``g(x, y, batch)``.
    params0: a default starting point.
    info: closed-form quantities and golden values (a dict; see each
      constructor's docstring).
  """

  f: Callable
  g: Callable
  params0: BilevelParams
  info: dict


# Penalty methods and flatness.


def negative_example(dtype=jnp.float32) -> BilevelProblem:
  r"""A1: PBGD-Free fails without flatness (:doc:`/problems`).

  :math:`f=x^2+10y`, :math:`g=(y-x+1)^2`, both variables in the box
  :math:`[-8, 1.5]`. The bilevel solution is :math:`x^*=-5`
  (:math:`y^*=-6`, :math:`\phi^*=-35`); PBGD-Free's direction is :math:`2x`,
  so it converges to 0 for every :math:`\gamma`.

  ``info`` holds ``box`` (the bounds), ``x_star``, ``y_star``, ``phi_star``,
  ``pbgd_free_limit`` and ``y_gamma(x, gamma)``.
  """
  def f(x, y, batch=None):
    del batch
    return x ** 2 + 10.0 * y

  def g(x, y, batch=None):
    del batch
    return (y - x + 1.0) ** 2

  info = dict(box=(-8.0, 1.5), x_star=-5.0, y_star=-6.0, phi_star=-35.0,
              pbgd_free_limit=0.0,
              y_g=lambda x: x - 1.0,
              y_gamma=lambda x, gamma: x - 1.0 - 5.0 / gamma)
  return BilevelProblem(
      f, g, BilevelParams(jnp.asarray(2.0, dtype), jnp.asarray(3.0, dtype)),
      info)


# Hard-coded DPO reference weights of the DPO / SFT toy.
_W_REF = (-5.3395834, -9.937505)
_SFT_INPUTS = np.array([[1.0, 1.0, 0.5, 0.5], [1.0, 0.5, 0.0, 0.5]])
_SFT_LABELS = np.array([0, 1])
_DPO_INPUTS = np.array([[0.5, 1.0, 1.0, 1.0], [1.0, 0.5, 0.5, 0.5]])
_DPO_CHOSEN = np.array([0, 1])
_DPO_REJECTED = np.array([1, 0])


def _toy_log_probs(w1, w2, inputs):
  """Log-softmax of the two logits of the Conv1d(kernel 2, stride 2) toy."""
  logits = jnp.stack([w1 * inputs[:, 0] + w2 * inputs[:, 1],
                      w1 * inputs[:, 2] + w2 * inputs[:, 3]], axis=-1)
  return jax.nn.log_softmax(logits, axis=-1)


def dpo_sft_toy(dtype=jnp.float32, beta: float = 1.0) -> BilevelProblem:
  r"""A2: the two-parameter DPO (upper) / SFT (lower) toy (:doc:`/problems`).

  The model is a 1-channel Conv1d with weights ``(x, y)``; ``g`` is the SFT
  negative log-likelihood and ``f`` the DPO loss against the fixed reference
  weights, both with an L2 term 0.01. ``f`` depends on ``y`` only through
  :math:`0.01y^2`, which is why the problem is flat.

  ``info`` holds ``x_star`` (−6.167815), ``y_star`` (6.199888), ``phi_star``,
  ``pbgd_free_limit`` (−7.163917, independent of :math:`\gamma`),
  ``argmin_F_gamma`` (for :math:`\gamma` = 4, 16, 64) and the closed forms
  ``f_closed``, ``g_closed``.
  """
  sft_in = jnp.asarray(_SFT_INPUTS, dtype)
  dpo_in = jnp.asarray(_DPO_INPUTS, dtype)
  ref_logp = _toy_log_probs(jnp.asarray(_W_REF[0], dtype),
                            jnp.asarray(_W_REF[1], dtype), dpo_in)
  idx = jnp.arange(2)

  def l2(x, y):
    return 0.01 * (x ** 2 + y ** 2)

  def g(x, y, batch=None):
    del batch
    logp = _toy_log_probs(x, y, sft_in)
    return -jnp.mean(logp[idx, _SFT_LABELS]) + l2(x, y)

  def f(x, y, batch=None):
    del batch
    logp = _toy_log_probs(x, y, dpo_in)
    ratio = (logp[idx, _DPO_CHOSEN] - logp[idx, _DPO_REJECTED]) - (
        ref_logp[idx, _DPO_CHOSEN] - ref_logp[idx, _DPO_REJECTED])
    return -jnp.mean(jax.nn.log_sigmoid(beta * ratio)) + l2(x, y)

  c0 = -_W_REF[0] / 2.0

  def f_closed(x, y):
    return jax.nn.softplus(x / 2.0 + c0) + 0.01 * (x ** 2 + y ** 2)

  def g_closed(x, y):
    return 0.5 * (jax.nn.softplus(-(x + y) / 2.0) + jax.nn.softplus(x)) + (
        0.01 * (x ** 2 + y ** 2))

  info = dict(x_star=-6.167815, y_star=6.199888, phi_star=1.272180,
              g_star=1.108433, pbgd_free_limit=-7.163917,
              phi_pbgd_free_limit=1.314179,
              argmin_F_gamma={4.0: -6.24785, 16.0: -6.18856, 64.0: -6.17305},
              y_gamma_at_free_limit={1.0: 4.7892, 4.0: 6.1918, 16.0: 6.6435,
                                     64.0: 6.7652, 256.0: 6.7963},
              f_closed=f_closed, g_closed=g_closed, w_ref=_W_REF)
  return BilevelProblem(
      f, g, BilevelParams(jnp.asarray(5.0, dtype), jnp.asarray(-9.9, dtype)),
      info)


def smoothness_toy(dtype=jnp.float32) -> BilevelProblem:
  r"""A6: the smoothness toy :math:`f=x^2/2`, :math:`g=(y-x)^2` (:doc:`/problems`).

  :math:`F_\gamma(x)=x^2/2` has curvature 1 for every :math:`\gamma`, while
  the joint penalty :math:`x^2/2+\gamma(y-x)^2` has Hessian
  :math:`\begin{psmallmatrix}1+2\gamma&-2\gamma\\-2\gamma&2\gamma\end{psmallmatrix}`.
  ``info["joint_lambda_max"](gamma)`` gives its largest eigenvalue.
  """
  def f(x, y, batch=None):
    del y, batch
    return 0.5 * x ** 2

  def g(x, y, batch=None):
    del batch
    return (y - x) ** 2

  def joint_lambda_max(gamma):
    h = np.array([[1 + 2 * gamma, -2 * gamma], [-2 * gamma, 2 * gamma]])
    return float(np.linalg.eigvalsh(h).max())

  return BilevelProblem(
      f, g, BilevelParams(jnp.asarray(1.0, dtype), jnp.asarray(0.0, dtype)),
      dict(x_star=0.0, joint_lambda_max=joint_lambda_max))


# Strongly convex quadratics with closed-form hypergradients.


class QuadraticBilevel(NamedTuple):
  """Coefficients of a strongly convex quadratic bilevel problem.

  :math:`g(x,y)=\\tfrac12 y^\\top A y + x^\\top C y + a^\\top y`,
  :math:`f(x,y)=\\tfrac12 x^\\top P x + x^\\top B y + \\tfrac12\\|y-y_t\\|^2
  + q^\\top x`.
  """

  A: np.ndarray
  C: np.ndarray
  a: np.ndarray
  P: np.ndarray
  B: np.ndarray
  q: np.ndarray
  y_t: np.ndarray

  def objectives(self, dtype=jnp.float64):
    """The objectives ``(f, g)`` with these coefficients, in ``dtype``."""
    c = {k: jnp.asarray(v, dtype) for k, v in self._asdict().items()}

    def g(x, y, batch=None):
      del batch
      return 0.5 * y @ c["A"] @ y + x @ c["C"] @ y + c["a"] @ y

    def f(x, y, batch=None):
      del batch
      return (0.5 * x @ c["P"] @ x + x @ c["B"] @ y
              + 0.5 * jnp.sum((y - c["y_t"]) ** 2) + c["q"] @ x)

    return f, g

  def y_star(self, x):
    """The lower solution :math:`y_g^*(x)=-A^{-1}(C^\\top x+a)`."""
    return -np.linalg.solve(self.A, self.C.T @ x + self.a)

  def y_gamma(self, x, gamma):
    """The penalized lower solution :math:`y_\\gamma^*(x)`."""
    lhs = self.A + np.eye(len(self.a)) / gamma
    rhs = -(self.C.T @ x + self.a) - (self.B.T @ x - self.y_t) / gamma
    return np.linalg.solve(lhs, rhs)

  def _affine(self, fn):
    """Writes an affine map ``x -> M x + m`` as ``(M, m)``."""
    dx = len(self.q)
    m = fn(np.zeros(dx))
    cols = [fn(e) - m for e in np.eye(dx)]
    return np.stack(cols, axis=1), m

  def _solve_stationary(self, grad):
    mat, vec = self._affine(grad)
    return np.linalg.solve(mat, -vec)

  def x_star(self):
    """The bilevel solution (implicit hypergradient equal to zero)."""
    jac = -np.linalg.solve(self.A, self.C.T)  # dy*/dx

    def grad(x):
      y = self.y_star(x)
      return self.P @ x + self.q + self.B @ y + jac.T @ (self.B.T @ x + y
                                                        - self.y_t)
    return self._solve_stationary(grad)

  def argmin_f_gamma(self, gamma):
    """The minimiser of the reduced penalty :math:`F_\\gamma` (its gradient is 0)."""
    def grad(x):
      y_gam, y_g = self.y_gamma(x, gamma), self.y_star(x)
      return (self.P @ x + self.q + self.B @ y_gam
              + gamma * self.C @ (y_gam - y_g))
    return self._solve_stationary(grad)

  def pbgd_free_limit(self, gamma=None):
    """PBGD-Free's fixed point :math:`\\nabla_x f(x, y_\\gamma^*(x))=0`.

    With ``gamma=None`` the :math:`\\gamma\\to\\infty` limit
    :math:`\\nabla_x f(x, y_g^*(x))=0`.
    """
    def grad(x):
      y = self.y_star(x) if gamma is None else self.y_gamma(x, gamma)
      return self.P @ x + self.q + self.B @ y
    return self._solve_stationary(grad)


def random_quadratic(seed: int = 0, dim_x: int = 3, dim_y: int = 4,
                     dtype=jnp.float64) -> BilevelProblem:
  r"""A random strongly convex quadratic bilevel problem with closed forms.

  ``info["coefficients"]`` is a :class:`QuadraticBilevel` with the exact
  bilevel solution ``x_star()``, the reduced-penalty minimiser
  ``argmin_f_gamma(gamma)`` and PBGD-Free's fixed point
  ``pbgd_free_limit(gamma)``.
  """
  rng = np.random.default_rng(seed)
  m = rng.normal(size=(dim_y, dim_y))
  a_mat = m @ m.T / dim_y + np.eye(dim_y)
  p = rng.normal(size=(dim_x, dim_x))
  coeffs = QuadraticBilevel(
      A=a_mat, C=rng.normal(size=(dim_x, dim_y)) / np.sqrt(dim_y),
      a=rng.normal(size=dim_y), P=p @ p.T / dim_x + 0.5 * np.eye(dim_x),
      B=0.3 * rng.normal(size=(dim_x, dim_y)), q=rng.normal(size=dim_x),
      y_t=rng.normal(size=dim_y))
  f, g = coeffs.objectives(dtype)
  return BilevelProblem(
      f, g, BilevelParams(jnp.zeros(dim_x, dtype), jnp.zeros(dim_y, dtype)),
      dict(coefficients=coeffs,
           lower_lipschitz=float(np.linalg.eigvalsh(a_mat).max())))


def quadratic_a8(dtype=jnp.float64) -> BilevelProblem:
  r"""A8: the 2-D strongly convex quadratic with exact hypergradient (:doc:`/problems`).

  ``info["coefficients"]`` is a :class:`QuadraticBilevel`
  (:math:`P=\rho I`, :math:`B=0`, :math:`q=0`); ``info["x_star"]`` is
  (−2.4112868747, −1.1457887986).
  """
  coeffs = QuadraticBilevel(
      A=np.array([[2.0, 0.5], [0.5, 1.0]]), C=np.array([[1.0, 0.0],
                                                        [0.5, 1.0]]),
      a=np.array([1.0, -1.0]), P=0.1 * np.eye(2), B=np.zeros((2, 2)),
      q=np.zeros(2), y_t=np.array([1.0, 2.0]))
  _, g = coeffs.objectives(dtype)
  y_t = jnp.asarray(coeffs.y_t, dtype)

  def f(x, y, batch=None):  # P = 0.1 I, B = 0, q = 0, written out
    del batch
    return 0.5 * jnp.sum((y - y_t) ** 2) + 0.05 * jnp.sum(x ** 2)

  return BilevelProblem(
      f, g, BilevelParams(jnp.zeros(2, dtype), jnp.zeros(2, dtype)),
      dict(coefficients=coeffs,
           x_star=np.array([-2.4112868747, -1.1457887986]),
           h_star=0.4777682770, lower_lipschitz=2.2071067811865475))


# Coupled-constraint problems.


def _blocc_lower(x, y, batch=None):
  del batch
  return (y - 2.0 * x) ** 2


def blocc_toy(variant: int = 1, dtype=jnp.float32) -> BilevelProblem:
  r"""A4: the BLOCC coupled-constraint toys (:doc:`/problems`).

  Lower level :math:`g=(y-2x)^2` subject to :math:`c(x,y)=y-x\le0`, upper
  variable :math:`x\in[0,3]`. For :math:`x\ge0` the constraint is active:
  :math:`y_g^*=x`, :math:`\mu_g^*=2x`, :math:`v=x^2`,
  :math:`\phi(x)=f(x,x)`.

  * ``variant=1``: :math:`f=e^{-y+2}/(2+\cos4x)+\tfrac12\ln((4x-2)^2+1)+x^2`;
    local minimisers of :math:`\phi` 0.30070 (global) and 1.16269.
  * ``variant=2``: :math:`f=e^{-y+2}/(2+\cos6x)+\tfrac12\ln((4x-2)^2+1)`;
    local minimisers 0.14889, 0.98622 (global), 2.01973, 2.99077.

  ``info`` holds ``c`` (the constraint ``c(x, y, batch) -> (1,)``), ``box``,
  ``minimisers``, ``phi_at_minimisers``, ``x_star`` (the global one) and the
  closed forms ``phi``, ``y_g``, ``mu_g``, ``v``.
  """
  if variant not in (1, 2):
    raise ValueError(f"blocc_toy: variant must be 1 or 2, got {variant!r}.")
  freq = 4.0 if variant == 1 else 6.0
  quad = 1.0 if variant == 1 else 0.0

  def f(x, y, batch=None):
    del batch
    return (jnp.exp(2.0 - y) / (2.0 + jnp.cos(freq * x))
            + 0.5 * jnp.log((4.0 * x - 2.0) ** 2 + 1.0) + quad * x ** 2)

  def c(x, y, batch=None):
    del batch
    return jnp.atleast_1d(y - x)

  if variant == 1:
    minimisers, values = (0.30070, 1.16269), (2.6545, 3.5850)
  else:
    minimisers = (0.14889, 0.98622, 2.01973, 2.99077)
    values = (2.9685, 1.72188, 2.15611, 2.44573)
  info = dict(c=c, box=(0.0, 3.0), minimisers=minimisers,
              phi_at_minimisers=values,
              x_star=minimisers[int(np.argmin(values))],
              phi=lambda x: f(x, x), y_g=lambda x: x, mu_g=lambda x: 2.0 * x,
              v=lambda x: x ** 2)
  return BilevelProblem(
      f, _blocc_lower,
      BilevelParams(jnp.asarray(0.5, dtype), jnp.asarray(0.5, dtype)), info)


def multiplier_identity(dtype=jnp.float32) -> BilevelProblem:
  r"""A5: the value-function gradient needs the multiplier term (:doc:`/problems`).

  Lower level only: :math:`g=(y-2x)^2` subject to :math:`c=3x-y\le0`. For
  :math:`x>0` the constraint is active, :math:`y_g^*=3x`,
  :math:`\mu_g^*=2x`, :math:`v=x^2`; the partial derivative
  :math:`\nabla_xg(x,y_g^*)=-4x` is wrong and the multiplier term
  :math:`\mu_g^*\nabla_xc=6x` corrects it to :math:`\nabla v=2x`. For
  :math:`x\le0`: :math:`y_g^*=2x`, :math:`\mu^*=0`, :math:`v=0`.

  The problem has no upper objective (``f`` is None). ``info`` holds ``c``
  and the closed forms ``v`` (:math:`\max(x,0)^2`, traceable, so
  ``jax.grad(info["v"])`` is the exact :math:`\nabla v`), ``y_g``, ``mu_g``.
  """
  def c(x, y, batch=None):
    del batch
    return jnp.atleast_1d(3.0 * x - y)

  info = dict(c=c, v=lambda x: jnp.maximum(x, 0.0) ** 2,
              y_g=lambda x: jnp.where(x > 0, 3.0 * x, 2.0 * x),
              mu_g=lambda x: 2.0 * jnp.maximum(x, 0.0))
  return BilevelProblem(
      None, _blocc_lower,
      BilevelParams(jnp.asarray(1.0, dtype), jnp.asarray(0.0, dtype)), info)


# Hypergradient, meta-learning and BOME problems.

# Ridge-regression hyperparameter instance.
_RIDGE_X_TRAIN = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, -1.0],
                           [2.0, 1.0]])
_RIDGE_Y_TRAIN = np.array([1.0, 2.0, 2.5, -0.5, 3.0])
_RIDGE_X_VAL = np.array([[1.0, 2.0], [2.0, 0.0], [0.0, 1.0]])
_RIDGE_Y_VAL = np.array([4.0, 2.0, 1.5])


def ridge(dtype=jnp.float64, log_lambda: bool = True) -> BilevelProblem:
  r"""A10: ridge-regression hyperparameter selection (:doc:`/problems`).

  :math:`g(x,w)=\tfrac1{2n}\|X_{tr}w-y_{tr}\|^2+\tfrac\lambda2\|w\|^2` and
  :math:`f(x,w)=\tfrac1{2m}\|X_{va}w-y_{va}\|^2`, with :math:`\lambda=e^x`
  (``log_lambda=True``) or :math:`\lambda=x`. ``f`` does not depend on ``x``:
  the whole hypergradient is the implicit term.

  ``batch`` may be ``None`` (the built-in 5 + 3 sample instance) or a dict
  with keys ``X_train``, ``y_train``, ``X_val``, ``y_val`` (e.g. to
  differentiate with respect to the data).

  ``info`` holds the closed forms ``w(lam)``, ``F(lam)``, ``F_prime(lam)``
  (:math:`F'(\lambda)=-(X_{va}^\top r/m)^\top A_\lambda^{-1}w(\lambda)`),
  ``hypergradient(x)`` (in the chosen parametrisation), the data, and the
  goldens ``F_prime_golden`` (:math:`F'(0.1)=0.4501177634`,
  :math:`F'(1)=0.7820012019`), ``lam_star`` (0.006841) and ``F_star``.
  """
  data = {k: jnp.asarray(v, dtype) for k, v in (
      ("X_train", _RIDGE_X_TRAIN), ("y_train", _RIDGE_Y_TRAIN),
      ("X_val", _RIDGE_X_VAL), ("y_val", _RIDGE_Y_VAL))}

  def lam_of(x):
    return jnp.exp(x) if log_lambda else x

  def g(x, y, batch=None):
    d = data if batch is None else batch
    n = d["X_train"].shape[0]
    return (0.5 * jnp.sum((d["X_train"] @ y - d["y_train"]) ** 2) / n
            + 0.5 * lam_of(x) * jnp.sum(y ** 2))

  def f(x, y, batch=None):
    del x
    d = data if batch is None else batch
    m = d["X_val"].shape[0]
    return 0.5 * jnp.sum((d["X_val"] @ y - d["y_val"]) ** 2) / m

  def a_mat(lam):
    n = _RIDGE_X_TRAIN.shape[0]
    return _RIDGE_X_TRAIN.T @ _RIDGE_X_TRAIN / n + lam * np.eye(2)

  def w_of(lam):
    n = _RIDGE_X_TRAIN.shape[0]
    return np.linalg.solve(a_mat(lam), _RIDGE_X_TRAIN.T @ _RIDGE_Y_TRAIN / n)

  def value(lam):
    r = _RIDGE_X_VAL @ w_of(lam) - _RIDGE_Y_VAL
    return 0.5 * float(r @ r) / len(r)

  def f_prime(lam):
    w = w_of(lam)
    r = _RIDGE_X_VAL @ w - _RIDGE_Y_VAL
    return float(-(_RIDGE_X_VAL.T @ r / len(r)) @ np.linalg.solve(a_mat(lam),
                                                                  w))

  def hypergradient(x):
    lam = float(np.exp(x)) if log_lambda else float(x)
    return lam * f_prime(lam) if log_lambda else f_prime(lam)

  x0 = np.log(0.1) if log_lambda else 0.1
  info = dict(w=w_of, F=value, F_prime=f_prime, hypergradient=hypergradient,
              data=data, log_lambda=log_lambda,
              F_prime_golden={0.1: 0.4501177634, 1.0: 0.7820012019},
              dF_dlog_lambda_golden={0.1: 0.0450117763, 1.0: 0.7820012019},
              lam_star=0.006841, log_lam_star=-4.98485, F_star=0.01951730)
  return BilevelProblem(
      f, g, BilevelParams(jnp.asarray(x0, dtype), jnp.zeros(2, dtype)), info)


def maml_counterexample(dtype=jnp.float64) -> BilevelProblem:
  r"""A9: two 1-D tasks where first-order MAML (FO-BLO) is wrong (:doc:`/problems`).

  Task :math:`\tau\in\{1,2\}`: inner loss
  :math:`\tfrac12a_\tau(\varphi-c_\tau)^2`, outer loss
  :math:`\tfrac12(\varphi-d_\tau)^2`, :math:`r=5` gradient steps of size
  :math:`\alpha=0.2` from :math:`\varphi_0=x`; :math:`a=(1,4)`,
  :math:`c=(0,2)`, :math:`d=(1,-1)`.

  As a bilevel problem over :class:`~jaxbilevel.BilevelParams`: ``x`` is the
  scalar initialisation and ``y`` holds one adapted copy per task (shape
  ``(2,)``), so ``g(x, y) = sum_tau 0.5 a_tau (y_tau - c_tau)^2`` (each
  coordinate takes its own task's gradient step) and ``f(x, y) = sum_tau w_tau 0.5 (y_tau -
  d_tau)^2``. ``batch`` is ``None`` (uniform task weights ``w = (1/2, 1/2)``,
  the exact objective :math:`F`) or an array of two task weights (e.g.
  ``(1, 0)`` for a one-task stochastic step). The inner problem starts at
  :math:`y_0=(x,x)`: pass ``info["init"]`` as the ``init`` of
  :func:`jaxbilevel.fo_blo`.

  ``info`` holds ``alpha``, ``num_inner_steps``, ``init``, the closed forms
  ``F(x)``, ``F_prime(x)`` (exact meta-gradient) and ``F_prime_first_order(x)``,
  and the goldens ``x_star`` (3.042816), ``F_star`` (2.250503), ``x_fo``
  (−6.095610), ``F_fo`` (4.492232).
  """
  a = np.array([1.0, 4.0])
  c = np.array([0.0, 2.0])
  d = np.array([1.0, -1.0])
  alpha, r = 0.2, 5
  s = (1.0 - alpha * a) ** r
  a_j, c_j, d_j = (jnp.asarray(v, dtype) for v in (a, c, d))

  def weights(batch):
    return jnp.full((2,), 0.5, dtype) if batch is None else jnp.asarray(
        batch, dtype)

  def g(x, y, batch=None):
    del x, batch
    return 0.5 * jnp.sum(a_j * (y - c_j) ** 2)

  def f(x, y, batch=None):
    del x
    return 0.5 * jnp.sum(weights(batch) * (y - d_j) ** 2)

  def init(x, y):
    del y
    return jnp.broadcast_to(x, (2,)).astype(dtype)

  def phi_r(x):
    return c + s * (x - c)

  def value(x):
    return float(0.25 * np.sum((phi_r(x) - d) ** 2))

  def f_prime(x):
    return float(0.5 * np.sum(s * (phi_r(x) - d)))

  def f_prime_first_order(x):
    return float(0.5 * np.sum(phi_r(x) - d))

  info = dict(alpha=alpha, num_inner_steps=r, init=init, contraction=s,
              F=value, F_prime=f_prime,
              F_prime_first_order=f_prime_first_order,
              x_star=3.042816, F_star=2.250503, x_fo=-6.095610,
              F_fo=4.492232)
  return BilevelProblem(
      f, g, BilevelParams(jnp.asarray(0.0, dtype), jnp.zeros(2, dtype)), info)


_CORESET_POINTS = np.array([[1.0, 3.0], [3.0, 1.0], [-2.0, 2.0], [-3.0, -2.0]])


def coreset(dtype=jnp.float64) -> BilevelProblem:
  r"""A7a: the BOME coreset toy (:doc:`/problems`).

  The upper variable ``x`` (BOME's ``w``, shape ``(4,)``) weights four points
  :math:`c_i` through a softmax; the lower variable ``y`` (shape ``(2,)``)
  fits their weighted mean, :math:`g=\|\sum_i\mathrm{softmax}(x)_ic_i-y\|^2`,
  and the upper objective pulls it towards :math:`(3,-2)`,
  :math:`f=0.1\|y-(3,-2)\|^2` (``f`` does not depend on ``x``).

  The infimum is the projection of :math:`(3,-2)` onto the convex hull,
  :math:`y^*=(1.8,0.4)` with weights :math:`(0,0.8,0,0.2)` and
  :math:`f^*=0.72`; it is approached only as :math:`x_1,x_3\to-\infty`.
  ``info`` holds ``y_star``, ``f_star``, ``weights_star``, the official
  starts ``starts`` and BOME's expected end point ``bome_end_point``
  ((1.817, 0.385)).
  """
  points = jnp.asarray(_CORESET_POINTS, dtype)
  target = jnp.asarray([3.0, -2.0], dtype)

  def g(x, y, batch=None):
    del batch
    return jnp.sum((jax.nn.softmax(x) @ points - y) ** 2)

  def f(x, y, batch=None):
    del x, batch
    return 0.1 * jnp.sum((y - target) ** 2)

  info = dict(y_star=np.array([1.8, 0.4]), f_star=0.72,
              weights_star=np.array([0.0, 0.8, 0.0, 0.2]),
              starts=np.array([[0.0, 3.0], [-3.0, 1.0], [3.5, -1.0]]),
              bome_end_point=np.array([1.817, 0.385]))
  return BilevelProblem(
      f, g, BilevelParams(jnp.zeros(4, dtype), jnp.asarray([0.0, 3.0], dtype)),
      info)
