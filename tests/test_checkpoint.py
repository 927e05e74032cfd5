"""Checkpointing: full run state round trips, exact resume, clear errors, atomic saves."""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxbilevel as jbl
from jaxbilevel import checkpoint
from jaxbilevel._src import checkpoint as checkpoint_src

# Reading a corrupt checkpoint makes orbax's background tasks complain after
# the error has been raised; the error itself is what the tests check.
pytestmark = pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnraisableExceptionWarning")


def _noisy_toy():
  """The DPO/SFT toy with a small per-step noise term drawn from a PRNG key."""
  prob = jbl.problems.dpo_sft_toy()
  key = jax.random.key(0)

  def batches(t):
    return {"noise": jax.random.normal(jax.random.fold_in(key, t), (),
                                       jnp.float32)}

  def f(x, y, batch):
    return prob.f(x, y) + 1e-2 * batch["noise"] * x

  def g(x, y, batch):
    return prob.g(x, y) + 1e-2 * batch["noise"] * y

  return f, g, prob.params0, batches


def _method(f, g):
  """ALT-PBGD with chained optimizers: clipping, a schedule, momentum, Adam."""
  upper = optax.chain(optax.clip_by_global_norm(1.0),
                      optax.adam(optax.cosine_decay_schedule(0.3, 400)))
  lower = optax.chain(optax.clip(5.0), optax.sgd(0.5, momentum=0.9))
  return jbl.alt_pbgd(f, g, gamma=16.0, upper_optimizer=upper,
                      lower_optimizer=lower, inner_steps=1)


