"""The checks a config passes before anything runs: each names its key, what it must be, and the value given."""
from __future__ import annotations

from ..grpo.groups import DENOMINATORS, LEVELS, MODES
from ..grpo.loss import LOSSES
from ..models import DTYPES, SAMPLER_DTYPES, UPDATE_DTYPES

SCHEDULES = ("constant", "linear", "cosine")
KERNELS = ("auto", "packed", "cache")
PROMPT_OPTIMIZERS = ("bootstrap", "mipro", "gepa")
TRACKERS = ("tensorboard", "wandb", "mlflow")


def validate(cfg) -> None:
    """Raise ValueError naming the first key whose value cannot run."""
    def need(ok: bool, key: str, what: str):
        if not ok:
            raise ValueError(f"config key {key!r}: {what}, got {getattr(cfg, key)!r}")
    need(cfg.steps >= 1, "steps", "must be >= 1")
    need(cfg.batch_examples >= 1, "batch_examples", "must be >= 1")
    need(cfg.group_size >= 2, "group_size", "must be >= 2 (advantages are relative to the group)")
    need(cfg.temperature > 0, "temperature", "must be > 0 for rollouts")
    need(0 < cfg.top_p <= 1, "top_p", "must be in (0, 1]")
    need(cfg.max_tokens >= 1, "max_tokens", "must be >= 1")
    need(cfg.grouping in MODES, "grouping", f"must be one of {', '.join(MODES)}")
    need(cfg.group_level in LEVELS, "group_level", f"must be one of {', '.join(LEVELS)}")
    need(cfg.loss_type in LOSSES, "loss_type", f"must be one of {', '.join(LOSSES)}")
    need(cfg.loss_denominator in DENOMINATORS, "loss_denominator", f"must be one of {', '.join(DENOMINATORS)}")
    need(cfg.tis_cap in ("auto", "off", None) or (not isinstance(cfg.tis_cap, str) and cfg.tis_cap >= 1),
         "tis_cap", 'must be "auto", "off" or a number >= 1')
    need(cfg.eval_max_tokens is None or cfg.eval_max_tokens >= 1, "eval_max_tokens",
         "must be >= 1 (or unset: the training budget)")
    need(cfg.epsilon > 0, "epsilon", "must be > 0")
    need(cfg.beta >= 0, "beta", "must be >= 0")
    need(cfg.num_iterations >= 1, "num_iterations", "must be >= 1")
    need(cfg.learning_rate > 0, "learning_rate", "must be > 0")
    need(cfg.lr_schedule in SCHEDULES, "lr_schedule", f"must be one of {', '.join(SCHEDULES)}")
    need(cfg.token_budget >= 64, "token_budget", "must be >= 64")
    need(64 <= cfg.pack_tokens <= 8192, "pack_tokens", "must be between 64 and 8192")
    need(cfg.recompute_tokens >= 0, "recompute_tokens", "must be >= 0 (0 = recompute every micro-batch)")
    need(cfg.prefill_tokens >= 0, "prefill_tokens", "must be >= 0 (0 = bound prefill chunks by rows only)")
    need(cfg.prefix_attention in KERNELS, "prefix_attention", f"must be one of {', '.join(KERNELS)}")
    need(cfg.eval_every >= 1, "eval_every", "must be >= 1")
    need(cfg.max_policy_lag >= 0, "max_policy_lag", "must be >= 0 (0 = no overlap)")
    need(not cfg.max_policy_lag or cfg.tis_cap not in ("off", None), "tis_cap",
         "cannot be off with max_policy_lag > 0: lagged rollouts are corrected by importance weights; use "
         "\"auto\" or a cap")
    need(0 <= cfg.max_error_rate <= 1, "max_error_rate", "must be in [0, 1]")
    need(cfg.train_with_demos or cfg.tis is not None, "tis_cap",
         "cannot be off with train_with_demos = false: the update's prompts (without demos) were never "
         "sampled, and only the importance weights correct for that; use \"auto\" or a cap")
    need(cfg.prompt_optimizer in PROMPT_OPTIMIZERS, "prompt_optimizer",
         f"must be one of {', '.join(PROMPT_OPTIMIZERS)}")
    need(cfg.prompt_val_examples >= 0, "prompt_val_examples", "must be >= 0 (0 = search on dev)")
    for key in ("prompt_candidates", "prompt_instructions", "prompt_trials", "prompt_minibatch", "prompt_top_k",
                "gepa_metric_calls"):
        need(getattr(cfg, key) >= 1, key, "must be >= 1")
    need(cfg.checkpoint_every >= 1, "checkpoint_every", "must be >= 1")
    need(cfg.dtype in DTYPES, "dtype", f"must be one of {', '.join(DTYPES)}")
    need(cfg.sampler_dtype in SAMPLER_DTYPES, "sampler_dtype", f"must be one of {', '.join(SAMPLER_DTYPES)}")
    need(cfg.update_dtype in UPDATE_DTYPES, "update_dtype", f"must be one of {', '.join(UPDATE_DTYPES)}")
    need(cfg.device in ("auto", "cpu", "cuda") or (cfg.device.startswith("cuda:") and cfg.device[5:].isdigit()),
         "device", "must be auto, cpu, cuda or cuda:N")
    if cfg.program:
        need(bool(cfg.metric), "metric", "is needed with `program` (an import path)")
        need(bool(cfg.train_data and cfg.dev_data), "train_data", "and dev_data are needed with `program`")
    need(cfg.keep_checkpoints >= 1, "keep_checkpoints", "must be >= 1")
    need(cfg.dist_timeout_s > 0, "dist_timeout_s", "must be > 0")
    need(cfg.workers >= 0, "workers", "must be >= 0")
    need(all(t in TRACKERS for t in cfg.report_to), "report_to",
         f"must list trackers among {', '.join(TRACKERS)}")
    need(not cfg.workers or bool(cfg.servers), "workers",
         "needs rollout.servers: workers call the policy through inference servers (vLLM or mmgrpo serve)")

