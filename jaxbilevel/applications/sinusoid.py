r"""Few-shot sinusoid regression: meta-learning as a bilevel problem (Finn et al., ICML 2017).

Tasks are :math:`t\mapsto A\sin(t-\varphi)` with :math:`A\sim U[0.1,5]`,
:math:`\varphi\sim U[0,\pi]`, inputs :math:`t\sim U[-5,5]`, K support and K
query points per task, noise-free, MSE loss (the MAML toy). The upper
variable ``x`` is the initialisation :math:`\theta_0` of an MLP 1-40-40-1
(ReLU); the lower variable holds one adapted copy per task of the meta-batch,
written as an *offset* :math:`\delta_\tau` so that the adapted parameters
are :math:`\theta_0+\delta_\tau`:

.. math::

  g(x,\delta) &= \sum_{\tau}\Big[\mathrm{MSE}^{support}_\tau(x+\delta_\tau)
      + \tfrac{\lambda}2\|\delta_\tau\|^2\Big], \\
  f(x,\delta) &= \frac1{|\mathcal B|}\sum_{\tau}
      \mathrm{MSE}^{query}_\tau(x+\delta_\tau).

The inner problem is r SGD steps of size α on ``g`` from :math:`\delta=0`,
i.e. MAML's adaptation from :math:`\theta_0` (``g`` is a *sum* over tasks so
that each copy takes its own task's step α). With this parametrisation every
method of jaxbilevel sees the same ``f`` and ``g``:

* :func:`jaxbilevel.fo_blo` / :func:`jaxbilevel.ufo_blo` with
  ``inner_start=info["init"]`` (:math:`\delta_0=0`): first-order MAML and its
  unbiased correction;
* :func:`jaxbilevel.itd` with ``inner_start="initial"`` (every unroll restarts
  from :math:`\delta=0`): exact MAML, differentiated through the r steps;
* :func:`jaxbilevel.aid` with ``inner_start=info["init"]``: the implicit
  hypergradient of the proximal (iMAML-style) problem at the r-step
  adaptation from :math:`\delta=0`.

Decisions: the proximal weight λ (default 1) keeps the lower problem close
to MAML's (which has no proximal term): with the step α = 0.01
and r = 5 steps it shrinks the adaptation by :math:`(1-\alpha\lambda)^r
\approx 0.95` only. It does *not* make the support Hessian of the MLP
positive definite, which implicit differentiation needs: at λ = 1, CG does
not converge and AID's direction is unrelated to the exact MAML gradient,
while at λ = 1/(rα) = 20 CG converges and the two agree (measured by
``benchmarks/run.py``, table "AID's implicit meta-gradient against exact
MAML" in ``benchmarks/results/README.md``). Implicit methods therefore
need a larger λ (e.g. ``proximal=20.0``, which changes the adaptation for
every method); the benchmark keeps λ = 1 for all of them.
r = 5, α = 0.01 and a meta-batch of 25 tasks follow the learn2learn / MAML
settings. Initialisation: PyTorch's
``nn.Linear`` default.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxbilevel._src import base
from jaxbilevel._src import inner
from jaxbilevel.applications import _common

AMPLITUDE = (0.1, 5.0)
PHASE = (0.0, float(np.pi))
INPUT = (-5.0, 5.0)


def init_mlp(key, hidden: int = 40) -> dict:
  """An MLP 1-hidden-hidden-1 with PyTorch's default ``nn.Linear`` init."""
  params = {}
  sizes = ((1, hidden), (hidden, hidden), (hidden, 1))
  for i, (key_i, (fan_in, fan_out)) in enumerate(
      zip(jax.random.split(key, len(sizes)), sizes)):
    bound = 1.0 / np.sqrt(fan_in)
    kw, kb = jax.random.split(key_i)
    params[f"fc{i + 1}"] = {
        "kernel": jax.random.uniform(kw, (fan_in, fan_out), jnp.float32,
                                     -bound, bound),
        "bias": jax.random.uniform(kb, (fan_out,), jnp.float32, -bound,
                                   bound)}
  return params


def mlp(params, t):
  """The network on inputs ``t`` of shape ``(points,)``; returns ``(points,)``."""
  h = t[:, None]
  for i in (1, 2):
    layer = params[f"fc{i}"]
    h = jax.nn.relu(h @ layer["kernel"] + layer["bias"])
  return (h @ params["fc3"]["kernel"] + params["fc3"]["bias"])[:, 0]


def sample_tasks(key, num_tasks: int, num_shots: int = 10) -> dict:
  """``num_tasks`` sinusoids with ``num_shots`` support and query points each.

  Returns:
    A dict of float32 arrays ``support_t``, ``support_y``, ``query_t``,
    ``query_y`` of shape ``(num_tasks, num_shots)`` and ``amplitude``,
    ``phase`` of shape ``(num_tasks,)``.
  """
  ka, kp, ks, kq = jax.random.split(key, 4)
  amplitude = jax.random.uniform(ka, (num_tasks,), jnp.float32, *AMPLITUDE)
  phase = jax.random.uniform(kp, (num_tasks,), jnp.float32, *PHASE)

  def points(k):
    t = jax.random.uniform(k, (num_tasks, num_shots), jnp.float32, *INPUT)
    return t, amplitude[:, None] * jnp.sin(t - phase[:, None])

  support_t, support_y = points(ks)
  query_t, query_y = points(kq)
  return dict(support_t=support_t, support_y=support_y, query_t=query_t,
              query_y=query_y, amplitude=amplitude, phase=phase)


