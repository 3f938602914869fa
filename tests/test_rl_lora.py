"""rl.lora and rl.checkpoint on the tiny StableDiffusionPipeline (CPU, one thread)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import get_peft_model_state_dict
from safetensors import safe_open
from tiny_pipeline import tiny_sd_pipeline

from evalsuite.errors import SuiteError
from evalsuite.models import load_adapter
from rl.advantages import PerPromptStatTracker
from rl.checkpoint import (
    capture_rng,
    latest_checkpoint,
    load_checkpoint,
    load_process_state,
    save_checkpoint,
)
from rl.lora import adapters_disabled, add_lora, cast_frozen, kohya_key, load_kohya, lora_named_parameters, save_adapter

torch.set_num_threads(1)

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in"]
RANK, ALPHA = 4, 2.0  # alpha != rank on purpose: a loader that ignores alpha gets the wrong scale


def _cond(pipe, n: int = 2) -> torch.Tensor:
    ids = pipe.tokenizer(["a photo of a nurse", "a photo of an old doctor"][:n], padding="max_length",
                         max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
    return pipe.text_encoder(ids)[0]


def _inputs(pipe) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500])


def _eps(pipe, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return pipe.unet(x, t, _cond(pipe)).sample


def _train(pipe, opt: torch.optim.Optimizer, steps: int, x: torch.Tensor | None = None) -> list[float]:
    """Dummy objective: mean squared UNet output. Without `x`, inputs come from the global torch RNG."""
    losses = []
    t = torch.tensor([10, 500])
    for _ in range(steps):
        xs = torch.randn(2, 4, 8, 8) if x is None else x
        with torch.no_grad():
            cond = _cond(pipe)
        loss = pipe.unet(xs, t, cond).sample.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _scalings(model: torch.nn.Module) -> set[float]:
    return {m.scaling["audited"] for m in model.modules()
            if isinstance(getattr(m, "scaling", None), dict) and "audited" in m.scaling}


def _check_strengths(src: str, x: torch.Tensor, t: torch.Tensor, trained: torch.Tensor, tmp_path: Path,
                     text_scaling: float | None) -> None:
    """`evalsuite run --lora SRC --lora-scale S` (`evalsuite.models.load_adapter`) loads the adapter at
    strength S: 0 is the base model exactly, 1 the adapter as trained, and S multiplies every LoRA
    update's alpha / rank, on the UNet and on the text encoder (`text_scaling`: its alpha / rank)."""
    tag = Path(src).name
    tmp_path = tmp_path / "strengths"  # apart from the adapters the caller lists
    pipes = {}
    for scale in (0.0, 1.0, 2.0):
        pipes[scale] = tiny_sd_pipeline(tmp_path / f"{tag}-x{scale:g}")
        load_adapter(pipes[scale], src, scale)
    assert torch.equal(_eps(pipes[0.0], x, t), _eps(tiny_sd_pipeline(tmp_path / f"{tag}-base"), x, t))
    torch.testing.assert_close(_eps(pipes[1.0], x, t), trained, atol=1e-5, rtol=0)
    assert _scalings(pipes[2.0].unet) == {2.0 * ALPHA / RANK}
    assert _scalings(pipes[2.0].text_encoder) == ({2.0 * text_scaling} if text_scaling else set())
    with pytest.raises(SuiteError, match="finite"):
        load_adapter(tiny_sd_pipeline(tmp_path / f"{tag}-nan"), src, float("nan"))


@pytest.fixture
def pipe(tmp_path: Path):
    return tiny_sd_pipeline(tmp_path / "base")


def test_add_lora_trainable_set_and_identity_start(pipe) -> None:
    x, t = _inputs(pipe)
    base = _eps(pipe, x, t)
    params = add_lora(pipe.unet, RANK, ALPHA, TARGETS)
    named = {n: p for n, p in pipe.unet.named_parameters() if p.requires_grad}
    assert named and all(".lora_A." in n or ".lora_B." in n for n in named)
    assert {id(p) for p in params} == {id(p) for p in named.values()}
    assert all(p.dtype == torch.float32 for p in params)
    # 4 transformers (down 1, mid 1, up 2), each: attn1 + attn2 (to_q/k/v/out.0) and proj_in = 4 * 9 modules
    assert len(params) == 2 * 36
    b = [p for n, p in named.items() if ".lora_B." in n]
    a = [p for n, p in named.items() if ".lora_A." in n]
    assert all(torch.count_nonzero(p) == 0 for p in b) and all(torch.count_nonzero(p) > 0 for p in a)
    assert torch.equal(_eps(pipe, x, t), base)  # B = 0: exactly the base model


