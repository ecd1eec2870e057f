"""The mmGRPO run configuration: one documented dataclass, loaded from TOML or YAML.

Unknown keys and values of the wrong type are errors that name the key.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TrainConfig:
    # --- what to train -------------------------------------------------------------------
    model: str = "smollm2-135m"
    """Embedded model name, local folder, or Hugging Face id."""
    task: str = "banking77"
    """Task by name (see `mmgrpo.tasks.TASKS`)."""
    task_options: dict = field(default_factory=dict)
    """Options passed to the task's constructor (e.g. n_labels, n_demos for banking77)."""
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
    prompt_train_examples: int = 50
    """bootstrap, mipro: training examples run to bootstrap demos from; gepa: its training set."""
    prompt_instructions: int = 4
    """mipro: instructions per module (the current one and up to n - 1 proposals)."""
    prompt_trials: int = 10
    """mipro: TPE trials, each scored on a dev minibatch (the first is the program as it is)."""
    prompt_minibatch: int = 20
    """mipro: dev examples per trial; gepa: examples per reflection minibatch is min(4, this)."""
    prompt_top_k: int = 3
    """mipro: configurations re-scored on the whole dev set, the best of them wins: the best by
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
    instruction and input without its demos (false; the reference implementation's option)."""
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
    """grpo (per-sequence mean), dapo (token mean over the batch), dr_grpo (fixed length)."""
    epsilon: float = 0.2
    """Lower clipping range of the importance ratio."""
    epsilon_high: float | None = None
    """Upper clipping range (DAPO's clip-higher); defaults to epsilon."""
    beta: float = 0.0
    """KL coefficient to the reference (the base model with the adapter switched off)."""
    num_iterations: int = 1
    """Updates per batch of rollouts (mu). With 1, old log-probs are the detached current ones."""
    tis_cap: float | None = None
    """Truncated importance sampling: weight tokens by min(p_train/p_sampler, cap). None: off."""
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
    shared_prefix: bool = True
    """Pack each prompt once with all its completions after it (block attention mask) instead
    of one padded sequence per completion: same loss and gradients, far fewer tokens."""
    pack_tokens: int = 1024
    """Tokens per packed micro-batch (shared_prefix): the dense block mask grows as its square."""
    token_budget: int = 4096
    """Padded tokens per micro-batch (shared_prefix off): bounds memory; gradients accumulate."""
    lora_r: int = 16
    """LoRA rank (one adapter shared by every module)."""
    lora_alpha: int = 32
    """LoRA scaling numerator."""
    lora_dropout: float = 0.0
    """LoRA dropout."""
    lora_targets: list = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                          "gate_proj", "up_proj", "down_proj"])
    """Module names LoRA wraps."""

    # --- evaluation, checkpoints, output --------------------------------------------------
    eval_every: int = 5
    """Evaluate on the dev set every N steps (and before the first and after the last)."""
    eval_examples: int = 50
    """Dev examples per evaluation (the first N of the dev split)."""
    checkpoint_every: int = 5
    """Write a resumable checkpoint every N steps (and at the end)."""
    keep_checkpoints: int = 2
    """Most recent checkpoints kept (the best adapter is kept apart)."""
    out: str = "runs"
    """Folder under which the run folder is made."""
    name: str = "mmgrpo"
    """Run folder prefix."""
    progress: bool = True
    """Progress bars."""

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
        need(self.grouping in ("truncate", "fill", "ragged"), "grouping", "must be truncate, fill or ragged")
        need(self.group_level in ("module", "trajectory"), "group_level", "must be module or trajectory")
        need(self.loss_type in ("grpo", "dapo", "dr_grpo"), "loss_type", "must be grpo, dapo or dr_grpo")
        need(self.epsilon > 0, "epsilon", "must be > 0")
        need(self.beta >= 0, "beta", "must be >= 0")
        need(self.num_iterations >= 1, "num_iterations", "must be >= 1")
        need(self.learning_rate > 0, "learning_rate", "must be > 0")
        need(self.lr_schedule in ("constant", "linear", "cosine"), "lr_schedule", "must be constant, linear or cosine")
        need(self.token_budget >= 64, "token_budget", "must be >= 64")
        need(64 <= self.pack_tokens <= 8192, "pack_tokens", "must be between 64 and 8192")
        need(self.eval_every >= 1, "eval_every", "must be >= 1")
        need(0 <= self.max_error_rate <= 1, "max_error_rate", "must be in [0, 1]")
        need(self.train_with_demos or self.tis_cap is None, "tis_cap",
             "needs train_with_demos = true (the sampler's log-probs are of the prompts with demos)")
        need(self.prompt_optimizer in ("bootstrap", "mipro", "gepa"), "prompt_optimizer",
             "must be bootstrap, mipro or gepa")
        for key in ("prompt_candidates", "prompt_instructions", "prompt_trials", "prompt_minibatch", "prompt_top_k",
                    "gepa_metric_calls"):
            need(getattr(self, key) >= 1, key, "must be >= 1")
        need(self.checkpoint_every >= 1, "checkpoint_every", "must be >= 1")
        need(self.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


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
    return True


def from_dict(raw: dict, source: str = "config") -> TrainConfig:
    hints = typing.get_type_hints(TrainConfig)
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    for key, value in raw.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(names)}"
            raise ValueError(f"{source}: unknown key {key!r}{hint}")
        if not _type_ok(value, hints[key]):
            raise ValueError(f"{source}: key {key!r} must be of type {hints[key]}, got {value!r}")
    return TrainConfig(**raw)


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def load_config(path: str | Path | None, overrides: list[str] = (), defaults: dict | None = None) -> TrainConfig:
    """Defaults (e.g. a task preset), then the file's keys, then KEY=VALUE overrides."""
    raw: dict = json.loads(json.dumps(defaults or {}))
    source = str(path) if path else "config"
    if path:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"config file {p} does not exist")
        text = p.read_text()
        if p.suffix == ".toml":
            if sys.version_info >= (3, 11):
                import tomllib
            else:  # Python 3.10: the tomli backport, a dependency there (pyproject.toml)
                import tomli as tomllib
            loaded = tomllib.loads(text)
        elif p.suffix in (".yaml", ".yml"):
            import yaml

            loaded = yaml.safe_load(text) or {}
        else:
            raise ValueError(f"{p}: use a .toml, .yaml or .yml config file")
        if not isinstance(loaded, dict):
            raise ValueError(f"{p}: the config must be a mapping of keys to values")
        raw.update(loaded)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like KEY=VALUE")
        k, v = item.split("=", 1)
        if k.startswith("task_options."):
            raw.setdefault("task_options", {})[k.split(".", 1)[1]] = _parse_value(v)
        else:
            raw[k] = _parse_value(v)
    return from_dict(raw, source)
