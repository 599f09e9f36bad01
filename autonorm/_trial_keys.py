"""Names of what autonorm stores on Optuna studies and trials.

The callback writes them, the search and the workers write and read them, the report and the
progress display read them: one spelling, here.
"""

from __future__ import annotations

#: ``study.user_attrs[STUDY_INFO]``: the settings that define the study (monitor, mode, budget,
#: space, model class, slots, ...).
STUDY_INFO = "autonorm"

# -- trial user attributes ----------------------------------------------------------------------
#: the trial's per-slot choices, ``{slot name: choice value}``.
CONFIG = "config"
#: the choices the trial's SwitchableNorm layers weighed highest at its last epoch,
#: ``{slot name: choice value}`` (per-slot evidence for refinement).
SWITCHABLE_CHOICES = "switchable_choices"
#: False when the trial broke the budget (also recorded as an Optuna constraint).
FEASIBLE = "feasible"
#: why an infeasible trial broke the budget.
INFEASIBLE_REASON = "infeasible_reason"
#: why a trial was pruned (by the pruner, a non-finite metric, or infeasibility).
PRUNE_REASON = "prune_reason"
#: epochs the trial trained.
EPOCHS = "epochs"
#: the warm-start label of an enqueued trial (``own norms``, ``uniform:batchnorm``, ...).
BASELINE = "baseline"
#: parameter count of the rewritten model.
N_PARAMS = "n_params"
#: peak memory per training step (bytes), median step time (s), how memory was measured.
PEAK_MEMORY = "peak_memory"
STEP_TIME = "step_time"
MEMORY_METHOD = "memory_method"
#: bytes of activations saved for backward in a training step (part of the CPU estimate).
ACTIVATION_BYTES = "activation_bytes"
#: the per-device batch size the trial really trained at (its first training batch).
BATCH_SIZE = "batch_size"
#: the worker running the trial and its last heartbeat.
WORKER = "worker"
HEARTBEAT = "heartbeat"
#: why a trial was marked FAIL (interrupt, lost worker).
FAIL_REASON = "fail_reason"
#: the number of the trial whose parameters this retry runs again.
RETRY_OF = "retry_of"
#: the stage of the staged search that planned the trial (``screen``, ``promote``, ...).
STAGE = "stage"
#: a screening trial stops after this many epochs (a low-fidelity rung, recorded as PRUNED).
RUNG_EPOCHS = "rung_epochs"
#: the refinement round of a ``refine`` or ``promote`` trial (0: the baseline screen).
ROUND = "round"
#: the finished trial whose result this trial reused instead of training the same config again.
REUSED_FROM = "reused_from"
#: which run of its config a trial is (0, 1, ...): the k-th run of every config trains with the
#: same seed, so that configs are compared by paired differences (common random numbers).
RUN_INDEX = "run_index"
#: the screened trial whose rung checkpoint a promoted trial continues, and the epochs that
#: trial already trained (the promoted trial trains only the rest of the schedule).
CONTINUES = "continues"
START_EPOCH = "start_epoch"
#: On the trials of a config the search keeps unless the evidence says another is better, how
#: strongly it is kept: :data:`OWN_NORMS_GUARD` (the model's own norms; ``True`` in older
#: studies) or :data:`DEFAULT_GUARD` (a config the user named as the default, which only the
#: evidence replaces, the own norms included).
INCUMBENT = "incumbent"
OWN_NORMS_GUARD = 1
DEFAULT_GUARD = 2
#: What the staged plan stores on a trial it enqueues: a retry of the trial keeps all of it.
PLANNED = (STAGE, RUNG_EPOCHS, ROUND, RUN_INDEX, CONTINUES, START_EPOCH, INCUMBENT)

# -- study user attributes ----------------------------------------------------------------------
#: the seed of the study's first runs when the search was given none (``seed=None``): drawn
#: once when the study is created, so that every config's k-th run still shares its seed.
RUN_SEED = "run_seed"

#: per-slot evidence by perturbation of a screened uniform-SwitchableNorm trial's model: each
#: slot's chosen native choice ``{slot: choice value}``, the metric per slot and candidate
#: (with the base and joint metrics), and the validation passes it cost.
PERTURBED_CHOICES = "perturbed_choices"
PERTURBATION = "perturbation"
PERTURBATION_PASSES = "perturbation_passes"

#: the Optuna constraint name of the budget (> 0: infeasible).
BUDGET_CONSTRAINT = "budget"