def test_adapters_disabled_runs_the_base_model_and_switches_back(pipe) -> None:
    x, t = _inputs(pipe)
    base = _eps(pipe, x, t)
    params = add_lora(pipe.unet, RANK, ALPHA, TARGETS)
    with torch.no_grad():
        for p in params:
            p.normal_(generator=torch.Generator().manual_seed(p.numel()))
    tuned = _eps(pipe, x, t)
    assert not torch.allclose(tuned, base, atol=1e-3)
    with adapters_disabled(pipe.unet, None):
        assert torch.equal(_eps(pipe, x, t), base)
    assert torch.equal(_eps(pipe, x, t), tuned) and all(p.requires_grad for p in params)
    with pytest.raises(RuntimeError), adapters_disabled(pipe.unet):
        raise RuntimeError("switched back on even after an error")
    assert torch.equal(_eps(pipe, x, t), tuned) and all(p.requires_grad for p in params)


def test_kl_profile_is_zero_for_an_identity_adapter_and_positive_otherwise(pipe) -> None:
    from rl.families import policy_for
    from rl.profile import kl_profile, profile_table

    params = add_lora(pipe.unet, RANK, ALPHA, TARGETS)  # B = 0: the adapted model is the base model
    policy = policy_for(pipe, 5, 1.0)
    zero = kl_profile(policy, ["a photo of a nurse"], 3.0, images=2)
    assert [p.kl for p in zero] == [0.0] * 5
    assert [p.timestep for p in zero] == [int(t) for t in pipe.scheduler.timesteps]
    with torch.no_grad():
        for p in params:
            p.normal_(generator=torch.Generator().manual_seed(p.numel()))
    moved = kl_profile(policy, ["a photo of a nurse"], 3.0, images=2)
    assert all(p.kl > 0 for p in moved)
    assert moved == kl_profile(policy, ["a photo of a nurse"], 3.0, images=2)  # seeded
    assert profile_table(moved).splitlines()[-1] == f"sum over 5 steps: {sum(p.kl for p in moved):.4g}"


def test_kl_profile_command_refuses_bad_arguments_in_one_message(tmp_path: Path, capsys) -> None:
    from rl.cli import main as rl_main

    assert rl_main(["kl-profile", str(tmp_path / "none"), "--eta", "0", "--images", "0"]) == 2
    err = capsys.readouterr().err
    assert "--images 0: must be >= 1" in err and "--eta 0.0: must be in (0, 1]" in err
    assert "none': no such folder" in err and "Traceback" not in err
    assert rl_main(["kl-profile", str(tmp_path / "none"), "--eta", "1.5"]) == 2  # rl.ddim would raise ValueError
    assert "--eta 1.5: must be in (0, 1]" in capsys.readouterr().err


def test_add_lora_rejects_bad_targets_and_init(pipe, tmp_path: Path) -> None:
    with pytest.raises(SuiteError, match=r"to_qq, nonexistent"):
        add_lora(pipe.unet, RANK, ALPHA, ["to_q", "to_qq", "nonexistent"])
    assert all(p.requires_grad for p in pipe.unet.parameters())  # a refused call leaves the model alone
    with pytest.raises(SuiteError, match=r"attn1 \(Attention\)"):
        add_lora(pipe.unet, RANK, ALPHA, ["attn1"])
    with pytest.raises(SuiteError, match="unknown LoRA init"):
        add_lora(pipe.unet, RANK, ALPHA, TARGETS, init="pissa")
    add_lora(pipe.unet, RANK, ALPHA, TARGETS)
    with pytest.raises(SuiteError, match="already has a LoRA adapter"):
        add_lora(pipe.unet, RANK, ALPHA, TARGETS)
    half = tiny_sd_pipeline(tmp_path / "half").unet.half()
    assert all(p.dtype == torch.float32 for p in add_lora(half, RANK, ALPHA, TARGETS))


