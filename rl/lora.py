"""LoRA adapters on a diffusers denoiser (a UNet, or the SD3/Flux transformer) and optionally the CLIP text
encoder(s) via PEFT, and their export.

`add_lora` freezes the base model and injects PEFT LoRA layers. With ``init="gaussian"`` (the default
here, and what rl.train uses) PEFT (0.21, ``LoraLayer.reset_lora_parameters``) draws lora_A from a normal
distribution with standard deviation 1/r (variance 1/r^2); with ``init="default"`` (PEFT's own default,
``init_lora_weights=True``) it draws lora_A Kaiming-uniform with a = sqrt(5) as ``nn.Linear`` does, i.e.
uniform on +-1/sqrt(fan_in). Both set lora_B = 0, so the adapted model starts as exactly the base model:
the added term B A x is zero.

`save_adapter` writes one folder:

* ``pytorch_lora_weights.safetensors``: the diffusers/PEFT format, written by the pipeline class's own
  ``save_lora_weights`` (``pipe.load_lora_weights(folder)`` of StableDiffusionPipeline, SDXL, SD3, Flux).
  The PEFT configs go into its safetensors metadata too, because diffusers otherwise assumes
  ``lora_alpha == r`` on load and an adapter trained with alpha != rank would come back mis-scaled.
* ``adapter_info.json``: the caller's metadata plus an ``"adapter"`` entry (rank, alpha, targets per model).
* ``kohya/<name>.safetensors`` (UNet models only): the kohya-ss / A1111 layout. For each adapted module
  at path ``p`` (dots -> underscores) of the UNet (prefix ``lora_unet_``) or text encoder (``lora_te_``;
  SDXL's two: ``lora_te1_``, ``lora_te2_``):
  ``<key>.lora_down.weight`` = PEFT lora_A, ``<key>.lora_up.weight`` = lora_B and ``<key>.alpha``, a 0-d
  float32 tensor with alpha / rank = the PEFT scaling. Its safetensors metadata (all strings):
  ``ss_network_module`` ("networks.lora"), ``ss_network_dim`` (UNet rank), ``ss_network_alpha`` (UNet alpha),
  ``ss_base_model_version`` (``metadata["base_model_version"]``, default "sd_v1"), ``ss_v2`` ("False"),
  ``ss_output_name`` (name), ``ss_sd_model_name`` (``metadata["base_model"]`` if given),
  ``ss_text_encoder_dim`` / ``ss_text_encoder_alpha`` when a text encoder is adapted, and
  ``evalsuite_adapter_info`` (the adapter_info.json text).

Both safetensors files have their header in a fixed order (metadata keys sorted: `canonical_safetensors`),
so the same adapter always gives the same bytes. The folder is written under a temporary name next to
``out_dir`` and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file
from torch import Tensor, nn

from evalsuite.errors import SuiteError
from evalsuite.folders import replace_folder

ADAPTER = "default"
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
INITS: dict[str, bool | str] = {"gaussian": "gaussian", "default": True}
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
INFO_FILE = "adapter_info.json"
_SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)


def _check_targets(model: nn.Module, targets: Sequence[str], what: str) -> None:
    """Raise naming every target that matches no module (PEFT rule: name == t or name ends with '.t')."""
    modules = dict(model.named_modules())
    missing, unsupported = [], []
    for t in targets:
        hits = [m for n, m in modules.items() if n == t or n.endswith("." + t)]
        if not hits:
            missing.append(t)
        elif not any(isinstance(m, _SUPPORTED) for m in hits):
            unsupported.append(f"{t} ({type(hits[0]).__name__})")
    if missing or unsupported:
        parts = [f"match no module: {', '.join(missing)}"] if missing else []
        parts += [f"match no Linear/Conv/Embedding layer: {', '.join(unsupported)}"] if unsupported else []
        raise SuiteError(f"LoRA targets for the {what} " + "; ".join(parts))


def _validate(model: nn.Module, rank: int, targets: Sequence[str], what: str) -> None:
    if rank < 1:
        raise SuiteError(f"LoRA rank for the {what} must be >= 1, got {rank}")
    if getattr(model, "peft_config", None) and ADAPTER in model.peft_config:  # type: ignore[operator]
        raise SuiteError(f"the {what} already has a LoRA adapter")
    _check_targets(model, targets, what)


def _inject(model: nn.Module, rank: int, alpha: float, targets: Sequence[str], init: str, what: str) -> None:
    kwargs: dict[str, Any] = {"lora_alpha": alpha, "init_lora_weights": INITS[init]}  # alpha: float ok
    config = LoraConfig(r=rank, target_modules=list(targets), **kwargs)
    try:
        model.add_adapter(config)  # type: ignore[operator]
    except ValueError as err:
        if "version of PEFT" not in str(err):
            raise SuiteError(f"cannot add LoRA to the {what}: {err}") from err
        # transformers 5.x refuses peft < 0.22 in add_adapter; inject with peft itself (as diffusers does)
        inject_adapter_in_model(config, model, ADAPTER)


def add_lora(unet: nn.Module, rank: int, alpha: float, targets: Sequence[str], *,
             text_encoder: nn.Module | Sequence[nn.Module] | None = None, text_rank: int | None = None,
             init: str = "gaussian") -> list[nn.Parameter]:
    """Freeze the denoiser `unet` (a UNet or a transformer) and the text encoder(s), add LoRA layers and
    return the trainable (LoRA) parameters, in the order: denoiser, then each text encoder.

    Each text encoder given (one, or several: SDXL's two CLIPs) gets LoRA on its attention projections
    (`TEXT_TARGETS`) with rank `text_rank` (default `rank`) and the same alpha. LoRA parameters are float32
    whatever the base dtype (PEFT casts the layer input to the LoRA dtype and the result back to the base
    dtype).
    """
    if init not in INITS:
        raise SuiteError(f"unknown LoRA init '{init}'; allowed: {', '.join(INITS)}")
    encoders = [text_encoder] if isinstance(text_encoder, nn.Module) else list(text_encoder or ())
    models: list[tuple[nn.Module, int, Sequence[str], str]] = [(unet, rank, targets, _kind(unet))]
    for k, encoder in enumerate(encoders):
        models.append((encoder, rank if text_rank is None else text_rank, TEXT_TARGETS,
                       "text encoder" + (f" {k + 1}" if len(encoders) > 1 else "")))
    for model, r, tgts, what in models:  # check everything before touching any model
        _validate(model, r, tgts, what)
    trainable: list[nn.Parameter] = []
    for model, r, tgts, what in models:
        model.requires_grad_(False)
        _inject(model, r, alpha, tgts, init, what)
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.data = p.data.float()
                p.requires_grad_(True)
                trainable.append(p)
            elif p.requires_grad:
                raise SuiteError(f"non-LoRA parameter {name} of the {what} is trainable after add_lora")
    return trainable


def _kind(denoiser: nn.Module) -> str:
    """How messages name a denoiser: "UNet", or "transformer" (SD3, Flux)."""
    return "UNet" if "UNet" in type(denoiser).__name__ else "transformer"


@contextmanager
def adapters_disabled(*models: nn.Module | None) -> Iterator[None]:
    """Run the base models: every PEFT adapter layer of `models` (None entries skipped) is switched off
    inside the block and on again after it, even on error.

    PEFT's switch also clears ``requires_grad`` of the adapter weights while off and sets it again when
    back on, so call this before, not between, the forward and backward passes of a trained model.
    """
    layers = [m for model in models if model is not None for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def cast_frozen(model: nn.Module, dtype: torch.dtype) -> int:
    """Store the frozen weights and biases of `model`'s linear and convolution layers in `dtype`; return
    how many tensors were cast.

    Under autocast every linear layer and convolution casts its fp32 weight and bias to the half dtype on
    each call, so keeping the frozen ones in that dtype gives bit-identical products while saving the
    per-call casts and half their memory. Norm and embedding parameters, which autocast runs in fp32,
    stay as they are, and so do trainable (LoRA) parameters: the optimizer updates them.
    """
    count = 0
    for module in model.modules():
        if not isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d):
            continue
        for p in module.parameters(recurse=False):
            if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
                count += 1
    return count


def lora_named_parameters(unet: nn.Module | Mapping[str, nn.Module | None],
                          text_encoder: nn.Module | None = None) -> dict[str, nn.Parameter]:
    """The LoRA parameters by name, e.g. for checkpoints: "unet.<path>" and "text_encoder.<path>", or,
    given a mapping of component names to models (None entries skipped), "<component>.<path>"."""
    models = unet if isinstance(unet, Mapping) else {"unet": unet, "text_encoder": text_encoder}
    out: dict[str, nn.Parameter] = {}
    for prefix, model in models.items():
        if model is not None:
            out.update({f"{prefix}.{n}": p for n, p in model.named_parameters() if "lora_" in n})
    return out


def kohya_key(module_path: str, prefix: str = "lora_unet") -> str:
    """'down_blocks.0.attentions.0.proj_in' -> 'lora_unet_down_blocks_0_attentions_0_proj_in'."""
    return f"{prefix}_{module_path.replace('.', '_')}"


def text_model_path(path: str) -> str:
    """The transformers-4 CLIP path of a text-encoder module: transformers 5 flattened `CLIPTextModel`
    ('encoder.layers.0...'), while SD 1.x LoRA files everywhere use 'text_model.encoder.layers.0...'
    (transformers 5 still loads that form, so it is what gets written)."""
    return "text_model." + path if path.startswith(("encoder.", "embeddings.", "final_layer_norm")) else path


def _lora_layers(model: nn.Module) -> list[tuple[str, Any]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_A]


def _peft_config(model: nn.Module) -> Any:
    return model.peft_config[ADAPTER]  # type: ignore[index]


def _summary(model: nn.Module) -> dict[str, Any]:
    cfg = _peft_config(model)
    return {"rank": cfg.r, "alpha": cfg.lora_alpha, "targets": sorted(cfg.target_modules),
            "modules": len(_lora_layers(model))}


def kohya_state_dict(unet: nn.Module, text_encoder: nn.Module | None = None,
                     text_encoder_2: nn.Module | None = None) -> dict[str, Tensor]:
    """The kohya-layout tensors (see the module docstring) of the adapted models, on CPU. With a second
    text encoder (SDXL) the two take the prefixes ``lora_te1`` and ``lora_te2``, else ``lora_te``."""
    out: dict[str, Tensor] = {}
    first = "lora_te" if text_encoder_2 is None else "lora_te1"
    for prefix, model in (("lora_unet", unet), (first, text_encoder), ("lora_te2", text_encoder_2)):
        if model is None:
            continue
        for path, layer in _lora_layers(model):
            key = kohya_key(text_model_path(path) if prefix != "lora_unet" else path, prefix)
            if key + ".alpha" in out:
                raise SuiteError(f"two modules map to the kohya key {key}")
            out[key + ".lora_down.weight"] = layer.lora_A[ADAPTER].weight.detach().cpu().contiguous()
            out[key + ".lora_up.weight"] = layer.lora_B[ADAPTER].weight.detach().cpu().contiguous()
            scale = float(layer.scaling[ADAPTER]) * int(layer.r[ADAPTER])
            out[key + ".alpha"] = torch.tensor(scale, dtype=torch.float32)
    return out


def load_kohya(path: Path | str) -> dict[str, Tensor]:
    """Read a kohya-layout LoRA file."""
    return load_file(str(path))


def canonical_safetensors(data: bytes) -> bytes:
    """The same safetensors file with its header in a fixed order: ``__metadata__`` first with its keys
    sorted, then the tensors in the order of their data. safetensors (0.8) writes the metadata in the
    iteration order of a Rust HashMap, which differs from process to process (and from one call to the
    next), so identical weights and metadata would otherwise give files with different bytes and hashes.
    The header is padded with spaces to a multiple of 8 bytes, as safetensors pads it."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    meta = header.pop("__metadata__", None)
    ordered: dict[str, Any] = {"__metadata__": dict(sorted(meta.items()))} if meta else {}
    ordered.update(sorted(header.items(), key=lambda item: (item[1]["data_offsets"], item[0])))
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + size:]


