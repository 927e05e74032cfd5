"""Closed-form bilevel test problems (``PROBLEMS.md`` Part A).

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


def negative_example(dtype=jnp.float32) -> BilevelProblem:
  r"""``PROBLEMS.md`` §A1: PBGD-Free fails without flatness.

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


# Hard-coded DPO reference weights (PROBLEMS.md §A2).
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
  r"""``PROBLEMS.md`` §A2: the two-parameter DPO (upper) / SFT (lower) toy.

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
  r"""``PROBLEMS.md`` §A6: :math:`f=x^2/2`, :math:`g=(y-x)^2`.

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
    """The bilevel solution (implicit hypergradient (G3) equal to zero)."""
    jac = -np.linalg.solve(self.A, self.C.T)  # dy*/dx

    def grad(x):
      y = self.y_star(x)
      return self.P @ x + self.q + self.B @ y + jac.T @ (self.B.T @ x + y
                                                        - self.y_t)
    return self._solve_stationary(grad)

  def argmin_f_gamma(self, gamma):
    """The minimiser of the reduced penalty :math:`F_\\gamma` ((G2) = 0)."""
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
  c = {k: jnp.asarray(v, dtype) for k, v in coeffs._asdict().items()}

  def g(x, y, batch=None):
    del batch
    return 0.5 * y @ c["A"] @ y + x @ c["C"] @ y + c["a"] @ y

  def f(x, y, batch=None):
    del batch
    return (0.5 * x @ c["P"] @ x + x @ c["B"] @ y
            + 0.5 * jnp.sum((y - c["y_t"]) ** 2) + c["q"] @ x)

  return BilevelProblem(
      f, g, BilevelParams(jnp.zeros(dim_x, dtype), jnp.zeros(dim_y, dtype)),
      dict(coefficients=coeffs,
           lower_lipschitz=float(np.linalg.eigvalsh(a_mat).max())))


def quadratic_a8(dtype=jnp.float64) -> BilevelProblem:
  r"""``PROBLEMS.md`` §A8: the 2-D strongly convex quadratic with exact hypergradient.

  ``info["coefficients"]`` is a :class:`QuadraticBilevel`
  (:math:`P=\rho I`, :math:`B=0`, :math:`q=0`); ``info["x_star"]`` is
  (−2.4112868747, −1.1457887986).
  """
  coeffs = QuadraticBilevel(
      A=np.array([[2.0, 0.5], [0.5, 1.0]]), C=np.array([[1.0, 0.0],
                                                        [0.5, 1.0]]),
      a=np.array([1.0, -1.0]), P=0.1 * np.eye(2), B=np.zeros((2, 2)),
      q=np.zeros(2), y_t=np.array([1.0, 2.0]))
  c = {k: jnp.asarray(v, dtype) for k, v in coeffs._asdict().items()}

  def g(x, y, batch=None):
    del batch
    return 0.5 * y @ c["A"] @ y + x @ c["C"] @ y + c["a"] @ y

  def f(x, y, batch=None):
    del batch
    return 0.5 * jnp.sum((y - c["y_t"]) ** 2) + 0.05 * jnp.sum(x ** 2)

  return BilevelProblem(
      f, g, BilevelParams(jnp.zeros(2, dtype), jnp.zeros(2, dtype)),
      dict(coefficients=coeffs,
           x_star=np.array([-2.4112868747, -1.1457887986]),
           h_star=0.4777682770, lower_lipschitz=2.2071067811865475))