def _assert_identical(a, b):
  """Same structure, same dtypes, bitwise-equal values."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    u, v = np.asarray(u), np.asarray(v)
    assert u.dtype == v.dtype
    np.testing.assert_array_equal(u, v)


# One method object for the module, so that tests share compiled chunks
# (jaxbilevel.run and resumable_run compile once per (tx, chunk length)).
_F, _G, _P0, _BATCHES = _noisy_toy()
_TX = _method(_F, _G)


@pytest.fixture(name="toy")
def toy_fixture():
  return _TX, _P0, _BATCHES


def test_round_trip_restores_every_part_of_the_run(toy, tmp_path):
  tx, p0, batches = toy
  params, state, history = jbl.run(tx, p0, num_steps=20, batches=batches)
  key = jax.random.split(jax.random.key(3))[1]
  path = checkpoint.save(tmp_path, params, state, step=20, history=history,
                         key=key)
  assert path == os.path.join(str(tmp_path), "20")
  assert checkpoint.latest_step(tmp_path) == 20

  restored = checkpoint.restore(tmp_path, p0, jax.eval_shape(tx.init, p0))
  assert isinstance(restored, checkpoint.RunCheckpoint)
  assert restored.step == 20
  assert type(restored.state) is jbl.ALTPBGDState  # pylint: disable=unidiomatic-typecheck
  _assert_identical(restored.params, params)
  _assert_identical(restored.state, state)  # all optimizer states + trackers
  _assert_identical(restored.history, history)
  assert jax.dtypes.issubdtype(restored.key.dtype, jax.dtypes.prng_key)
  np.testing.assert_array_equal(jax.random.key_data(restored.key),
                                jax.random.key_data(key))
  # The restored state continues exactly like the original one.
  _assert_identical(
      jbl.run(tx, restored.params, state=restored.state, num_steps=20,
              batches=batches)[:2],
      jbl.run(tx, params, state=state, num_steps=20, batches=batches)[:2])


def test_raw_key_and_no_history(tmp_path):
  f = lambda x, y, batch: x ** 2 + 10.0 * y
  g = lambda x, y, batch: (y - x + 1.0) ** 2
  tx = jbl.pbgd_free(f, g, gamma=15.0, upper_optimizer=optax.sgd(0.01),
                     lower_optimizer=optax.sgd(0.01))
  p0 = jbl.BilevelParams(jnp.asarray(2.0, jnp.float32),
                         jnp.asarray(3.0, jnp.float32))
  checkpoint.save(tmp_path, p0, tx.init(p0), step=0,
                  key=jax.random.PRNGKey(5))
  restored = checkpoint.restore(tmp_path, p0, tx.init(p0))
  assert restored.history is None and restored.step == 0
  np.testing.assert_array_equal(restored.key, jax.random.PRNGKey(5))
  assert restored.params.x.dtype == jnp.float32


@pytest.mark.parametrize("batch_kind", ["callable", "array"])
def test_resumed_run_equals_uninterrupted_run(toy, tmp_path, batch_kind):
  tx, p0, batches = toy
  if batch_kind == "array":
    batches = jax.vmap(batches)(jnp.arange(300))
  reference = jbl.run(tx, p0, num_steps=300, batches=batches, chunk_size=50)

  # A run stopped at step 150 and resumed (one compiled chunk of 50 steps).
  first = checkpoint.resumable_run(tx, p0, num_steps=150, directory=tmp_path,
                                   save_every=50, batches=batches)
  assert sorted(os.listdir(tmp_path)) == ["100", "150"]  # max_to_keep=2
  _assert_identical(first, jbl.run(tx, p0, num_steps=150, batches=batches,
                                   chunk_size=50))
  resumed = checkpoint.resumable_run(tx, p0, num_steps=300,
                                     directory=tmp_path, save_every=50,
                                     batches=batches)
  _assert_identical(resumed, reference)
  assert checkpoint.latest_step(tmp_path) == 300
  # Calling again once finished returns the saved run without new steps.
  _assert_identical(
      checkpoint.resumable_run(tx, p0, num_steps=300, directory=tmp_path,
                               save_every=50, batches=batches), reference)


def test_crash_between_checkpoints_then_resume_is_exact(toy, tmp_path,
                                                        monkeypatch):
  tx, p0, batches = toy
  reference = jbl.run(tx, p0, num_steps=120, batches=batches, chunk_size=20)
  real_save = checkpoint_src.save
  calls = []

  def save_then_die(*args, **kwargs):
    calls.append(kwargs["step"])
    if len(calls) == 3:  # the job dies at step 60, after saving steps 20, 40
      raise KeyboardInterrupt
    return real_save(*args, **kwargs)

  monkeypatch.setattr(checkpoint_src, "save", save_then_die)
  with pytest.raises(KeyboardInterrupt):
    checkpoint.resumable_run(tx, p0, num_steps=120, directory=tmp_path,
                             save_every=20, batches=batches)
  monkeypatch.setattr(checkpoint_src, "save", real_save)
  assert checkpoint.latest_step(tmp_path) == 40
  resumed = checkpoint.resumable_run(tx, p0, num_steps=120,
                                     directory=tmp_path, save_every=20,
                                     batches=batches)
  _assert_identical(resumed, reference)


def test_documented_manual_resume_with_run_and_sliced_batches(toy, tmp_path):
  """The pattern of docs/scaling.md with jaxbilevel.run and save/restore."""
  tx, p0, batches_fn = toy
  batches = jax.vmap(batches_fn)(jnp.arange(150))
  params, state, hist = jbl.run(tx, p0, num_steps=100, batches=batches,
                                chunk_size=50, diagnostics=True)
  checkpoint.save(tmp_path, params, state, step=100, history=hist)

  ckpt = checkpoint.restore(tmp_path, p0, tx.init(p0))
  rest = jax.tree.map(lambda b: b[ckpt.step:], batches)  # run counts from 0
  params, state, hist = jbl.run(tx, ckpt.params, state=ckpt.state,
                                num_steps=150 - ckpt.step, batches=rest,
                                diagnostics=True)
  ref_params, ref_state, ref_hist = jbl.run(tx, p0, num_steps=150,
                                            batches=batches, chunk_size=50,
                                            diagnostics=True)
  _assert_identical((params, state), (ref_params, ref_state))
  for name in ("f", "g", "upper_grad_norm"):
    np.testing.assert_array_equal(
        np.concatenate([ckpt.history[name], hist[name]]), ref_hist[name])


# PBGD-Free whose upper objective reads a per-step number from the batch.
_DATA_TX = jbl.pbgd_free(
    lambda x, y, batch: jnp.sum(x ** 2) + batch * jnp.sum(y),
    lambda x, y, batch: jnp.sum((y - x) ** 2), gamma=10.0,
    upper_optimizer=optax.sgd(0.1), lower_optimizer=optax.sgd(0.2))


def test_skip_mode_counts_global_steps(tmp_path):
  """With skipped steps, batches stay indexed by the executed step."""
  tx, p0 = _DATA_TX, jbl.BilevelParams(jnp.ones(2), jnp.zeros(2))
  data = jnp.linspace(0.1, 1.0, 60).at[jnp.array([5, 33])].set(jnp.nan)
  # A record with a tuple: restored as a list by orbax, given back as a tuple.
  record = lambda params, state: (params.x[0], state.count)
  with pytest.warns(RuntimeWarning, match="skipped 2 non-finite"):
    reference = jbl.run(tx, p0, num_steps=60, batches=data,
                        on_nonfinite="skip", chunk_size=10, record=record)
  with pytest.warns(RuntimeWarning, match="skipped"):
    checkpoint.resumable_run(tx, p0, num_steps=30, directory=tmp_path,
                             save_every=10, batches=data, on_nonfinite="skip",
                             record=record)
  with pytest.warns(RuntimeWarning, match="skipped 2 non-finite"):
    resumed = checkpoint.resumable_run(tx, p0, num_steps=60,
                                       directory=tmp_path, save_every=10,
                                       batches=data, on_nonfinite="skip",
                                       record=record)
  _assert_identical(resumed, reference)
  assert isinstance(resumed[2]["record"], tuple)
  assert int(resumed[1].count) == 58  # two rejected steps
  assert resumed[2]["step"][-1] == 59


def test_nonfinite_stop_keeps_last_good_checkpoint(tmp_path):
  tx, p0 = _DATA_TX, jbl.BilevelParams(jnp.ones(2), jnp.zeros(2))
  data = jnp.ones(40).at[27].set(jnp.inf)
  with pytest.raises(jbl.NonFiniteError, match=r"non-finite .*at step 27"):
    checkpoint.resumable_run(tx, p0, num_steps=40, directory=tmp_path,
                             save_every=10, batches=data,
                             on_nonfinite="raise")
  assert checkpoint.latest_step(tmp_path) == 20
  with pytest.warns(RuntimeWarning, match="at step 27"):
    params, _, hist = checkpoint.resumable_run(
        tx, p0, num_steps=40, directory=tmp_path, save_every=10,
        batches=data)
  assert hist["step"][-1] == 27 and not hist["finite"][-1]
  _assert_identical(params, jbl.run(tx, p0, num_steps=27, batches=data)[0])


# PBGD-Free with Adam on the negative example (the same in
# _SMALL_PROBLEM_SCRIPT).
_SMALL_TX = jbl.pbgd_free(lambda x, y, batch: x ** 2 + 10.0 * y,
                          lambda x, y, batch: (y - x + 1.0) ** 2, gamma=15.0,
                          upper_optimizer=optax.adam(0.01),
                          lower_optimizer=optax.sgd(0.01))
_SMALL_P0 = jbl.BilevelParams(jnp.asarray(2.0, jnp.float32),
                              jnp.asarray(3.0, jnp.float32))


def _saved_run(directory):
  params, state, hist = jbl.run(_SMALL_TX, _SMALL_P0, num_steps=10)
  checkpoint.save(directory, params, state, step=5, history=hist)
  return _SMALL_TX, _SMALL_P0


def _garble(path):
  with open(path, "r+b") as fh:
    data = fh.read()
    fh.seek(0)
    fh.write(bytes(255 - b for b in data))


def _garble_all(pattern):
  def corrupt(step_dir):
    files = glob.glob(os.path.join(step_dir, pattern), recursive=True)
    assert files
    for name in files:
      _garble(name)
  return corrupt


CORRUPTIONS = [
    ("metadata garbled", _garble_all("meta/metadata"),
     "corrupt or incomplete: its metadata cannot be read"),
    ("metadata emptied", lambda d: open(os.path.join(d, "meta", "metadata"),
                                        "w").close(),
     "corrupt or incomplete: its metadata cannot be read"),
    ("array data garbled", _garble_all("arrays/**/d/*"),
     "corrupt or incomplete: its arrays cannot be read"),
    ("array data truncated",
     lambda d: [open(p, "r+b").truncate(8) for p in glob.glob(
         os.path.join(d, "arrays", "**", "d", "*"), recursive=True)],
     "corrupt or incomplete: its arrays cannot be read"),
    ("arrays removed", lambda d: shutil.rmtree(os.path.join(d, "arrays")),
     "corrupt or incomplete: its arrays cannot be read"),
    ("history garbled", _garble_all("history/**/d/*"),
     "corrupt or incomplete: its arrays cannot be read"),
]


@pytest.mark.parametrize("name,corrupt,message", CORRUPTIONS,
                         ids=[c[0] for c in CORRUPTIONS])
def test_corrupt_checkpoint_gives_clear_error(tmp_path, name, corrupt,
                                              message):
  del name
  tx, p0 = _saved_run(tmp_path)
  corrupt(os.path.join(tmp_path, "5"))
  with pytest.raises(checkpoint.CheckpointError, match=message):
    checkpoint.restore(tmp_path, p0, tx.init(p0))


def test_missing_or_mismatched_checkpoint_errors(tmp_path):
  tx, p0 = _saved_run(tmp_path / "run")
  with pytest.raises(checkpoint.CheckpointError,
                     match="no checkpoint directory .*nothing was saved"):
    checkpoint.restore(tmp_path / "elsewhere", p0, tx.init(p0))
  (tmp_path / "empty").mkdir()
  with pytest.raises(checkpoint.CheckpointError,
                     match="no complete checkpoint in"):
    checkpoint.restore(tmp_path / "empty", p0, tx.init(p0))
  assert checkpoint.latest_step(tmp_path / "empty") is None
  assert checkpoint.latest_step(tmp_path / "elsewhere") is None
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"no checkpoint for step 9 .*steps \[5\]"):
    checkpoint.restore(tmp_path / "run", p0, tx.init(p0), step=9)
  other = jbl.BilevelParams(jnp.zeros(3, jnp.float32), p0.y)
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"params.x was saved with shape \(\) .*\(3,\)"):
    checkpoint.restore(tmp_path / "run", other, tx.init(p0))
  sgd_tx = jbl.pbgd_free(lambda x, y, b: x ** 2 + y,
                         lambda x, y, b: (y - x) ** 2, gamma=1.0,
                         upper_optimizer=optax.sgd(0.1),
                         lower_optimizer=optax.sgd(0.1))
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"structure of the template.*upper_state\[0\]\.mu"):
    checkpoint.restore(tmp_path / "run", p0, sgd_tx.init(p0))
  with pytest.raises(checkpoint.CheckpointError,
                     match="already holds a checkpoint for step 5"):
    checkpoint.save(tmp_path / "run", p0, tx.init(p0), step=5)
  with pytest.raises(checkpoint.CheckpointError, match="beyond num_steps=3"):
    checkpoint.resumable_run(tx, p0, num_steps=3, directory=tmp_path / "run",
                             save_every=1)
  checkpoint.save(tmp_path / "bare", p0, tx.init(p0), step=4)
  with pytest.raises(checkpoint.CheckpointError, match="has no history"):
    checkpoint.resumable_run(tx, p0, num_steps=8, directory=tmp_path / "bare",
                             save_every=4)


# The subprocesses below start with _SMALL_TX and _SMALL_P0 of this module.
_SMALL_PROBLEM_SCRIPT = textwrap.dedent("""
    import os, sys
    import jax, jax.numpy as jnp, optax
    jax.config.update("jax_enable_x64", True)  # as in tests/conftest.py
    import jaxbilevel as jbl
    from jaxbilevel import checkpoint
    from orbax.checkpoint._src.path import async_path

    f = lambda x, y, batch: x ** 2 + 10.0 * y
    g = lambda x, y, batch: (y - x + 1.0) ** 2
    tx = jbl.pbgd_free(f, g, gamma=15.0, upper_optimizer=optax.adam(0.01),
                       lower_optimizer=optax.sgd(0.01))
    p0 = jbl.BilevelParams(jnp.float32(2.0), jnp.float32(3.0))