def save_safetensors(tensors: Mapping[str, Tensor], path: Path | str,
                     metadata: Mapping[str, str] | None = None) -> None:
    """`safetensors.torch.save_file` with the header in a fixed order (`canonical_safetensors`), so that the
    same tensors and metadata always give the same bytes, whatever order the metadata dict was built in."""
    from safetensors.torch import save

    Path(path).write_bytes(canonical_safetensors(save(dict(tensors), metadata=dict(metadata) if metadata else None)))


def canonicalise_file(path: Path | str) -> None:
    """Rewrite a safetensors file written by another library (diffusers' `save_lora_weights`) with its
    header in the fixed order of `canonical_safetensors`."""
    path = Path(path)
    path.write_bytes(canonical_safetensors(path.read_bytes()))


def _has_lora(model: nn.Module | None) -> bool:
    return model is not None and bool(getattr(model, "peft_config", None)) and bool(_lora_layers(model))


def _config_dict(model: nn.Module) -> dict[str, Any]:
    raw = _peft_config(model).to_dict()
    return json.loads(json.dumps(raw, default=lambda v: sorted(v) if isinstance(v, set) else str(v)))


def save_adapter(pipe_or_unet: Any, out_dir: Path, *, text_encoder: nn.Module | None = None,
                 metadata: Mapping[str, Any], name: str | None = None,
                 unet: nn.Module | None = None) -> dict[str, Path | None]:
    """Write the adapter folder (see the module docstring); return the paths of what was written.

    `pipe_or_unet` is a pipeline or a UNet. Of a pipeline, its denoiser (``unet``, or ``transformer`` for
    SD3 and Flux) is saved with every text encoder (``text_encoder``, ``text_encoder_2``) that carries LoRA
    layers, through the pipeline class's own ``save_lora_weights``, so that ``load_lora_weights`` of that
    class reads the folder; a bare UNet is saved as StableDiffusionPipeline saves one. `unet` overrides the
    denoiser (e.g. an unwrapped one), `text_encoder` the text encoder. `name` names the kohya file (default:
    the folder name), written for UNet models only (kohya-ss has no layout for SD3 or Flux transformers in
    diffusers' module names). Keys of the result: "dir", "diffusers", "info", "kohya" (None where no
    kohya file is written).
    """
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    pipeline = pipe_or_unet if isinstance(pipe_or_unet, DiffusionPipeline) else None
    slot = "transformer" if pipeline is not None and getattr(pipeline, "unet", None) is None else "unet"
    denoiser = unet if unet is not None else (getattr(pipeline, slot) if pipeline is not None else pipe_or_unet)
    encoders: dict[str, nn.Module] = {"text_encoder": text_encoder} if text_encoder is not None else {
        part: model for part in ("text_encoder", "text_encoder_2")
        if _has_lora(model := getattr(pipeline, part, None)) and model is not None}
    if not _has_lora(denoiser):
        raise SuiteError(f"save_adapter: the {_kind(denoiser)} has no LoRA layers (call add_lora first)")
    if text_encoder is not None and not _has_lora(text_encoder):
        raise SuiteError("save_adapter: the text encoder has no LoRA layers")
    kohya = slot == "unet"
    out_dir = Path(out_dir)
    name = name or out_dir.name
    info: dict[str, Any] = dict(metadata)
    info["adapter"] = {slot: _summary(denoiser), "format": "peft-lora",
                       **{part: _summary(model) for part, model in encoders.items()},
                       "kohya_file": f"kohya/{name}.safetensors" if kohya else None}
    info["adapter"].setdefault("text_encoder", None)
    info_text = json.dumps(info, indent=2, sort_keys=True, default=str)

    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        layers: dict[str, Any] = {f"{slot}_lora_layers": get_peft_model_state_dict(denoiser),
                                  f"{slot}_lora_adapter_metadata": _config_dict(denoiser)}
        for part, model in encoders.items():
            layers[f"{part}_lora_layers"] = {text_model_path(k): v for k, v in get_peft_model_state_dict(model).items()}
            layers[f"{part}_lora_adapter_metadata"] = _config_dict(model)
        saver = type(pipeline) if pipeline is not None else StableDiffusionPipeline
        saver.save_lora_weights(tmp, safe_serialization=True, **layers)  # type: ignore[attr-defined]
        canonicalise_file(tmp / DIFFUSERS_WEIGHTS)
        (tmp / INFO_FILE).write_text(info_text + "\n")
        if kohya:
            _write_kohya(tmp / "kohya" / f"{name}.safetensors", denoiser, encoders, info, info_text, name, metadata)
        replace_folder(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"dir": out_dir, "diffusers": out_dir / DIFFUSERS_WEIGHTS, "info": out_dir / INFO_FILE,
            "kohya": out_dir / "kohya" / f"{name}.safetensors" if kohya else None}


def _write_kohya(path: Path, unet: nn.Module, encoders: Mapping[str, nn.Module], info: Mapping[str, Any],
                 info_text: str, name: str, metadata: Mapping[str, Any]) -> None:
    """The kohya file of a UNet adapter (module docstring): its tensors and ``ss_*`` metadata."""
    unet_cfg = info["adapter"]["unet"]
    kmeta = {"ss_network_module": "networks.lora", "ss_network_dim": str(unet_cfg["rank"]),
             "ss_network_alpha": str(unet_cfg["alpha"]), "ss_v2": "False", "ss_output_name": name,
             "ss_base_model_version": str(metadata.get("base_model_version", "sd_v1")),
             "evalsuite_adapter_info": info_text}
    if "base_model" in metadata:
        kmeta["ss_sd_model_name"] = str(metadata["base_model"])
    if encoders:
        te_cfg = info["adapter"][next(iter(encoders))]
        kmeta["ss_text_encoder_dim"] = str(te_cfg["rank"])
        kmeta["ss_text_encoder_alpha"] = str(te_cfg["alpha"])
    path.parent.mkdir()
    save_safetensors(kohya_state_dict(unet, encoders.get("text_encoder"), encoders.get("text_encoder_2")), path,
                     metadata=kmeta)
