"""Resumable training checkpoints: LoRA weights, optimizer state, RNG states and JSON state.

One checkpoint is a folder ``<folder>/step-000123/`` holding

* ``lora.safetensors``: the trainable tensors by name (e.g. `rl.lora.lora_named_parameters`);
* ``optimizer.pt``: ``optimizer.state_dict()`` (tensors, numbers, strings, tuples, None only, so it is
  read back with ``torch.load(..., weights_only=True)``);
* ``rng.pt``: the Python, NumPy and torch (CPU and CUDA) global RNG states (`capture_rng`), stored with
  plain types and tensors only, so it too loads with ``weights_only=True``;
* ``scaler.pt``: the fp16 loss scaler's ``state_dict()`` (accelerate's optimizer state leaves it out), when
  one is given;
* ``process-{rank}.pt``: one per process of the run, in rank order, when given: state that differs between
  processes (rl.train: each process's RNG states and advantage tracker), read back by `load_process_state`;
* ``state.json``: ``{"format", "step", "params" (trainable names in order), "processes" (how many
  ``process-*.pt``), "extra"}``.

Each checkpoint is written under a temporary name and renamed into place, so a folder named
``step-*`` is always complete; older checkpoints beyond the newest ``keep`` are then removed.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from evalsuite.errors import SuiteError
from evalsuite.folders import replace_folder

from .lora import save_safetensors

log = logging.getLogger("rl")

FORMAT = "evalsuite-rl-checkpoint/1"
_STEP_DIR = re.compile(r"^step-(\d{6,})$")


def capture_rng() -> dict[str, Any]:
    """The global RNG states of Python, NumPy and torch (CPU, and every CUDA device when CUDA is up)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    state: dict[str, Any] = {
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    """Set the global RNG states captured by `capture_rng`."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state((npst["kind"], npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"],
                         npst["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _step_dirs(folder: Path) -> list[tuple[int, Path]]:
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found)


def save_checkpoint(folder: Path, *, step: int, trainable: Mapping[str, Tensor] | None = None,
                    model: nn.Module | None = None, optimizer: torch.optim.Optimizer, rng: Mapping[str, Any],
                    extra: Mapping[str, Any], keep: int = 2, processes: Sequence[Mapping[str, Any]] = (),
                    scaler: Mapping[str, Any] | None = None) -> Path:
    """Write ``folder/step-{step:06d}/`` atomically and keep only the newest `keep` checkpoints.

    Give the tensors to save as `trainable` (name -> tensor, e.g. ``lora_named_parameters(unet, te)``) or
    give `model`, whose parameters with ``requires_grad`` are saved under their names. With a text-encoder
    LoRA use `trainable`: `model=unet` would leave the text-encoder LoRA out. `rng` is the saving
    process's RNG states (`capture_rng`), `extra` JSON data shared by all processes, `processes` the state
    of each process in rank order (plain types and tensors, e.g. gathered from every process), `scaler`
    the fp16 ``GradScaler.state_dict()``.
    """
    trainable = _targets(trainable, model, "save_checkpoint")
    if keep < 1:
        raise SuiteError(f"save_checkpoint: keep must be >= 1, got {keep}")
    if step < 0:
        raise SuiteError(f"save_checkpoint: step must be >= 0, got {step}")
    try:
        state = {"format": FORMAT, "step": step, "params": list(trainable), "processes": len(processes),
                 "extra": dict(extra)}
        state_text = json.dumps(state, indent=1)
    except TypeError as err:
        raise SuiteError(f"save_checkpoint: `extra` is not JSON-serialisable: {err}") from err
    folder = Path(folder)
    final = folder / f"step-{step:06d}"
    tmp = folder / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in trainable.items()}
        save_safetensors(tensors, tmp / "lora.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(dict(rng), tmp / "rng.pt")
        for rank, own in enumerate(processes):
            torch.save(dict(own), tmp / f"process-{rank}.pt")
        if scaler is not None:
            torch.save(dict(scaler), tmp / "scaler.pt")
        (tmp / "state.json").write_text(state_text + "\n")
        replace_folder(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for _, old in _step_dirs(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(folder: Path) -> Path | None:
    """The complete checkpoint with the highest step under `folder`, or None."""
    done = [p for _, p in _step_dirs(Path(folder)) if (p / "state.json").is_file()]
    return done[-1] if done else None


def _targets(params: Mapping[str, Tensor] | nn.Module | None, model: nn.Module | None,
             who: str) -> dict[str, Tensor]:
    if (params is None) == (model is None):
        raise SuiteError(f"{who}: give exactly one of the trainable tensors (params/trainable) or `model`")
    if model is not None or isinstance(params, nn.Module):
        module = model if model is not None else params
        assert isinstance(module, nn.Module)
        return {n: p for n, p in module.named_parameters() if p.requires_grad}
    assert params is not None
    return dict(params)


def load_checkpoint(path: Path, *, params: Mapping[str, Tensor] | nn.Module | None = None,
                    model: nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None,
                    rng: bool = True, scaler: torch.amp.GradScaler | None = None) -> tuple[int, dict[str, Any]]:
    """Restore a checkpoint; return ``(step, extra)``.

    `params` maps the names saved in ``lora.safetensors`` to the parameters to fill; or `model` (or a module
    as `params`) whose parameters with ``requires_grad`` are matched by name. Names must agree exactly.
    The optimizer must have been built over the same parameters in the same order as the saved one.
    `rng` restores the global RNG states of the saving process (per process: `load_process_state`).
    `scaler` (the fp16 loss scaler) gets its saved state; a checkpoint without one (written by an older
    version) leaves it as it is, with a warning.
    """
    path = Path(path)
    if not (path / "state.json").is_file():
        raise SuiteError(f"{path} is not a checkpoint folder (no state.json)")
    state = json.loads((path / "state.json").read_text())
    if state.get("format") != FORMAT:
        raise SuiteError(f"{path}: unknown checkpoint format {state.get('format')!r}; expected {FORMAT}")
    saved = load_file(str(path / "lora.safetensors"))
    targets = _targets(params, model, "load_checkpoint")
    missing, unexpected = sorted(set(targets) - set(saved)), sorted(set(saved) - set(targets))
    if missing or unexpected:
        raise SuiteError(f"{path}: LoRA names differ from the model's: {len(missing)} missing in the "
                         f"checkpoint {missing[:5]}, {len(unexpected)} not in the model {unexpected[:5]}")
    bad = [n for n, p in targets.items() if p.shape != saved[n].shape]
    if bad:
        raise SuiteError(f"{path}: shape mismatch for {bad[:5]} (e.g. {bad[0]}: checkpoint "
                         f"{tuple(saved[bad[0]].shape)}, model {tuple(targets[bad[0]].shape)})")
    with torch.no_grad():
        for name, p in targets.items():
            p.copy_(saved[name].to(device=p.device, dtype=p.dtype))
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    if rng:
        restore_rng(torch.load(path / "rng.pt", map_location="cpu", weights_only=True))
    if scaler is not None and (path / "scaler.pt").is_file():
        scaler.load_state_dict(torch.load(path / "scaler.pt", map_location="cpu", weights_only=True))
    elif scaler is not None:
        log.warning("%s holds no loss-scaler state (an older checkpoint): the fp16 loss scale starts afresh", path)
    return int(state["step"]), dict(state["extra"])


def load_process_state(path: Path, rank: int, world: int) -> dict[str, Any]:
    """The state `save_checkpoint` wrote for process `rank` (``process-{rank}.pt``) of a run resumed by
    `world` processes.

    A checkpoint written before per-process states existed (no "processes" in state.json) held one
    process's: its RNG states in ``rng.pt`` and the rest in `extra`; it reads as ``{"rng": ..., **extra}``.

    Raises:
        SuiteError: the checkpoint holds the states of another number of processes than `world`.
    """
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    saved = state.get("processes")
    if saved is None and world == 1:
        return {"rng": torch.load(path / "rng.pt", map_location="cpu", weights_only=True), **state["extra"]}
    if saved != world:
        raise SuiteError(f"{path} holds the state of {saved if saved is not None else 1} process(es), not "
                         f"{world}: resume with as many processes as the run had")
    return dict(torch.load(path / f"process-{rank}.pt", map_location="cpu", weights_only=True))
