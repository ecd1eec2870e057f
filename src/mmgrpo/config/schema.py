"""The schema of a run: one documented dataclass, every field documented where it is declared.

Files (TOML or YAML), ``--set section.key=value`` and ``mmgrpo.optimize(config=...)`` use the
sections of ``SECTIONS``: [model], [task], [rollout], [grpo], [prompts], [run]. Unknown keys,
keys in the wrong section and values of the wrong type are errors that name the key.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from .checks import validate

TIS_CAP = 2.0  # tis_cap = "auto": the cap where sampler and learner differ (TRL's vllm_importance_sampling_cap)


@dataclass
class TrainConfig:
    # --- what to train -------------------------------------------------------------------
    model: str = "smollm2-135m"
    """Embedded model name, local folder, or Hugging Face id."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N. auto: CUDA where a GPU is visible, else CPU."""
    dtype: str = "auto"
    """auto | float32 | bfloat16 | float16: the model's dtype, in which the update runs. auto: bfloat16 on
    a GPU that has it, else float32. On a CPU with native bf16 a bfloat16 model is faster but the demo
    learned less in it (docs/performance.md); there sampler_dtype and update_dtype put bf16 where it is
    safe. The LoRA weights, optimizer state, log-probs and loss are float32 in every case."""
    sampler_dtype: str = "auto"
    """auto | model | float32 | bfloat16 | float16: the dtype of a second copy of the weights that samples
    the rollouts and evaluations (the adapter merged in, refreshed after each update), while the update
    runs in ``dtype``. model: no copy, the model samples. auto: bfloat16 for a float32 model on a CPU
    with native bf16 (avx512_bf16, amx_bf16), where rollouts and dev run ~1.5x faster and the demo
    learned as in float32 over 3 seeds (docs/performance.md); elsewhere the model samples. Where a
    copy samples, tis_cap = "auto" corrects for it, and the adapter-off variant (an outside LM, a
    judge) samples the base weights in that dtype."""
    update_dtype: str = "auto"
    """auto | model | bfloat16 | float16: the dtype of the update's matrix products (autocast), while the
    weights, the residual stream, norms, the output head's logits, log-probs, LoRA weights and optimizer
    state stay in ``dtype``. model: no autocast. auto: bfloat16 for a float32 model on a CPU with native
    bf16 (the demo's update 1.4x faster, many-hop's 1.3x; dev after 12 steps over 3 seeds 0.500 / 0.467 /
    0.483 against 0.467 / 0.500 / 0.450 in float32: docs/performance.md), else model. Where it is on,
    tis_cap = "auto" weights the tokens (the learner's log-probs then differ from the sampler's)."""
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
    max_policy_lag: int = 0
    """Overlap sampling with training: with lag k > 0 the rollouts of step t are sampled by policy version
    max(0, t - 1 - k) (the weights after step t - 1 - k), so those of steps t+1 ... t+k are sampled while
    step t's update runs. 0: each step samples with the weights its update starts from (no overlap).
    Lagged tokens are weighted by truncated importance sampling against their recorded sampling
    log-probs (cap: tis_cap, "auto" = 2.0); a trajectory more than k versions old is not trained on
    (counted as n_stale). In-process, a copy of the weights samples (sampler_dtype's, or one in the
    model's dtype); through servers, the last k + 1 adapters stay loaded. Exact resume either way
    (the lagged versions are kept in each checkpoint). Evaluations wait for the rollouts in flight."""
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
    dtype; a sampler copy in another dtype, model.sampler_dtype; an autocast update, model.update_dtype;
    or train_with_demos = false), off where the learner's own float weights sample; with max_policy_lag,
    on for the lagged calls always. A number >= 1: that cap always; "off": never."""
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
    "auto": "packed" while every prefix fits a pack_tokens row with its calls, else "cache" while its
    attention blocks fit recompute_tokens squared (it cannot recompute; a longer input goes packed) (measured:
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
        validate(self)

    @property
    def tis(self) -> float | None:
        """The importance-sampling cap in force (None: off), tis_cap = "auto" resolved from the config
        alone; the trainer also turns it on where a sampler copy samples (`HFBackend.samples_apart`) or
        the update autocasts (update_dtype)."""
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