def _adapted(x, delta):
  return jax.tree.map(lambda a, d: a + d, x, delta)


def _task_mse(params, t, y):
  return jnp.mean((mlp(params, t) - y) ** 2)


def query_losses(x, delta, batch) -> jax.Array:
  """Query MSE of every task at :math:`x+\\delta_\\tau`, shape ``(tasks,)``."""
  return jax.vmap(_task_mse, in_axes=(0, 0, 0))(
      jax.vmap(_adapted, in_axes=(None, 0))(x, delta), batch["query_t"],
      batch["query_y"])


def upper_objective(x, delta, batch):
  """:math:`f`: mean query MSE over the meta-batch."""
  return jnp.mean(query_losses(x, delta, batch))


def lower_objective(x, delta, batch, *, proximal: float = 1.0):
  """:math:`g`: summed support MSE plus :math:`\\tfrac\\lambda2\\|\\delta\\|^2`."""
  support = jax.vmap(_task_mse, in_axes=(0, 0, 0))(
      jax.vmap(_adapted, in_axes=(None, 0))(x, delta), batch["support_t"],
      batch["support_y"])
  sq = sum(jnp.sum(d ** 2) for d in jax.tree.leaves(delta))
  return jnp.sum(support) + 0.5 * jnp.asarray(proximal, support.dtype) * sq


def zero_offsets(x, num_tasks: int):
  """One zero offset :math:`\\delta_\\tau` per task (leading axis ``num_tasks``)."""
  return jax.tree.map(lambda a: jnp.zeros((num_tasks,) + a.shape, a.dtype), x)


def problem(*, seed: int = 0, meta_batch: int = 25, num_shots: int = 10,
            inner_steps: int = 5, inner_lr: float = 0.01,
            proximal: float = 1.0, hidden: int = 40,
            num_eval_tasks: int = 1000) -> _common.Application:
  """The sinusoid meta-learning application (stochastic: fresh tasks every step).

  Args:
    seed: seed of the initialisation and of the held-out tasks.
    meta_batch: tasks per outer step.
    num_shots: K, support (and query) points per task.
    inner_steps: r, adaptation steps.
    inner_lr: α, the adaptation step size.
    proximal: λ of the proximal term of ``g``.
    hidden: width of the MLP.
    num_eval_tasks: held-out tasks of ``evaluate``.

  Returns:
    An :class:`~jaxbilevel.applications.Application`. ``evaluate`` adapts
    to each held-out task with r SGD steps on ``g`` from :math:`\\delta=0`
    and returns ``upper_loss`` (mean meta-test query MSE), ``ci95`` (half
    width of its 95% confidence interval) and ``unadapted_loss`` (query MSE
    of :math:`\\theta_0` itself). ``info`` holds ``init`` (the
    ``inner_start=`` of :func:`jaxbilevel.fo_blo` and :func:`jaxbilevel.aid`),
    ``inner_steps`` and
    ``inner_lr``.

  Examples:
    >>> import jax, optax, jaxbilevel as jbl
    >>> from jaxbilevel.applications import sinusoid, batch_stream
    >>> app = sinusoid.problem(meta_batch=4, hidden=8, num_eval_tasks=50)
    >>> tx = jbl.fo_blo(app.f, app.g, upper_optimizer=optax.adam(1e-3),
    ...                 lower_optimizer=optax.sgd(app.info["inner_lr"]),
    ...                 inner_steps=app.info["inner_steps"],
    ...                 inner_start=app.info["init"])
    >>> params, _, _ = jbl.run(tx, app.params, num_steps=10,
    ...                        batches=batch_stream(app, jax.random.PRNGKey(1)))
    >>> sorted(jax.jit(app.evaluate)(params))
    ['ci95', 'unadapted_loss', 'upper_loss']
  """
  inner_steps = base.check_static_int(inner_steps, "inner_steps")
  meta_batch = base.check_static_int(meta_batch, "meta_batch")
  key_init, key_eval = jax.random.split(jax.random.PRNGKey(seed))
  x0 = init_mlp(key_init, hidden)
  params = base.BilevelParams(x=x0, y=zero_offsets(x0, meta_batch))
  eval_tasks = sample_tasks(key_eval, num_eval_tasks, num_shots)
  adapt = optax.sgd(inner_lr)

  def g(x, delta, batch):
    return lower_objective(x, delta, batch, proximal=proximal)

  def sample(key):
    return sample_tasks(key, meta_batch, num_shots)

  def evaluate(params):
    x = params.x
    delta0 = zero_offsets(x, num_eval_tasks)
    delta, _, _ = inner.inner_solve(
        lambda d: g(x, d, eval_tasks), delta0, adapt.init(delta0),
        optimizer=adapt, num_steps=inner_steps)
    losses = query_losses(x, delta, eval_tasks)
    unadapted = query_losses(x, delta0, eval_tasks)
    return dict(upper_loss=jnp.mean(losses),
                ci95=1.96 * jnp.std(losses) / float(np.sqrt(num_eval_tasks)),
                unadapted_loss=jnp.mean(unadapted))

  def init(x, y):
    return jax.tree.map(jnp.zeros_like, y)

  info = dict(seed=seed, meta_batch=meta_batch, num_shots=num_shots,
              inner_steps=inner_steps, inner_lr=inner_lr, proximal=proximal,
              hidden=hidden, num_eval_tasks=num_eval_tasks, init=init,
              upper_depends_on_x=True)
  return _common.Application("sinusoid", upper_objective, g, params, None,
                             sample, evaluate, info)
