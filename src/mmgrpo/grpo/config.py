"""The mmGRPO run configuration: one documented dataclass, written in sections.

Files (TOML or YAML), ``--set section.key=value`` and ``mmgrpo.optimize(config=...)`` use the
sections of ``SECTIONS``: [model], [task], [rollout], [grpo], [prompts], [run]. Unknown keys,
keys in the wrong section and values of the wrong type are errors that name the key.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..models import DTYPES, SAMPLER_DTYPES
from .groups import DENOMINATORS, LEVELS, MODES
from .loss import LOSSES

TIS_CAP = 2.0  # tis_cap = "auto": the cap where sampler and learner differ (TRL's vllm_importance_sampling_cap)
SCHEDULES = ("constant", "linear", "cosine")
KERNELS = ("auto", "packed", "cache")
PROMPT_OPTIMIZERS = ("bootstrap", "mipro", "gepa")
TRACKERS = ("tensorboard", "wandb", "mlflow")

@dataclass
class TrainConfig:
    # --- what to train -------------------------------------------------------------------
    model: str = "smollm2-135m"
    """Embedded model name, local folder, or Hugging Face id."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N. auto: CUDA where a GPU is visible, else CPU."""
    dtype: str = "auto"
    """auto | float32 | bfloat16 | float16: the model's dtype, in which the update runs. auto: bfloat16 on
    a GPU that has it, else float32. On a CPU with native bf16 a bfloat16 update is faster but the demo
    learned less in it (docs/performance.md); there sampler_dtype puts bf16 where it is safe. The LoRA
    weights, optimizer state, log-probs and loss are float32 in every case."""
    sampler_dtype: str = "auto"
    """auto | model | float32 | bfloat16 | float16: the dtype of a second copy of the weights that samples
    the rollouts and evaluations (the adapter merged in, refreshed after each update), while the update
    runs in ``dtype``. model: no copy, the model samples. auto: bfloat16 for a float32 model on a CPU
    with native bf16 (avx512_bf16, amx_bf16), where rollouts and dev run ~1.5x faster and the demo
    learned as in float32 over 3 seeds (docs/performance.md); elsewhere the model samples. Where a
    copy samples, tis_cap = "auto" corrects for it, and the adapter-off variant (an outside LM, a
    judge) samples the base weights in that dtype."""
    task: str = "banking77"
    """Task by name (see `mmgrpo.tasks.TASKS`); ignored when `program` is set."""
    task_options: dict = field(default_factory=dict)
    """Options passed to the task's constructor (e.g. n_labels, n_demos for banking77)."""
    program: str | None = None
    """Your own program instead of a task: an import path ('my_pkg.mod:make_program') of a Program
    subclass or a factory called with no arguments."""
    metric: str | None = None
    """With `program`: import path of the metric, metric(example, prediction) -> float (reported)."""
    reward: str | None = None
    """With `program`: import path of the training reward; unset = the metric."""
    train_data: str | None = None
    """With `program`: a JSONL file of training examples, one object per line (the program's input
    fields, gold fields, optional id)."""
    dev_data: str | None = None
    """With `program`: a JSONL file of dev examples (evaluation during training)."""
    test_data: str | None = None
    """With `program`: an optional JSONL file of held-out test examples."""
    prompts: str | None = None
    """A JSON file of optimized prompts (program.prompt_state()) to train with."""
    strategy: str = "weights"
    """Steps in order, e.g. "prompts -> weights". Steps: prompts (= `prompt_optimizer`), bootstrap
    (few-shot demos + random search), mipro (instruction proposals + demo sets, Optuna TPE), gepa
    (reflective instruction evolution), weights (mmGRPO on the program with the prompts it has by then)."""
    prompt_optimizer: str = "mipro"
    """What the `prompts` step runs: bootstrap, mipro or gepa."""
    prompt_candidates: int = 6
    """bootstrap: demo sets tried; mipro: demo sets per module (the first is the program as it is)."""
    prompt_max_demos: int = 4
    """bootstrap, mipro: demos per module."""
    prompt_demo_threshold: float = 1.0
    """bootstrap, mipro: a training run's calls become demos when its metric is >= this. 1.0 suits
    pass/fail metrics (exact match, all gold titles found); a graded metric may never reach it (PUPA's
    quality + privacy score tops out near 0.6), leaving the search no demos: lower it there."""
    prompt_train_examples: int = 50
    """bootstrap, mipro: training examples run to bootstrap demos from; gepa: its training set."""
    prompt_val_examples: int = 0
    """The search's validation set: > 0 scores the candidates on this many training examples after
    the first `prompt_train_examples` (held apart from the demo pool), so dev stays unbiased for
    judging the prompts found and for choosing the adapter trained after them; 0 = on dev, which then
    both picks the prompts and judges them (the winner's curse: dev reads high after a search)."""
    prompt_instructions: int = 4
    """mipro: instructions per module (the current one and up to n - 1 proposals)."""
    prompt_trials: int = 10
    """mipro: TPE trials, each scored on a minibatch of the search's validation set (dev unless
    `prompt_val_examples`; the first trial is the program as it is)."""
    prompt_minibatch: int = 20
    """mipro: validation examples per trial; gepa: examples per reflection minibatch is min(4, this)."""
    prompt_top_k: int = 3
    """mipro: configurations re-scored on the whole validation set, the best of them wins: the best by
    minibatch score, with the program as it was taking the last place if it is not among them
    (so 1 keeps the starting prompts)."""
    gepa_metric_calls: int = 150
    """gepa: budget of program runs (its stopping condition)."""
    proposer_url: str | None = None
    """mipro, gepa: an OpenAI-compatible endpoint (e.g. http://127.0.0.1:8000/v1) for the LM that
    proposes or reflects on instructions; unset = the policy model itself."""
    proposer_model: str = "default"
    """The model name sent to `proposer_url` (its API key is read from OPENAI_API_KEY)."""
    train_with_demos: bool = True
    """weights: the update sees exactly the prompts used in rollouts (true), or each module's
    instruction and input without its demos (false; the reference implementation's option). With
    false the update's prompts were never sampled: the tokens are weighted by truncated importance
    sampling, min(p(token | prompt without demos) / p_sampler(token | prompt with demos), cap), which
    `tis_cap = "auto"` then turns on."""
    seed: int = 0
    """Seeds data order, sampling and initialisation: on CPU the same seed gives the same run."""

    # --- the step ------------------------------------------------------------------------
    steps: int = 20
    """Number of mmGRPO steps (one update each)."""
    batch_examples: int = 4
    """Training examples per step (B)."""
    group_size: int = 8
    """Rollouts of the whole program per example (G)."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts; the update's log-probs are of logits / temperature,
    the distribution the tokens were drawn from."""
    top_p: float = 1.0
    """Nucleus sampling of the rollouts. The recorded and trained log-probs are of the full
    tempered distribution (lm/base.py), so below 1 they differ from the truncated sampler's:
    keep 1 for an exact policy gradient; the gap shows as mismatch_mean."""
    max_tokens: int = 64
    """Completion token budget of each LM call; a module's own max_tokens may only lower it."""
    concurrency: int = 32
    """Programs run at once during rollouts (their LM calls are batched together)."""
    format_failure_score: float = -1.0
    """Reward of a trajectory whose LM reply did not parse."""
    failure_score: float = 0.0
    """Score of a trajectory that raised any other error, in evaluation. In training such a
    trajectory joins no group (an outage is not a bad answer) and is counted in n_error."""
    max_error_rate: float = 0.5
    """A step whose fraction of error rollouts is above this stops the run (resumable) before
    anything is trained on it, with the most common error in the message."""
    deterministic: bool = True
    """Rollout batches hold one request of every running program, in a fixed order, so the
    sampled tokens do not depend on timing: on CPU the same seed gives the same run even on a
    busy machine. False starts a batch after 50 ms without waiting for every program."""
    continuous_batching: bool = False
    """In-process rollouts: a finished reply's batch slot is refilled by the next waiting call
    instead of the batch waiting for its longest row. Each row draws from its own seed either way
    (the same tokens up to float rounding of batched logits); only the speed differs. Off by default:
    on the 2-core CPU it was 0.94-0.97x the static rate for Banking77 rollouts
    (benchmarks/rollout_throughput.py measures both); it can pay where reply lengths vary widely."""
    prefill_tokens: int = 8192
    """In-process rollouts: a prefill chunk (up to 8 prompts of a batch, sorted by length) holds
    at most this many padded tokens, so one long prompt is prefilled with fewer rows beside it
    instead of padding 8 rows to its length. Prompts that fit leave batching unchanged. 0: rows only.
    One PAPILLON step with a 4,276-token prompt among 16 programs: peak memory 0.59x, time 0.78x,
    the same completions (benchmarks/rollout_long_prompts.py)."""
    servers: list[str] = field(default_factory=list)
    """Policy servers that sample the rollouts and dev evaluations, e.g. ["http://127.0.0.1:8000/v1"]:
    `vllm serve MODEL --enable-lora --logprobs-mode processed_logprobs` (with
    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True) or `mmgrpo serve --model MODEL`, serving the same base
    model as [model] name. Empty: in-process. Each prompt goes to one server (by its hash: an example's G
    samples share one server's prefix cache); after
    each update the adapter is written to `adapter_dir` and loaded on every server under a new name."""
    server_model: str | None = None
    """The base model's name on the servers; unset = the first model their /v1/models lists."""
    adapter_dir: str | None = None
    """A folder the servers can read, where each policy version's adapter is written; unset =
    RUN/policy (fine when the servers share this machine's file system)."""
    request_timeout_s: float = 300.0
    """Seconds one request to a policy server may take."""
    request_retries: int = 3
    """Retries of a failed request (connection error, 429, 5xx), with exponential backoff from
    `request_backoff_s`; then the step stops, resumable, with nothing trained on it."""
    request_backoff_s: float = 1.0
    """First backoff between retries, doubled after each."""
    workers: int = 0
    """Rollout workers: Ray actors that run the program (its tools, retrieval, outside LMs) and
    call the policy through `servers` (needed with workers > 0). 0 = rollouts in this process.
    Needs `pip install 'mmgrpo[ray]'`; the program and metric must be importable on the workers."""
    ray_address: str | None = None
    """The Ray cluster to use ("auto", "ray://HOST:10001"); unset = start a local one."""

    # --- grouping and advantages --------------------------------------------------------
    grouping: str = "truncate"
    """Variable number of calls of a module across the G rollouts: truncate | fill | ragged."""
    group_level: str = "module"
    """module: groups per (example, module, invocation); trajectory: one group per example."""
    scale_rewards: bool = True
    """Divide advantages by the group std (+eps); false keeps reward - mean (Dr. GRPO)."""
    per_trajectory_norm: bool = True
    """Each trajectory's calls share one unit of weight, however many calls it made."""

    # --- objective ---------------------------------------------------------------------
    loss_type: str = "grpo"
    """The policy loss (grpo/loss.py's registry): grpo (clipped ratio, each sequence's token mean,
    averaged over sequences), dapo (clipped ratio, one token mean over the batch), dr_grpo (clipped
    ratio, a fixed length: no length bias), gspo (one clipped ratio per sequence, the geometric mean of
    its tokens'), cispo (clipped importance weights held constant, every token keeps its gradient;
    token mean)."""
    loss_denominator: str = "batch"
    """What the loss normalizes over: "batch" (every sampled completion counts, the ones in groups
    without signal included, as TRL and the paper's code do: a step's size does not depend on how many
    groups had different rewards) or "informative" (only the trained ones: with 1 informative group of
    8 each trained sequence weighs 8x more). Chosen on the demo over 3 seeds
    (studies/demo_seeds.py --variants denom-batch denom-informative)."""
    mask_truncated: bool = False
    """Leave out of the update every completion cut at the token budget (finish_reason "length"),
    as TRL's mask_truncated_completions; they still count in the "batch" denominator. Truncations
    are counted per module (`truncated` in metrics.jsonl) either way."""
    epsilon: float = 0.2
    """Lower clipping range of the importance ratio."""
    epsilon_high: float | None = None
    """Upper clipping range (DAPO's clip-higher); defaults to epsilon."""
    beta: float = 0.0
    """KL coefficient to the reference (the base model with the adapter switched off)."""
    num_iterations: int = 1
    """Updates per batch of rollouts (mu). With 1, old log-probs are the detached current ones."""
    tis_cap: float | str | None = "auto"
    """Truncated importance sampling: weight each token's policy term (not the KL) by
    min(p_learner / p_sampler, cap), correcting for tokens drawn by a sampler that differs from the
    learner. "auto": cap 2.0 where they differ (rollout.servers set: another engine, often another
    dtype; model.sampler_dtype set; or train_with_demos = false), off in-process, where the sampler is the learner's own model;
    a number >= 1: that cap always; "off": never."""
    mismatch_tolerance: float = 0.05
    """Mean |log p_train - log p_sampler| above which the step reports a train/inference mismatch."""

    # --- optimisation -------------------------------------------------------------------
    learning_rate: float = 2e-4
    """AdamW learning rate of the LoRA parameters."""
    lr_schedule: str = "constant"
    """constant | linear | cosine, after warm-up."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping (global norm)."""
    max_nonfinite_steps: int = 3
    """An update whose loss or gradient norm is not finite is skipped (weights and optimizer state
    unchanged, logged as nonfinite_skipped); this many in a row stop the run (resumable)."""
    shared_prefix: bool = True
    """Compute each shared prompt prefix once: the G completions of a prompt share all of it, the
    calls of one module its instruction and demos (grpo/packing.py). Same loss and gradients as one
    padded sequence per completion, far fewer tokens."""
    prefix_attention: str = "auto"
    """How shared_prefix computes each prefix once: "packed" (prefix and calls in one row under a
    block mask: exact everywhere, but the attention kernel computes the masked-out blocks too),
    "cache" (the prefixes as one batch, then every call's rest of prompt and completion as a batch
    attending to its prefix's cached keys/values, gradients flowing back through them: no masked-out
    blocks, so long shared prefixes, such as a prompt search's demos, fit in one micro-batch), or
    "auto": "packed" while every prefix fits a pack_tokens row with its calls, else "cache" (measured:
    packed 1.9x faster on Banking77's short prompts, cache 2.1x faster with a prompt search's demos;
    each step's choice is `kernel` in metrics.jsonl)."""
    pack_tokens: int = 1024
    """Tokens per "packed" micro-batch (each prefix once + its calls): the block mask grows as its square."""
    token_budget: int = 4096
    """Tokens per micro-batch of the "cache" kernel (each prefix once + its calls), or padded tokens
    per micro-batch with shared_prefix off: bounds memory; gradients accumulate."""
    recompute_tokens: int = 2048
    """A micro-batch whose forward pass spans more tokens than this keeps only each layer's input
    and recomputes the rest in the backward pass (gradient checkpointing); a call alone also skips the
    block mask. A 2,785-token PUPA call: 0.48x the peak memory, 0.92x the time
    (benchmarks/update_long_call.py). Only calls alone over pack_tokens (a long input, such as a PUPA
    request) reach it with the defaults. 0 = every micro-batch.
    The "cache" kernel's micro-batches are bounded by token_budget instead (its cache cannot be
    recomputed)."""
    lora_r: int = 16
    """LoRA rank (one adapter shared by every module)."""
    lora_alpha: int = 32
    """LoRA scaling numerator."""
    lora_dropout: float = 0.0
    """LoRA dropout."""
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                          "gate_proj", "up_proj", "down_proj"])
    """Module names LoRA wraps."""

    # --- evaluation, checkpoints, output --------------------------------------------------
    eval_every: int = 5
    """Evaluate on the dev set every N steps (and before the first and after the last)."""
    eval_examples: int = 50
    """Dev examples per evaluation (the first N of the dev split)."""
    eval_max_tokens: int | None = None
    """Completion token budget of each LM call when scoring dev and test (greedy); unset = the
    training budget, rollout.max_tokens (a module's own cap may lower either), so that the policy is
    scored as it was trained. Recorded in dev.jsonl, result.json and compare's table."""
    checkpoint_every: int = 5
    """Write a resumable checkpoint every N steps (and at the end)."""
    keep_checkpoints: int = 2
    """Most recent checkpoints kept (the best adapter is kept apart)."""
    dist_timeout_s: float = 3600.0
    """Under torchrun / accelerate launch: how long one collective may wait, the other ranks'
    wait for rank 0's prompt search included (raise it for longer searches); past it they fail
    instead of hanging. An error on any rank ends the job at once. Several nodes need a file system
    shared by every rank for the run folder (rank 0 writes it; the others read its checkpoint on
    resume)."""
    out: str = "runs"
    """Folder under which the run folder is made."""
    name: str = "mmgrpo"
    """Run folder prefix."""
    progress: bool = True
    """Progress bars (false: quiet, for CI and logs)."""
    report_to: list[str] = field(default_factory=list)
    """Trackers beside metrics.jsonl (always written): any of "tensorboard", "wandb" (offline mode),
    "mlflow" (a SQLite store in the run folder); each needs its package (mmgrpo[tensorboard] ...)."""

    def __post_init__(self):
        def need(ok: bool, key: str, what: str):
            if not ok:
                raise ValueError(f"config key {key!r}: {what}, got {getattr(self, key)!r}")
        need(self.steps >= 1, "steps", "must be >= 1")
        need(self.batch_examples >= 1, "batch_examples", "must be >= 1")
        need(self.group_size >= 2, "group_size", "must be >= 2 (advantages are relative to the group)")
        need(self.temperature > 0, "temperature", "must be > 0 for rollouts")
        need(0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        need(self.max_tokens >= 1, "max_tokens", "must be >= 1")
        need(self.grouping in MODES, "grouping", f"must be one of {', '.join(MODES)}")
        need(self.group_level in LEVELS, "group_level", f"must be one of {', '.join(LEVELS)}")
        need(self.loss_type in LOSSES, "loss_type", f"must be one of {', '.join(LOSSES)}")
        need(self.loss_denominator in DENOMINATORS, "loss_denominator", f"must be one of {', '.join(DENOMINATORS)}")
        need(self.tis_cap in ("auto", "off", None) or (not isinstance(self.tis_cap, str) and self.tis_cap >= 1),
             "tis_cap", 'must be "auto", "off" or a number >= 1')
        need(self.eval_max_tokens is None or self.eval_max_tokens >= 1, "eval_max_tokens",
             "must be >= 1 (or unset: the training budget)")
        need(self.epsilon > 0, "epsilon", "must be > 0")
        need(self.beta >= 0, "beta", "must be >= 0")
        need(self.num_iterations >= 1, "num_iterations", "must be >= 1")
        need(self.learning_rate > 0, "learning_rate", "must be > 0")
        need(self.lr_schedule in SCHEDULES, "lr_schedule", f"must be one of {', '.join(SCHEDULES)}")
        need(self.token_budget >= 64, "token_budget", "must be >= 64")
        need(64 <= self.pack_tokens <= 8192, "pack_tokens", "must be between 64 and 8192")
        need(self.recompute_tokens >= 0, "recompute_tokens", "must be >= 0 (0 = recompute every micro-batch)")
        need(self.prefill_tokens >= 0, "prefill_tokens", "must be >= 0 (0 = bound prefill chunks by rows only)")
        need(self.prefix_attention in KERNELS, "prefix_attention", f"must be one of {', '.join(KERNELS)}")
        need(self.eval_every >= 1, "eval_every", "must be >= 1")
        need(0 <= self.max_error_rate <= 1, "max_error_rate", "must be in [0, 1]")
        need(self.train_with_demos or self.tis is not None, "tis_cap",
             "cannot be off with train_with_demos = false: the update's prompts (without demos) were never "
             "sampled, and only the importance weights correct for that; use \"auto\" or a cap")
        need(self.prompt_optimizer in PROMPT_OPTIMIZERS, "prompt_optimizer",
             f"must be one of {', '.join(PROMPT_OPTIMIZERS)}")
        need(self.prompt_val_examples >= 0, "prompt_val_examples", "must be >= 0 (0 = search on dev)")
        for key in ("prompt_candidates", "prompt_instructions", "prompt_trials", "prompt_minibatch", "prompt_top_k",
                    "gepa_metric_calls"):
            need(getattr(self, key) >= 1, key, "must be >= 1")
        need(self.checkpoint_every >= 1, "checkpoint_every", "must be >= 1")
        need(self.dtype in DTYPES, "dtype", f"must be one of {', '.join(DTYPES)}")
        need(self.sampler_dtype in SAMPLER_DTYPES, "sampler_dtype", f"must be one of {', '.join(SAMPLER_DTYPES)}")
        need(self.device in ("auto", "cpu", "cuda") or (self.device.startswith("cuda:") and self.device[5:].isdigit()),
             "device", "must be auto, cpu, cuda or cuda:N")
        if self.program:
            need(bool(self.metric), "metric", "is needed with `program` (an import path)")
            need(bool(self.train_data and self.dev_data), "train_data", "and dev_data are needed with `program`")
        need(self.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")
        need(self.dist_timeout_s > 0, "dist_timeout_s", "must be > 0")
        need(self.workers >= 0, "workers", "must be >= 0")
        need(all(t in TRACKERS for t in self.report_to), "report_to",
             f"must list trackers among {', '.join(TRACKERS)}")
        need(not self.workers or bool(self.servers), "workers",
             "needs rollout.servers: workers call the policy through inference servers (vLLM or mmgrpo serve)")

    @property
    def tis(self) -> float | None:
        """The importance-sampling cap in force (None: off), tis_cap = "auto" resolved from the config
        alone; the trainer also turns it on where a sampler copy samples (`HFBackend.samples_apart`)."""
        if self.tis_cap == "auto":
            return TIS_CAP if (self.servers or not self.train_with_demos) else None
        return None if self.tis_cap in ("off", None) else float(self.tis_cap)

    @property
    def eval_tokens(self) -> int:
        """The budget dev and test are scored at."""
        return self.eval_max_tokens or self.max_tokens

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> dict:
        """As a run folder saves it (JSON types), so a saved config compares equal to it."""
        return json.loads(json.dumps(self.to_dict()))


# keys added since whose default is not what a run saved before them ran with
BEFORE_KEY = {"loss_denominator": "informative", "eval_max_tokens": 256, "tis_cap": None, "sampler_dtype": "model"}


def with_defaults(saved: dict) -> dict:
    """A saved config with each key added to mmgrpo since: at the value the run ran with
    (``BEFORE_KEY``), else at its default."""
    return {**TrainConfig().to_json(), **{k: v for k, v in BEFORE_KEY.items() if k not in saved}, **saved}


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint in (dict, list, str, bool):
        return isinstance(value, hint)
    if origin in (list, tuple) and typing.get_args(hint):
        return isinstance(value, origin) and all(_type_ok(v, typing.get_args(hint)[0]) for v in value)
    return True


# Config files, --set and mmgrpo.optimize(config=...) are written in sections; the dataclass above
# stays flat (one documented field each). Section key -> field; a key is the field's name unless
# renamed here.
SECTIONS: dict[str, dict[str, str]] = {
    "model": {"name": "model", "device": "device", "dtype": "dtype", "sampler_dtype": "sampler_dtype"},
    "task": {"name": "task", "options": "task_options", "program": "program", "metric": "metric",
             "reward": "reward", "train": "train_data", "dev": "dev_data", "test": "test_data", "prompts": "prompts"},
    "rollout": {k: k for k in ("batch_examples", "group_size", "temperature", "top_p", "max_tokens", "concurrency",
                               "format_failure_score", "failure_score", "max_error_rate", "deterministic",
                               "continuous_batching", "prefill_tokens",
                               "servers", "server_model", "adapter_dir", "request_timeout_s", "request_retries",
                               "request_backoff_s", "workers", "ray_address")},
    "grpo": {k: k for k in ("grouping", "group_level", "scale_rewards", "per_trajectory_norm", "loss_type", "epsilon",
                            "epsilon_high", "beta", "num_iterations", "tis_cap", "mismatch_tolerance",
                            "loss_denominator", "mask_truncated",
                            "learning_rate", "lr_schedule", "warmup_steps", "weight_decay", "max_grad_norm", "max_nonfinite_steps",
                            "shared_prefix", "prefix_attention", "pack_tokens", "token_budget", "recompute_tokens", "lora_r", "lora_alpha", "lora_dropout",
                            "lora_targets", "train_with_demos")},
    "prompts": {"optimizer": "prompt_optimizer", "candidates": "prompt_candidates", "max_demos": "prompt_max_demos",
                "demo_threshold": "prompt_demo_threshold",
                "train_examples": "prompt_train_examples", "val_examples": "prompt_val_examples",
                "instructions": "prompt_instructions",
                "trials": "prompt_trials", "minibatch": "prompt_minibatch", "top_k": "prompt_top_k",
                "gepa_metric_calls": "gepa_metric_calls", "proposer_url": "proposer_url",
                "proposer_model": "proposer_model"},
    "run": {k: k for k in ("strategy", "seed", "steps", "eval_every", "eval_examples", "eval_max_tokens",
                           "checkpoint_every",
                           "keep_checkpoints", "dist_timeout_s", "out", "name", "progress", "report_to")},
}
WHERE = {f: (sec, key) for sec, keys in SECTIONS.items() for key, f in keys.items()}  # field -> (section, key)
assert set(WHERE) == {f.name for f in dataclasses.fields(TrainConfig)}, "every field belongs to one section"


def from_dict(raw: dict, source: str = "config") -> TrainConfig:
    """A config from flat field names (saved run configs, presets, code)."""
    hints = typing.get_type_hints(TrainConfig)
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    for key, value in raw.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(names)}"
            raise ValueError(f"{source}: unknown key {key!r}{hint}")
        if key == "servers" and isinstance(value, str):  # --set rollout.servers=URL1,URL2
            value = raw[key] = [u.strip() for u in value.split(",") if u.strip()]
        if not _type_ok(value, hints[key]):
            raise ValueError(f"{source}: key {key!r} must be of type {hints[key]}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{source}: key {key!r} must be a finite number, got {value!r}")
    return TrainConfig(**raw)


def moved(key: str) -> str:
    sec, k = WHERE[key]
    return f"[{sec}] {k}"


def flatten(raw: dict, source: str = "config") -> dict:
    """Sections -> flat fields; an old flat key, an unknown section or key is an error naming it."""
    flat: dict = {}
    for sec, body in raw.items():
        if not isinstance(sec, str):
            raise ValueError(f"{source}: section names are strings, got {sec!r}")
        if sec not in SECTIONS:
            if sec in WHERE:
                raise ValueError(f"{source}: key {sec!r} belongs in a section now: write it as {moved(sec)} "
                                 f"(or --set {WHERE[sec][0]}.{WHERE[sec][1]}=...)")
            close = difflib.get_close_matches(sec, list(SECTIONS), n=1)
            hint = f"did you mean [{close[0]}]?" if close else f"sections: {', '.join(SECTIONS)}"
            raise ValueError(f"{source}: unknown section {sec!r}; {hint}")
        if not isinstance(body, dict):
            raise ValueError(f"{source}: [{sec}] must be a table of keys, got {body!r}")
        for key, value in body.items():
            if not isinstance(key, str):
                raise ValueError(f"{source}: [{sec}] has a key that is not a string: {key!r}")
            if key not in SECTIONS[sec]:
                if key in WHERE or any(key in keys for keys in SECTIONS.values()):
                    field_name = key if key in WHERE else next(k2 for keys in SECTIONS.values()
                                                               for k1, k2 in keys.items() if k1 == key)
                    raise ValueError(f"{source}: [{sec}] has no key {key!r}; it is {moved(field_name)}")
                close = difflib.get_close_matches(key, list(SECTIONS[sec]), n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"keys of [{sec}]: {', '.join(SECTIONS[sec])}"
                raise ValueError(f"{source}: unknown key {key!r} in [{sec}]; {hint}")
            flat[SECTIONS[sec][key]] = value
    return flat


def _merge(into: dict, flat: dict) -> None:
    for k, v in flat.items():
        if k == "task_options" and isinstance(v, dict) and isinstance(into.get(k), dict):
            into[k] = {**into[k], **v}
        else:
            into[k] = v


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _read_config_file(p: Path) -> Any:
    import yaml

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # Python 3.10: the tomli backport, a dependency there (pyproject.toml)
        import tomli as tomllib
    kind = "TOML" if p.suffix == ".toml" else "YAML"
    try:
        text = p.read_text(encoding="utf-8")
        return tomllib.loads(text) if kind == "TOML" else (yaml.safe_load(text) or {})
    except (ValueError, yaml.YAMLError) as exc:  # TOMLDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{p}: not valid {kind} ({' '.join(str(exc).split())[:300]})") from None


def load_config(path: str | Path | None, overrides: list[str] = (), defaults: dict | None = None,
                defaults_sections: dict | None = None, sections: dict | None = None) -> TrainConfig:
    """Defaults (flat, e.g. a task preset; then in sections), the file's sections, ``sections``
    (a dict, from Python), then ``section.key=value`` overrides; later ones win."""
    raw: dict = json.loads(json.dumps(defaults or {}))
    _merge(raw, flatten(defaults_sections or {}, "defaults"))
    source = str(path) if path else "config"
    if path:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"config file {p} does not exist")
        if p.suffix not in (".toml", ".yaml", ".yml"):
            raise ValueError(f"{p}: use a .toml, .yaml or .yml config file")
        loaded = _read_config_file(p)
        if not isinstance(loaded, dict):
            raise ValueError(f"{p}: the config must be a mapping of sections to keys")
        _merge(raw, flatten(loaded, source))
    _merge(raw, flatten(sections or {}, "config"))
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like SECTION.KEY=VALUE, e.g. rollout.temperature=0.8")
        k, v = item.split("=", 1)
        parts = k.split(".")
        if parts[:2] == ["task", "options"] and len(parts) == 3:
            _merge(raw, {"task_options": {parts[2]: _parse_value(v)}})
        elif parts[0] == "task_options":
            raise ValueError(f"--set {item}: task options are task.options now: --set task.options.{parts[-1]}={v}")
        elif len(parts) == 2:
            _merge(raw, flatten({parts[0]: {parts[1]: _parse_value(v)}}, f"--set {item}"))
        elif len(parts) == 1 and k in WHERE:
            raise ValueError(f"--set {item}: {k!r} belongs in a section now: --set {WHERE[k][0]}.{WHERE[k][1]}={v}")
        else:
            raise ValueError(f"--set {item}: write SECTION.KEY=VALUE (sections: {', '.join(SECTIONS)})")
    for key in PATH_KEYS:  # saved as absolute paths: a run is resumed and evaluated from any folder
        if isinstance(raw.get(key), str) and raw[key]:
            raw[key] = str(Path(raw[key]).expanduser().resolve())
    return from_dict(raw, source)


PATH_KEYS = ("train_data", "dev_data", "test_data", "prompts")
