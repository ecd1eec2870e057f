"""Checkpoints of a training run: the adapter (PEFT safetensors), optimizer, schedule and RNG state
(safetensors + JSON, never pickled), a manifest of their hashes, written atomically."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch

from ..runlog import atomic_write, publish_dir, write_json, write_manifest

POLICIES = "lagged_policies.safetensors"  # earlier policy versions that lagged rollouts sample with


class Checkpoints:
    """The save / load half of `Trainer` (its state is set up there)."""

    def save(self, folder: str | Path, extra: dict, best_adapter: Path | None = None,
             policies: dict[int, dict] | None = None) -> Path:
        """Adapter (PEFT safetensors) + optimizer + scheduler + RNG + extra state (+ a copy of the
        best adapter so far, + the earlier policy versions lagged rollouts still sample with, as
        `HFBackend.policy_snapshot`s) + a manifest of their hashes, atomically."""
        folder = Path(folder)
        tmp = folder.with_name(f".{folder.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            self._write(tmp, extra, best_adapter, policies)
            publish_dir(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # a failed write leaves nothing half-done behind
            raise
        return folder

    def _write(self, tmp: Path, extra: dict, best_adapter: Path | None, policies: dict[int, dict] | None) -> None:
        from safetensors.torch import save_file

        tmp.mkdir(parents=True)
        self.model.save_pretrained(tmp, safe_serialization=True)
        if policies:
            save_file({f"{v}:{k}": t.contiguous() for v, snap in policies.items() for k, t in snap.items()},
                      str(tmp / POLICIES))
        if best_adapter is not None and best_adapter.is_dir():
            shutil.copytree(best_adapter, tmp / "best_adapter")
        opt = self.opt.state_dict()
        tensors, scalars = {}, {}
        for idx, st in opt["state"].items():
            for k, v in st.items():
                if torch.is_tensor(v):
                    tensors[f"{idx}.{k}"] = v.contiguous()
                else:
                    scalars[f"{idx}.{k}"] = v
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            for i, st in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng.cuda.{i}"] = st
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        state = {"step": self.step, "param_groups": opt["param_groups"], "opt_scalars": scalars,
                 "scheduler": self.sched.state_dict(), "rng_python": random.getstate(), **extra}
        write_json(tmp / "trainer_state.json", state)
        write_manifest(tmp)

    def load(self, folder: str | Path) -> dict:
        from safetensors.torch import load_file

        folder = Path(folder)
        state = json.loads((folder / "trainer_state.json").read_text())
        self.load_adapter(folder)
        tensors = load_file(str(folder / "optimizer.safetensors"))
        torch.set_rng_state(tensors.pop("rng.torch"))
        cuda = [tensors.pop(k) for k in sorted((k for k in list(tensors) if k.startswith("rng.cuda.")),
                                               key=lambda k: int(k.rsplit(".", 1)[1]))]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
        opt_state: dict = {}
        for key, v in tensors.items():
            idx, name = key.split(".", 1)
            opt_state.setdefault(int(idx), {})[name] = v
        for key, v in state["opt_scalars"].items():
            idx, name = key.split(".", 1)
            opt_state.setdefault(int(idx), {})[name] = v
        self.opt.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
        self.sched.load_state_dict(state["scheduler"])
        rs = state["rng_python"]
        random.setstate((rs[0], tuple(rs[1]), rs[2]))
        self.step = state["step"]
        return state

    @staticmethod
    def load_policies(folder: str | Path) -> dict[int, dict]:
        """The earlier policy versions a checkpoint kept ({} when none: a run without lag)."""
        from safetensors.torch import load_file

        path = Path(folder) / POLICIES
        out: dict[int, dict] = {}
        if path.exists():
            for key, t in load_file(str(path)).items():
                v, name = key.split(":", 1)
                out.setdefault(int(v), {})[name] = t
        return out

    def load_adapter(self, folder: str | Path) -> None:
        """Put a saved adapter's weights (e.g. best_adapter/) back into the policy."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        with self.backend.lock:
            set_peft_model_state_dict(self.model, load_file(str(Path(folder) / "adapter_model.safetensors")))
            self.backend.weights_changed()

    def save_adapter(self, folder: str | Path, snapshot: dict | None = None) -> None:
        """The adapter as a PEFT folder, atomically: the live one, or a `policy_snapshot` of an
        earlier version (its LoRA factors in the live adapter's file layout)."""
        from safetensors.torch import load_file, save_file

        folder = Path(folder)
        tmp = folder.with_name(f".{folder.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(tmp, safe_serialization=True)
        if snapshot is not None:
            file = tmp / "adapter_model.safetensors"
            saved = load_file(str(file))
            for key in saved:  # base_model.model.<module>.lora_A.weight <- snapshot["<module>@A@default"]
                module, which = key.removeprefix("base_model.model.").rsplit(".lora_", 1)
                saved[key] = snapshot[f"{module}@{which[0]}@default"].contiguous()
            save_file(saved, str(file), metadata={"format": "pt"})
        publish_dir(tmp, folder)


def write_latest(run_path: Path, name: str) -> None:
    atomic_write(run_path / "checkpoints" / "latest", name + "\n")
