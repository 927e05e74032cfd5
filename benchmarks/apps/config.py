"""The applications and the budgets of the full and quick modes."""

from __future__ import annotations

import os
from typing import NamedTuple

from jaxbilevel.applications import dpo_sft
from jaxbilevel.applications import hyper_cleaning
from jaxbilevel.applications import nlsy
from jaxbilevel.applications import regularization
from jaxbilevel.applications import sinusoid

from .harness import Budget

APPS = ("hyper_cleaning", "regularization", "nlsy", "dpo_sft", "sinusoid")


class Mode(NamedTuple):
  budgets: dict
  hyper_cleaning: dict
  nlsy_batch: int
  nlsy_hidden: int
  dpo: dict
  sinusoid: dict
  sweep_axis: int
  sweep_steps: int
  scaling_rs: tuple
  scaling_steps: int
  implicit_batches: int = 20
  repeats: int = 7
  stage2_steps: int = 300


FULL = Mode(
    budgets=dict(hyper_cleaning=Budget(10.0, 10 ** 6, 20, timing_chunk=200),
                 regularization=Budget(5.0, 10 ** 6, 50, timing_chunk=1000),
                 nlsy=Budget(20.0, 10 ** 6, 20),
                 dpo_sft=Budget(25.0, 10 ** 6, 10),
                 sinusoid=Budget(15.0, 10 ** 6, 50)),
    hyper_cleaning=dict(),
    nlsy_batch=500, nlsy_hidden=200,
    dpo=dict(pretrain_steps=3000),
    sinusoid=dict(meta_batch=25, num_eval_tasks=1000),
    sweep_axis=16, sweep_steps=100, scaling_rs=(1, 5, 10, 20),
    scaling_steps=20)

QUICK = Mode(
    budgets=dict(hyper_cleaning=Budget(0.2, 60, 10, 2),
                 regularization=Budget(0.2, 60, 10, 2),
                 nlsy=Budget(0.2, 40, 5, 2),
                 dpo_sft=Budget(0.2, 20, 5, 2),
                 sinusoid=Budget(0.2, 40, 5, 2)),
    hyper_cleaning=dict(num_train=200, num_val=100),
    nlsy_batch=50, nlsy_hidden=16,
    dpo=dict(pretrain_steps=50, config=dpo_sft.LMConfig(d_model=16,
                                                        num_layers=1,
                                                        num_heads=2),
             num_train=64, num_eval=32, batch_size=8),
    sinusoid=dict(meta_batch=4, num_eval_tasks=50, hidden=16),
    sweep_axis=16, sweep_steps=10, scaling_rs=(2,), scaling_steps=5,
    implicit_batches=2, repeats=3, stage2_steps=5)


def build_app(name, mode: Mode, args):
  """The application and notes about its data."""
  if name == "hyper_cleaning":
    return hyper_cleaning.problem(seed=args.seed, **mode.hyper_cleaning), {}
  if name == "regularization":
    return regularization.problem(seed=args.seed), {}
  if name == "nlsy":
    # The full file from --data-dir or $JAXBILEVEL_DATA; the notes name it
    # without the folder (the results carry no paths of the machine).
    name_csv = "nlsy79_processed.csv"
    path = os.path.join(args.data_dir, name_csv) if args.data_dir else None
    note = {}
    if args.quick and not args.data_dir_given:
      path = nlsy.sample_path()
      note["data"] = "the 200-row sample shipped with jaxbilevel (quick mode)"
    elif path is None:
      note["data"] = ("no data folder (--data-dir or JAXBILEVEL_DATA): ran on "
                      "the 200-row sample shipped with jaxbilevel")
      path = nlsy.sample_path()
    elif not os.path.isfile(path):
      note["data"] = (f"{name_csv} not in the data folder: ran on the "
                      "200-row sample shipped with jaxbilevel instead")
      path = nlsy.sample_path()
    else:
      note["data"] = f"{name_csv} (the full NLSY79 file, from the data folder)"
    return nlsy.problem(path, seed=args.seed, batch_size=mode.nlsy_batch,
                        hidden=mode.nlsy_hidden), note
  if name == "dpo_sft":
    app = dpo_sft.problem(seed=args.seed, **mode.dpo)
    pre = app.info["pretraining"]
    return app, dict(start_accuracy=(
        "at the start the policy equals the reference, so the reward margins "
        "are float noise (about 1e-8) and the preference accuracy is a coin "
        "flip"),
                     pretraining_seconds=pre["seconds"],
                     pretraining_steps=pre["steps"],
                     pretraining_final_loss=pre["final_loss"],
                     adapter_params=app.info["num_adapter_params"],
                     head_params=app.info["num_head_params"],
                     backbone_params=app.info["num_backbone_params"],
                     model=app.info["config"])
  if name == "sinusoid":
    return sinusoid.problem(seed=args.seed, **mode.sinusoid), {}
  raise ValueError(name)



DESCRIPTIONS = dict(
    hyper_cleaning="Data hyper-cleaning on sklearn digits: "
    "x = per-sample weight logits, y = linear softmax classifier, half the "
    "training labels moved to a different class. Upper loss: validation "
    "cross-entropy; F1: kept samples (sigmoid(x) > 1/2) vs clean samples.",
    regularization="Per-feature L2 regularisation of logistic regression on "
    "sklearn breast cancer: x = log strengths (30), y = classifier. "
    "Implicit differentiation (AID, jaxopt) is the natural reference; peers "
    "run the same problem, data and optimizers.",
    nlsy="NLSY79 fair representation: x = MLP 21-200-200 feature "
    "extractor, y = linear head, f = MSE on group 0, g = MSE on group 1, "
    "500 samples per group per step, fixed seeds. Upper loss: group-0 test "
    "MSE.",
    dpo_sft="DPO (upper, over LoRA r=4 adapters on attention query/value) / "
    "SFT (lower, over the untied output head) of a small flax transformer LM "
    "pre-trained inside the benchmark on a synthetic language "
    "(jaxbilevel.applications.dpo_sft), equal wall-time budget as in "
    "the PBGD-Free LLM experiment. Upper loss: evaluated DPO loss (log 2 at the start: "
    "policy = reference). Stage 2 (S2, transfer): x frozen, the head re-fit "
    "by 300 Adam steps on the other half of the SFT rows; *S2 eval DPO* is "
    "the DPO loss with that head, *S2 train SFT* its SFT loss on those "
    "rows.",
    sinusoid="Few-shot sinusoid regression: x = initialisation of an MLP "
    "1-40-40-1, y = per-task offsets adapted by r = 5 SGD steps (alpha = "
    "0.01) on support MSE + prox, meta-batch 25, 10 shots. Upper loss: "
    "meta-test query MSE after adaptation on held-out tasks.")