""")

_CRASH_SCRIPT = _SMALL_PROBLEM_SCRIPT + textwrap.dedent("""
    params, state, hist = jbl.run(tx, p0, num_steps=10)
    checkpoint.save(sys.argv[1], params, state, step=10, history=hist,
                    max_to_keep=1)
    real_rename = async_path.rename

    async def die_at_commit(src, dst):
      if os.path.basename(str(dst)) == "20":  # the final rename of step 20
        os._exit(17)                         # the process is killed here
      return await real_rename(src, dst)

    async_path.rename = die_at_commit
    params, state, hist = jbl.run(tx, params, state=state, num_steps=10)
    checkpoint.save(sys.argv[1], params, state, step=20, history=hist,
                    max_to_keep=1)
""")


def test_killed_save_keeps_last_good_checkpoint(tmp_path):
  """A process killed while writing step 20 leaves step 10 intact (max_to_keep=1)."""
  directory = str(tmp_path / "run")
  proc = subprocess.run([sys.executable, "-c", _CRASH_SCRIPT, directory],
                        capture_output=True, text=True, timeout=120,
                        check=False)
  assert proc.returncode == 17, proc.stderr[-2000:]
  assert sorted(os.listdir(directory)) == ["10", "20.orbax-checkpoint-tmp"]
  assert checkpoint.latest_step(directory) == 10

  tx, p0 = _SMALL_TX, _SMALL_P0
  restored = checkpoint.restore(directory, p0, tx.init(p0))
  expected = jbl.run(tx, p0, num_steps=10)
  assert restored.step == 10
  _assert_identical((restored.params, restored.state),
                    (expected[0], expected[1]))
  # The run goes on: the next save replaces the debris of the killed one.
  final = checkpoint.resumable_run(tx, p0, num_steps=20, directory=directory,
                                   save_every=10, max_to_keep=1)
  assert sorted(os.listdir(directory)) == ["20"]
  _assert_identical(final, jbl.run(tx, p0, num_steps=20, chunk_size=10))


def test_failed_save_in_process_keeps_previous(tmp_path, monkeypatch):
  tx, p0 = _saved_run(tmp_path)
  from orbax.checkpoint._src.path import async_path  # pylint: disable=g-import-not-at-top

  async def broken(src, dst):
    raise OSError(f"disk full while renaming {src} -> {dst}")

  monkeypatch.setattr(async_path, "rename", broken)
  with pytest.raises(checkpoint.CheckpointError,
                     match="saving step 6 .* failed .*disk full.*untouched"):
    checkpoint.save(tmp_path, p0, tx.init(p0), step=6, max_to_keep=1)
  monkeypatch.undo()
  assert checkpoint.latest_step(tmp_path) == 5
  assert checkpoint.restore(tmp_path, p0, tx.init(p0)).step == 5


# ---------------------------------------------------------------------------
# Interrupts and untrusted checkpoints.
# ---------------------------------------------------------------------------


class _InterruptInFinalizer:
  """Sends SIGINT to this process from ``__del__`` and waits for it there.

  Python runs the signal handler inside ``__del__``, where the
  ``KeyboardInterrupt`` it raises is printed and dropped: the way a Ctrl-C
  that lands in a finalizer or in one of orbax's ``except BaseException``
  blocks used to be swallowed.
  """

  def __del__(self):
    os.kill(os.getpid(), signal.SIGINT)
    for _ in range(1000):
      time.sleep(0.001)


def _rename_hook(monkeypatch, step, action):
  """Runs ``action()`` when orbax renames the temporary dir of ``step``."""
  from orbax.checkpoint._src.path import async_path  # pylint: disable=g-import-not-at-top
  real_rename = async_path.rename

  async def rename(src, dst):
    if os.path.basename(str(dst)) == str(step):
      action()
    return await real_rename(src, dst)

  monkeypatch.setattr(async_path, "rename", rename)


@pytest.fixture
def interactive_sigint():
  """Ctrl-C raises KeyboardInterrupt, as in a terminal or a notebook.

  A job started in the background by a non-interactive shell (``cmd &``)
  begins with SIGINT ignored, and Python then leaves it ignored.
  """
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  yield
  signal.signal(signal.SIGINT, previous)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_sigint_during_save_stops_the_run(tmp_path, monkeypatch,
                                          interactive_sigint):
  del interactive_sigint
  tx, p0 = _SMALL_TX, _SMALL_P0
  _rename_hook(monkeypatch, 20, lambda: _InterruptInFinalizer() and None)
  with pytest.raises(KeyboardInterrupt):
    checkpoint.resumable_run(tx, p0, num_steps=40, directory=tmp_path,
                             save_every=10)
  monkeypatch.undo()
  # Held back until step 20 was complete, then raised: the run stopped there.
  assert sorted(os.listdir(tmp_path)) == ["10", "20"]
  expected = jbl.run(tx, p0, num_steps=20, chunk_size=10)
  restored = checkpoint.restore(tmp_path, p0, tx.init(p0))
  assert restored.step == 20
  _assert_identical((restored.params, restored.state), expected[:2])
  _assert_identical(checkpoint.restore(tmp_path, p0, tx.init(p0),
                                       step=10).params,
                    jbl.run(tx, p0, num_steps=10)[0])


def test_keyboard_interrupt_inside_save_cleans_up(tmp_path, monkeypatch):
  tx, p0 = _saved_run(tmp_path)

  def interrupt():
    raise KeyboardInterrupt

  _rename_hook(monkeypatch, 6, interrupt)
  with pytest.raises(KeyboardInterrupt):
    checkpoint.save(tmp_path, p0, tx.init(p0), step=6)
  monkeypatch.undo()
  assert sorted(os.listdir(tmp_path)) == ["5"]  # no temporary debris
  assert checkpoint.restore(tmp_path, p0, tx.init(p0)).step == 5


def _edit_meta(step_dir, edit, *, rehash):
  path = os.path.join(step_dir, "meta", "metadata")
  with open(path, encoding="utf-8") as fh:
    meta = json.load(fh)
  edit(meta)
  if rehash:  # an editor who also recomputes the checksum
    # pylint: disable-next=protected-access
    meta["checksum"] = checkpoint_src._meta_digest(meta)
  with open(path, "w", encoding="utf-8") as fh:
    json.dump(meta, fh)


def _set(key, value):
  def edit(meta):
    meta[key] = value
  return edit


def _set_key(field, value):
  def edit(meta):
    meta["key"][field] = value
  return edit


HOSTILE_META = [
    ("step edited", _set("step", 500), False,
     "invalid metadata .*meta/metadata.*checksum does not match"),
    ("step edited, checksum redone", _set("step", 500), True,
     "invalid metadata .*meta/metadata.*records step 500 but is stored as "
     "step 5"),
    ("huge key shape", _set_key("shape", [10 ** 12, 2]), True,
     "key shape .* larger than any PRNG key"),
    ("object key dtype", _set_key("dtype", "object"), True,
     "key dtype 'object' is not an integer dtype"),
    ("unknown PRNG", _set_key("impl", "no_such_prng"), True,
     "PRNG implementation 'no_such_prng' is unknown"),
    ("key shape of another PRNG", _set_key("shape", [4]), True,
     r"key data of shape \[4\] .* do not fit the PRNG implementation"),
    ("params missing", lambda meta: meta.pop("params"), True,
     "the params entry is missing or malformed"),
    ("state malformed", _set("state", [["x", [-1], "float32"]]), True,
     "the state entry is missing or malformed"),
    ("has_history not a bool", _set("has_history", "yes"), True,
     "has_history is 'yes'"),
]


@pytest.mark.parametrize("name,edit,rehash,message", HOSTILE_META,
                         ids=[h[0] for h in HOSTILE_META])
def test_edited_or_hostile_metadata_is_refused(tmp_path, name, edit, rehash,
                                               message):
  del name
  tx, p0 = _SMALL_TX, _SMALL_P0
  checkpoint.save(tmp_path, p0, tx.init(p0), step=5,
                  key=jax.random.key(1))
  _edit_meta(os.path.join(tmp_path, "5"), edit, rehash=rehash)
  with pytest.raises(checkpoint.CheckpointError, match=message):
    checkpoint.restore(tmp_path, p0, tx.init(p0))


def test_resuming_with_another_method_names_the_method(tmp_path):
  tx, p0 = _saved_run(tmp_path)  # PBGD-Free
  other = jbl.alt_pbgd(lambda x, y, batch: x ** 2 + 10.0 * y,
                       lambda x, y, batch: (y - x + 1.0) ** 2, gamma=15.0,
                       upper_optimizer=optax.adam(0.01),
                       lower_optimizer=optax.sgd(0.01))
  del tx
  with pytest.raises(checkpoint.CheckpointError,
                     match="another method: it was saved with a "
                     "PBGDFreeState, the template state is a ALTPBGDState"):
    checkpoint.restore(tmp_path, p0, other.init(p0))
  with pytest.raises(checkpoint.CheckpointError, match="another method"):
    checkpoint.resumable_run(other, p0, num_steps=10, directory=tmp_path,
                             save_every=5)


def test_incomplete_step_directories_are_ignored(tmp_path):
  tx, p0 = _saved_run(tmp_path)
  os.mkdir(os.path.join(tmp_path, "9"))  # empty, named like a step
  os.makedirs(os.path.join(tmp_path, "12", "arrays"))  # a half copy
  assert checkpoint.latest_step(tmp_path) == 5
  assert checkpoint.restore(tmp_path, p0, tx.init(p0)).step == 5
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"steps \[5\] \(incomplete ones, ignored: "
                     r"\[9, 12\]"):
    checkpoint.restore(tmp_path, p0, tx.init(p0), step=9)
  # Orbax would refuse to save below them: the half copy is reported, an
  # empty one is removed.
  with pytest.raises(checkpoint.CheckpointError,
                     match="12 is named like a checkpoint but is not a "
                     "complete one"):
    checkpoint.save(tmp_path, p0, tx.init(p0), step=9)
  shutil.rmtree(os.path.join(tmp_path, "12"))
  checkpoint.save(tmp_path, p0, tx.init(p0), step=9)
  assert checkpoint.restore(tmp_path, p0, tx.init(p0)).step == 9
  assert sorted(os.listdir(tmp_path)) == ["5", "9"]


_SIGINT_TRIALS_SCRIPT = _SMALL_PROBLEM_SCRIPT + textwrap.dedent("""
    import random, signal, tempfile, threading, time
    # As in a terminal, also when the tests run as a background job.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    real_rename = async_path.rename
    armed = []

    async def rename(src, dst):  # SIGINT a few ms into the 2nd save's commit
      if os.path.basename(str(dst)) == "20" and not armed:
        armed.append(True)
        delay = random.uniform(0.0, 0.02)
        threading.Timer(delay, os.kill, (os.getpid(), signal.SIGINT)).start()
      return await real_rename(src, dst)

    async_path.rename = rename
    random.seed(0)
    outcomes = []
    for trial in range(8):
      armed.clear()
      directory = tempfile.mkdtemp()
      try:
        checkpoint.resumable_run(tx, p0, num_steps=60, directory=directory,
                                 save_every=10)
        outcomes.append("went-on")
      except KeyboardInterrupt:
        time.sleep(0.05)
        step = checkpoint.latest_step(directory)
        checkpoint.restore(directory, p0, tx.init(p0))
        debris = [n for n in os.listdir(directory) if "tmp" in n]
        outcomes.append(f"stopped@{step}" + ("+debris" if debris else ""))
    print("OUTCOMES", " ".join(outcomes))