def test_training_moves_only_lora(pipe) -> None:
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    params = add_lora(pipe.unet, RANK, ALPHA, TARGETS)
    lora_before = [p.detach().clone() for p in params]
    x, _ = _inputs(pipe)
    _train(pipe, torch.optim.AdamW(params, lr=1e-2), 2, x)
    assert all(not torch.equal(p, q) for p, q in zip(params, lora_before, strict=True))
    base_now = {n.replace(".base_layer", ""): p for n, p in pipe.unet.named_parameters() if "lora_" not in n}
    assert base_now.keys() == before.keys()
    assert all(torch.equal(base_now[n], before[n]) for n in before)


def test_save_adapter_round_trips(pipe, tmp_path: Path) -> None:
    params = add_lora(pipe.unet, RANK, ALPHA, TARGETS)
    x, t = _inputs(pipe)
    _train(pipe, torch.optim.AdamW(params, lr=1e-2), 2, x)
    trained = _eps(pipe, x, t)
    meta = {"guidance_scale": 7.5, "rank": RANK, "alpha": ALPHA, "targets": TARGETS, "base_model": "tiny"}
    paths = save_adapter(pipe, tmp_path / "adapter", metadata=meta, name="tiny_rl")
    assert set(paths) == {"dir", "diffusers", "info", "kohya"} and all(p.exists() for p in paths.values())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".adapter")]  # no temporary left over
    info = json.loads(paths["info"].read_text())
    assert info["guidance_scale"] == 7.5 and info["adapter"]["unet"]["rank"] == RANK
    assert info["adapter"]["unet"]["alpha"] == ALPHA and info["adapter"]["text_encoder"] is None

    fresh = tiny_sd_pipeline(tmp_path / "fresh")
    assert not torch.equal(_eps(fresh, x, t), trained)
    fresh.load_lora_weights(paths["dir"])
    torch.testing.assert_close(_eps(fresh, x, t), trained, atol=1e-5, rtol=0)

    _check_strengths(str(paths["dir"]), x, t, trained, tmp_path, text_scaling=None)
    _check_strengths(str(paths["kohya"]), x, t, trained, tmp_path, text_scaling=None)

    kohya = load_kohya(paths["kohya"])
    peft_sd = get_peft_model_state_dict(pipe.unet)
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in peft_sd})
    assert len(kohya) == 3 * len(modules)
    for path in modules:
        key = kohya_key(path)
        assert torch.equal(kohya[key + ".lora_down.weight"], peft_sd[path + ".lora_A.weight"])
        assert torch.equal(kohya[key + ".lora_up.weight"], peft_sd[path + ".lora_B.weight"])
        assert kohya[key + ".alpha"].shape == () and kohya[key + ".alpha"].item() == ALPHA
    for key in ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight",
                "lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_attn2_to_out_0.lora_up.weight",
                "lora_unet_mid_block_attentions_0_proj_in.alpha"):
        assert key in kohya
    assert kohya["lora_unet_mid_block_attentions_0_proj_in.lora_down.weight"].shape == (RANK, 16, 1, 1)
    with safe_open(str(paths["kohya"]), "pt") as f:
        kmeta = f.metadata()
    assert kmeta["ss_network_dim"] == "4" and kmeta["ss_network_alpha"] == "2.0"
    assert kmeta["ss_base_model_version"] == "sd_v1" and kmeta["ss_sd_model_name"] == "tiny"
    # diffusers' kohya converter maps these names back to the UNet and honours the per-module .alpha
    via_kohya = tiny_sd_pipeline(tmp_path / "fresh_kohya")
    via_kohya.load_lora_weights(str(paths["kohya"]))
    torch.testing.assert_close(_eps(via_kohya, x, t), trained, atol=1e-5, rtol=0)
    again = save_adapter(pipe, tmp_path / "adapter", metadata=meta, name="tiny_rl")  # replaces the folder
    assert again == paths and torch.equal(load_kohya(again["kohya"])[key], kohya[key])
    assert sorted(p.name for p in tmp_path.iterdir() if "adapter" in p.name) == ["adapter"]


def test_save_adapter_with_text_encoder(pipe, tmp_path: Path) -> None:
    params = add_lora(pipe.unet, RANK, ALPHA, TARGETS, text_encoder=pipe.text_encoder, text_rank=1)
    te_trainable = [n for n, p in pipe.text_encoder.named_parameters() if p.requires_grad]
    assert len(te_trainable) == 2 * 4 and all("self_attn" in n and "lora_" in n for n in te_trainable)
    x, t = _inputs(pipe)
    opt = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(2):  # train through the text encoder too
        loss = pipe.unet(x, t, _cond(pipe)).sample.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    trained = _eps(pipe, x, t)
    paths = save_adapter(pipe, tmp_path / "adapter", metadata={})
    _check_strengths(str(paths["dir"]), x, t, trained, tmp_path, text_scaling=ALPHA / 1)

    kohya = load_kohya(paths["kohya"])
    te_key = "lora_te_text_model_encoder_layers_0_self_attn_out_proj"  # the transformers-4 CLIP path
    assert kohya[te_key + ".lora_down.weight"].shape == (1, 16) and kohya[te_key + ".alpha"].item() == ALPHA
    assert sum(k.startswith("lora_te_") for k in kohya) == 4 * 3
    for src in (paths["dir"], str(paths["kohya"])):
        fresh = tiny_sd_pipeline(tmp_path / "fresh")
        fresh.load_lora_weights(src)
        torch.testing.assert_close(_eps(fresh, x, t), trained, atol=1e-5, rtol=0)


def _lora_run(tmp: Path) -> tuple[object, dict[str, torch.nn.Parameter], torch.optim.Optimizer]:
    p = tiny_sd_pipeline(tmp)
    add_lora(p.unet, RANK, ALPHA, TARGETS)
    named = lora_named_parameters(p.unet)
    return p, named, torch.optim.AdamW(list(named.values()), lr=1e-2)


def _probe() -> tuple[list[float], list[float], float]:
    return torch.rand(4).tolist(), np.random.rand(3).tolist(), random.random()


def test_checkpoint_resume_is_exact(tmp_path: Path) -> None:
    torch.manual_seed(123)
    np.random.seed(5)
    random.seed(9)
    pipe, named, opt = _lora_run(tmp_path / "a")
    first = _train(pipe, opt, 2)
    extra = {"tracker": {"a photo of a nurse": [0.1, 0.2]}, "log_offset": 17}
    ckpt = save_checkpoint(tmp_path / "ckpt", step=2, trainable=named, optimizer=opt, rng=capture_rng(),
                           extra=extra)
    assert ckpt.name == "step-000002" and latest_checkpoint(tmp_path / "ckpt") == ckpt
    at2 = {n: p.detach().clone() for n, p in named.items()}
    probe = _probe()
    rest = _train(pipe, opt, 2)
    assert len(first + rest) == 4

    # both files read back with weights_only=True
    assert torch.load(ckpt / "optimizer.pt", weights_only=True)["state"]
    assert "python" in torch.load(ckpt / "rng.pt", weights_only=True)

    torch.manual_seed(999)  # disturb every RNG; the checkpoint must restore them
    np.random.seed(999)
    random.seed(999)
    pipe2, named2, opt2 = _lora_run(tmp_path / "b")
    step, extra2 = load_checkpoint(ckpt, params=named2, optimizer=opt2)
    assert step == 2 and extra2 == extra
    assert named2.keys() == at2.keys() and all(torch.equal(named2[n], at2[n]) for n in at2)
    assert _probe() == probe
    assert _train(pipe2, opt2, 2) == rest  # exactly the uninterrupted losses
    assert all(torch.equal(named2[n], named[n]) for n in named)

    bad = {n.replace("lora_A", "lora_X"): p for n, p in named2.items()}
    with pytest.raises(SuiteError, match="names differ"):
        load_checkpoint(ckpt, params=bad, optimizer=None)


def test_checkpoint_keeps_newest(tmp_path: Path) -> None:
    lin = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-2)
    lin(torch.ones(1, 3)).sum().backward()
    opt.step()
    folder = tmp_path / "ckpt"
    assert latest_checkpoint(folder) is None
    for step in (1, 2, 10, 3):
        save_checkpoint(folder, step=step, model=lin, optimizer=opt, rng=capture_rng(), extra={"step": step},
                        keep=2)
    assert sorted(p.name for p in folder.iterdir()) == ["step-000003", "step-000010"]
    assert latest_checkpoint(folder) == folder / "step-000010"
    with pytest.raises(SuiteError, match="JSON"):
        save_checkpoint(folder, step=11, trainable=dict(lin.named_parameters()), optimizer=opt,
                        rng=capture_rng(), extra={"bad": object()})
    assert latest_checkpoint(folder) == folder / "step-000010"
    step, extra = load_checkpoint(folder / "step-000010", model=lin, optimizer=opt, rng=False)
    assert (step, extra) == (10, {"step": 10})
    with pytest.raises(SuiteError, match="exactly one"):
        load_checkpoint(folder / "step-000010", model=lin, params=dict(lin.named_parameters()))