""")


@pytest.mark.slow
def test_sigint_at_random_moments_of_a_save_always_stops_the_run():
  """8 real SIGINTs during saves: every run stops with a readable checkpoint."""
  proc = subprocess.run([sys.executable, "-c", _SIGINT_TRIALS_SCRIPT],
                        capture_output=True, text=True, timeout=300,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  outcomes = proc.stdout.split("OUTCOMES")[-1].split()
  assert len(outcomes) == 8
  # Stopped (at the save that the signal hit, or at the next one if it came
  # during the computation), with no temporary directory left behind.
  assert all(o in ("stopped@20", "stopped@30") for o in outcomes), outcomes


def _small_pbgd_free(gamma):
  return jbl.pbgd_free(lambda x, y, batch: x ** 2 + 10.0 * y,
                       lambda x, y, batch: (y - x + 1.0) ** 2, gamma=gamma,
                       upper_optimizer=optax.adam(0.01),
                       lower_optimizer=optax.sgd(0.01))


def test_resuming_with_other_hyperparameters_is_refused(tmp_path):
  checkpoint.resumable_run(_small_pbgd_free(10.0), _SMALL_P0, num_steps=4,
                           directory=tmp_path, save_every=2)
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"saved with gamma=10.0, and this call has "
                           r"gamma=1000.0; resuming would return one run "
                           r"made with two settings. Pass gamma=10.0 to "
                           r"continue that run, or use a new directory"):
    checkpoint.resumable_run(_small_pbgd_free(1000.0), _SMALL_P0,
                             num_steps=6, directory=tmp_path, save_every=2)
  assert checkpoint.latest_step(tmp_path) == 4  # nothing was written
  # The same value (a new transformation object) resumes.
  _, state, hist = checkpoint.resumable_run(
      _small_pbgd_free(10.0), _SMALL_P0, num_steps=6, directory=tmp_path,
      save_every=2)
  assert int(state.count) == 6 and hist["step"].tolist() == list(range(6))


def test_resuming_with_other_diagnostics_names_diagnostics(tmp_path):
  tx = _small_pbgd_free(10.0)
  checkpoint.resumable_run(tx, _SMALL_P0, num_steps=4, directory=tmp_path,
                           save_every=2)
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"saved with diagnostics=False, and this call has "
                           r"diagnostics=True; .* Pass diagnostics=False"):
    checkpoint.resumable_run(tx, _SMALL_P0, num_steps=6, directory=tmp_path,
                             save_every=2, diagnostics=True)
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"saved without a record= function, and this call "
                           r"has one"):
    checkpoint.resumable_run(tx, _SMALL_P0, num_steps=6, directory=tmp_path,
                             save_every=2,
                             record=lambda params, state: params.x)


def test_history_mismatch_without_saved_settings_names_diagnostics(tmp_path):
  # Checkpoints written by save() alone carry no settings: the history's
  # keys tell which option differs.
  params, state, hist = jbl.run(_SMALL_TX, _SMALL_P0, num_steps=5)
  checkpoint.save(tmp_path, params, state, step=5, history=hist)
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"another diagnostics= .* Pass the diagnostics= "
                           r"of that run"):
    checkpoint.resumable_run(_SMALL_TX, _SMALL_P0, num_steps=7,
                             directory=tmp_path, save_every=2,
                             diagnostics=True)


def test_restore_step_must_be_an_int(tmp_path):
  tx, p0 = _saved_run(tmp_path)
  with pytest.raises(jbl.BilevelValidationError,
                     match=r"restore: step must be an int .* got '5' of type "
                           r"str"):
    checkpoint.restore(tmp_path, p0, tx.init(p0), step="5")
  assert checkpoint.restore(tmp_path, p0, tx.init(p0),
                            step=np.int64(5)).step == 5