def test_checkpoint_keeps_each_process_state_and_the_loss_scaler(tmp_path: Path) -> None:
    lin = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-2)
    # one fp16-style scaled step (GradScaler works on the CPU too): finite gradients, so the scale stays
    # 2^10 and the growth tracker counts 1 step of growth_interval 3
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
    scaler.scale(lin(torch.ones(1, 3)).sum()).backward()
    scaler.step(opt)
    scaler.update()
    # two processes, each with its own tracker and RNG states
    trackers = [PerPromptStatTracker(4, 2), PerPromptStatTracker(4, 2)]
    trackers[0].update(["a", "a"], np.array([1.0, 2.0]))
    trackers[1].update(["b"], np.array([5.0]))
    torch.manual_seed(1)
    rngs = [capture_rng()]
    torch.manual_seed(2)
    rngs.append(capture_rng())
    processes = [{"rng": r, "tracker": t.state_dict()} for r, t in zip(rngs, trackers, strict=True)]
    ckpt = save_checkpoint(tmp_path / "ckpt", step=3, model=lin, optimizer=opt, rng=rngs[0], extra={"log_lines": 3},
                           processes=processes, scaler=scaler.state_dict())

    fresh = torch.amp.GradScaler("cpu")  # init_scale 2^16, growth_interval 2000
    step, extra = load_checkpoint(ckpt, model=lin, optimizer=opt, rng=False, scaler=fresh)
    assert (step, extra) == (3, {"log_lines": 3})
    assert fresh.state_dict() == {"scale": 1024.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 3,
                                  "_growth_tracker": 1}
    second = load_process_state(ckpt, 1, 2)
    assert second["tracker"] == {"buffer_size": 4, "min_count": 2, "buffers": {"b": [5.0]}}
    assert torch.equal(second["rng"]["torch"], rngs[1]["torch"])
    assert load_process_state(ckpt, 0, 2)["tracker"]["buffers"] == {"a": [1.0, 2.0]}
    with pytest.raises(SuiteError, match=r"holds the state of 2 process\(es\), not 1: resume with as many"):
        load_process_state(ckpt, 0, 1)

    # a checkpoint written before per-process states held one process's, in rng.pt and extra
    old = save_checkpoint(tmp_path / "old", step=1, model=lin, optimizer=opt, rng=rngs[1],
                          extra={"tracker": trackers[0].state_dict(), "log_lines": 1})
    state = json.loads((old / "state.json").read_text())
    del state["processes"]
    (old / "state.json").write_text(json.dumps(state))
    own = load_process_state(old, 0, 1)
    assert own["tracker"]["buffers"] == {"a": [1.0, 2.0]} and torch.equal(own["rng"]["torch"], rngs[1]["torch"])
    with pytest.raises(SuiteError, match=r"holds the state of 1 process\(es\), not 2"):
        load_process_state(old, 1, 2)
    fresh = torch.amp.GradScaler("cpu")  # no scaler.pt: the scaler is left as it is
    load_checkpoint(old, model=lin, optimizer=opt, rng=False, scaler=fresh)
    assert fresh.get_scale() == 2.0**16


def test_cast_frozen_gives_autocast_products_and_keeps_lora_float32(pipe) -> None:
    params = add_lora(pipe.unet, RANK, ALPHA, TARGETS)
    x, t = _inputs(pipe)
    with torch.no_grad():
        cond = _cond(pipe)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = pipe.unet(x, t, cond).sample
    layers = [m for m in pipe.unet.modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)]
    frozen = [p for m in layers for p in m.parameters(recurse=False) if not p.requires_grad]
    assert cast_frozen(pipe.unet, torch.bfloat16) == len(frozen) > 0
    assert all(p.dtype == torch.bfloat16 for p in frozen)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in params)
    norms = [p for m in pipe.unet.modules() if isinstance(m, torch.nn.GroupNorm) for p in m.parameters()]
    assert norms and all(p.dtype == torch.float32 for p in norms)  # autocast runs norms in fp32: kept
    with torch.autocast("cpu", dtype=torch.bfloat16):
        after = pipe.unet(x, t, cond).sample
    # autocast cast the fp32 weights to bf16 on each call: stored bf16 weights give the same products
    assert torch.equal(after, before), (after.float() - before.float()).abs().max()
    assert cast_frozen(pipe.unet, torch.bfloat16) == 0
