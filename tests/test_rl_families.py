"""RL fine-tuning of every family the trainer drives (rl.families), on tiny random pipelines
(tests/tiny_pipeline.py): SD 1.x and SDXL through stochastic DDIM, SD3 and Flux through the flow SDE
(rl.flow_sde). The flow step against the scheduler's Euler step and an independent Gaussian; each family's
recorded log-probabilities against the density written out here and against the update's (the first
ratio is 1); the KL to the base model; Flux's distilled guidance as one pass; then `rl finetune` end to
end: the LoRA moves and the base does not, a resumed run is the uninterrupted one, the adapter loads
into the plain diffusers pipeline and changes its images; untrainable pipelines are refused before they
load."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from diffusers import FlowMatchEulerDiscreteScheduler
from safetensors.torch import load_file
from tiny_pipeline import BUILDERS, save_tiny_pipeline, tiny_flux_pipeline

from evalsuite.errors import SuiteError
from evalsuite.miniature import ASSETS
from rl.cli import main as rl_main
from rl.families import policy_for
from rl.flow_sde import flow_sde_kl, flow_sde_moments, flow_sde_step
from rl.lora import add_lora

torch.set_num_threads(2)
ROOT = Path(__file__).resolve().parents[1]
CLIP = ASSETS / "clip"  # the miniature world's CLIP reads any image and knows the battery's words
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
FAMILIES = ["sd1", "sdxl", "sd3", "flux"]
PROMPTS = ["a photo of a nurse", "a photo of a judge"]

# no `domains:` section: natural images are scored by the CLIP with no face detector (random images have no face)
BATTERY = """\
schema_version: 1
name: rl-families
version: "1"
templates: ["a photo of a {occupation}"]
slots: {occupation: [nurse, doctor, judge]}
heldout: {occupation: [judge]}
attributes:
  skin_tone:
    classes: {light: "a photo of a person with light skin", dark: "a photo of a person with dark skin"}
guidance_scales: [1.0, 4.0]
images_per_prompt: 2
seed: 0
steps: 2
classifier: clip
"""


def tiny_policy(family: str, tmp_path: Path, steps: int = 3, noise: float = 0.7) -> Any:
    """A family's tiny pipeline, its policy and a LoRA (B = 0: the base model); Flux at 16 x 16 latents
    (its pipeline's default is 128: 4,096 tokens). "sd3-no-t5": SD3 without its T5 (`drop_t5`);
    "sdxl-text": SDXL with a LoRA on both text encoders too, its B drawn at random so that it acts."""
    pipe = BUILDERS[family.split("-")[0]](tmp_path)
    if family == "flux":
        pipe.default_sample_size = 16
    if family == "sd3-no-t5":
        pipe.text_encoder_3, pipe.tokenizer_3 = None, None
    policy = policy_for(pipe, steps, noise, text_encoder_rank=2 if family == "sdxl-text" else 0)
    torch.manual_seed(0)
    encoders = list(policy.text_encoders.values()) if family == "sdxl-text" else None
    add_lora(policy.denoiser, 2, 2.0, TARGETS, text_encoder=encoders)
    for module in policy.frozen + ([] if encoders else list(policy.text_encoders.values())):  # as rl.train
        module.requires_grad_(False)
    for encoder in encoders or ():
        for name, p in encoder.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.5)
    return policy


def flow_schedule(dynamic: bool) -> torch.Tensor:
    """The sigma schedule of SD3's scheduler (static shift 3) or Flux's (dynamic shift of 64 tokens)."""
    if dynamic:
        sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
        sched.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25], mu=0.6)
    else:
        sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
        sched.set_timesteps(4)
    return sched.sigmas


def expected_flow_step(sigmas: torch.Tensor, i: int, v: torch.Tensor, x: torch.Tensor,
                       a: float) -> tuple[torch.Tensor, float]:
    """Flow-GRPO's step from sigma t = sigmas[i] to t' = sigmas[i + 1], written out here: sigma_t =
    a sqrt(t / (1 - t)) with 1 - t taken at sigmas[1] where t = 1; mean = x + (t' - t) [v + sigma_t^2 / (2t)
    (x + (1 - t) v)], std = sigma_t sqrt(t - t')."""
    t, t_next = float(sigmas[i]), float(sigmas[i + 1])
    sigma_t = a * math.sqrt(t / (1 - (float(sigmas[1]) if t == 1.0 else t)))
    mean = x + (t_next - t) * (v + sigma_t**2 / (2 * t) * (x + (1 - t) * v))
    return mean, sigma_t * math.sqrt(t - t_next)


# ---------------------------------------------------------------------------------- the flow SDE step


@pytest.mark.parametrize("dynamic", [False, True])
def test_at_noise_level_zero_the_flow_step_is_the_schedulers_euler_step(dynamic: bool) -> None:
    sigmas = flow_schedule(dynamic)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.sigmas, sched.timesteps = sigmas, sigmas[:-1] * 1000
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(2, 4, 6, 6, generator=g), torch.randn(2, 4, 6, 6, generator=g)
    sched._step_index = None
    for i, t in enumerate(sched.timesteps):
        mean, std = flow_sde_moments(sigmas, torch.tensor([i, i]), v, x, 0.0)
        euler = sched.step(v, t, x, return_dict=False)[0]
        assert torch.equal(std, torch.zeros_like(std))
        assert torch.allclose(mean, euler, atol=1e-6, rtol=0), i


@pytest.mark.parametrize("dynamic", [False, True])
def test_the_flow_step_log_prob_and_kl_are_those_of_the_gaussian(dynamic: bool) -> None:
    sigmas = flow_schedule(dynamic).double()
    g = torch.Generator().manual_seed(1)
    x, v, v_ref, z = (torch.randn(3, 4, 6, 6, generator=g, dtype=torch.float64) for _ in range(4))
    for i in range(len(sigmas) - 1):  # the first step (t = 1) and the last (t' = 0) included
        index = torch.full((3,), i)
        prev, logp = flow_sde_step(sigmas, index, v, x, 0.7, variance_noise=z)
        mean, std = expected_flow_step(sigmas, i, v, x, 0.7)
        normal = torch.distributions.Normal(mean, std)
        assert torch.allclose(prev, mean + std * z, atol=1e-12)
        assert torch.allclose(logp, normal.log_prob(prev).mean(dim=(1, 2, 3)), atol=1e-10), i
        # scoring the recorded step again (training) gives the same number
        assert torch.equal(flow_sde_step(sigmas, index, v, x, 0.7, prev_sample=prev)[1], logp)
        ref_mean, _ = expected_flow_step(sigmas, i, v_ref, x, 0.7)
        kl = torch.distributions.kl_divergence(normal, torch.distributions.Normal(ref_mean, std))
        assert torch.allclose(flow_sde_kl(sigmas, index, v, v_ref, x, 0.7), kl.mean(dim=(1, 2, 3)), rtol=1e-10)
    with pytest.raises(SuiteError, match="noise_level must be > 0"):
        flow_sde_step(sigmas, torch.zeros(3, dtype=torch.long), v, x, 0.0, variance_noise=z)


# ------------------------------------------------------------------------------- each family's policy


def expected_moments(policy: Any, out: torch.Tensor, x: torch.Tensor, i: int) -> tuple[torch.Tensor, float]:
    """Mean and std of step i from the model output, written out here (in float64): the flow SDE
    (`expected_flow_step`) or DDIM's eqs. 12 and 16 (Song et al. 2021) with eta."""
    out, x = out.double(), x.double()
    if hasattr(policy, "sigmas"):
        return expected_flow_step(policy.sigmas.double(), i, out, x, policy.noise_level)
    sched = policy.pipe.scheduler
    t = int(policy.timesteps[i])
    t_prev = t - 1000 // policy.steps
    a_t = float(sched.alphas_cumprod[t])
    a_prev = float(sched.alphas_cumprod[t_prev]) if t_prev >= 0 else float(sched.final_alpha_cumprod)
    std = policy.eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    x0 = (x - math.sqrt(1 - a_t) * out) / math.sqrt(a_t)
    return math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - std**2) * out, std


def expected_density(policy: Any, out: torch.Tensor, x: torch.Tensor, x_prev: torch.Tensor,
                     i: int) -> torch.Tensor:
    """The step's Gaussian log-density, the mean over the non-batch elements (`expected_moments`)."""
    mean, std = expected_moments(policy, out, x, i)
    return torch.distributions.Normal(mean, std).log_prob(x_prev.double()).mean(dim=tuple(range(1, x.ndim)))


@pytest.mark.parametrize("family", [*FAMILIES, "sd3-no-t5", "sdxl-text"])
def test_each_familys_log_probs_are_its_gaussian_steps_and_the_first_ratio_is_one(family: str,
                                                                                   tmp_path: Path) -> None:
    policy = tiny_policy(family, tmp_path)
    with torch.no_grad():  # sampling encodes without gradients; the update again, with them (a text LoRA)
        cond, uncond = policy.encode(PROMPTS), policy.encode_empty()
    scales = torch.tensor([1.0, 4.0])
    chain = policy.sample(policy.denoiser, cond, uncond, scales, policy.initial_noise([3, 4]), seed=5)
    cond, uncond = policy.encode(PROMPTS), policy.encode_empty()
    # (the tiny CLIPs have one layer, so SDXL's penultimate states are their embeddings; the pooled output is not)
    assert (cond.pooled if cond.pooled is not None else cond.states).requires_grad == (family == "sdxl-text")
    assert chain.latents.shape[:2] == (2, 4) and chain.log_probs.shape == (2, 3)
    assert torch.isfinite(chain.log_probs).all()
    for i in range(3):
        step = torch.full((2,), i)
        x, x_prev = chain.latents[:, i], chain.latents[:, i + 1]
        out = policy.output(policy.denoiser, x, step, cond, uncond, scales)  # as the update runs it: with gradients
        logp = policy.step_log_prob(out, x, x_prev, step)
        assert logp.requires_grad
        assert torch.allclose(torch.exp(logp - chain.log_probs[:, i]), torch.ones(2), rtol=0, atol=1e-6)
        assert torch.allclose(logp.detach().double(), expected_density(policy, out.detach(), x, x_prev, i),
                              atol=1e-5), (family, i)
    images = policy.decode(chain.final)
    assert images.dtype.name == "uint8" and images.shape[0] == 2 and images.shape[-1] == 3


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_the_kl_to_the_base_model_is_zero_at_the_start_and_the_gaussian_kl_after(family: str,
                                                                                   tmp_path: Path) -> None:
    from rl.lora import adapters_disabled

    policy = tiny_policy(family, tmp_path)
    cond, uncond = policy.encode(PROMPTS), policy.encode_empty()
    scales, step = torch.tensor([4.0, 4.0]), torch.tensor([0, 1])
    x = policy.initial_noise([1, 2])
    with torch.no_grad():
        base = policy.output(policy.denoiser, x, step, cond, uncond, scales)
        assert torch.equal(policy.step_kl(policy.output(policy.denoiser, x, step, cond, uncond, scales), base, x, step),
                           torch.zeros(2))
        for name, p in policy.denoiser.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
        tuned = policy.output(policy.denoiser, x, step, cond, uncond, scales)
        with adapters_disabled(policy.denoiser):
            assert torch.equal(policy.output(policy.denoiser, x, step, cond, uncond, scales), base)
    kl = policy.step_kl(tuned, base, x, step)
    expected = []
    for k in range(2):  # the KL of two Gaussians of one std: ||mu_1 - mu_2||^2 / (2 std^2), mean over elements
        m1, std = expected_moments(policy, tuned[k:k + 1], x[k:k + 1], int(step[k]))
        m2, _ = expected_moments(policy, base[k:k + 1], x[k:k + 1], int(step[k]))
        expected.append(float(((m1 - m2) ** 2 / (2 * std**2)).mean()))
    assert (kl > 0).all() and torch.allclose(kl.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-4)


@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_the_kl_profile_of_each_family_is_zero_for_its_base_and_its_policys_kl_after(family: str,
                                                                                      tmp_path: Path) -> None:
    from rl.lora import adapters_disabled
    from rl.profile import kl_profile

    policy = tiny_policy(family, tmp_path)  # LoRA B = 0: the adapted model is its base
    zero = kl_profile(policy, PROMPTS[:1], 4.0, images=2)
    assert [p.kl for p in zero] == [0.0] * 3 and [p.timestep for p in zero] == policy.timesteps.tolist()
    with torch.no_grad():
        for name, p in policy.denoiser.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    moved = kl_profile(policy, PROMPTS[:1], 4.0, images=2)
    assert all(p.kl > 0 for p in moved) and moved == kl_profile(policy, PROMPTS[:1], 4.0, images=2)  # seeded
    # the first step starts both chains from the seeds' noise: its KL is the Gaussians' written out here
    x, step, scales = policy.initial_noise([0, 1]), torch.tensor([0, 0]), torch.tensor([4.0, 4.0])
    cond, uncond = policy.encode(PROMPTS[:1] * 2), policy.encode_empty()
    with torch.no_grad():
        tuned = policy.output(policy.denoiser, x, step, cond, uncond, scales)
        with adapters_disabled(policy.denoiser):
            base = policy.output(policy.denoiser, x, step, cond, uncond, scales)
    expected = []
    for k in range(2):
        m1, std = expected_moments(policy, tuned[k:k + 1], x[k:k + 1], 0)
        m2, _ = expected_moments(policy, base[k:k + 1], x[k:k + 1], 0)
        expected.append(float(((m1 - m2) ** 2 / (2 * std**2)).mean()))
    assert moved[0].kl == pytest.approx(sum(expected) / 2, rel=1e-4)


def test_flux_feeds_the_guidance_scale_to_its_transformer_in_one_pass(tmp_path: Path) -> None:
    """Distilled guidance: the scale is the transformer's `guidance` input, one pass per step whatever the
    scale (no unconditional pass); a model without guidance embeddings (schnell) ignores the scale."""
    policy = tiny_policy("flux", tmp_path)
    cond, uncond = policy.encode(PROMPTS), policy.encode_empty()
    x, step = policy.initial_noise([1, 2]), torch.tensor([0, 0])
    calls: list[tuple[int, Any]] = []
    hook = policy.denoiser.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append((len(kwargs["hidden_states"]), kwargs["guidance"])),
        with_kwargs=True)
    with torch.no_grad():
        low = policy.output(policy.denoiser, x, step, cond, uncond, torch.tensor([1.0, 1.0]))
        high = policy.output(policy.denoiser, x, step, cond, uncond, torch.tensor([1.0, 4.0]))
    hook.remove()
    assert [n for n, _ in calls] == [2, 2] and calls[1][1].tolist() == [1.0, 4.0]
    assert torch.equal(low[0], high[0]) and not torch.equal(low[1], high[1])
    schnell = tiny_flux_pipeline(tmp_path, guidance_embeds=False)
    schnell.default_sample_size = 16
    plain = policy_for(schnell, 3, 0.7)
    with torch.no_grad():
        a = plain.output(plain.denoiser, x, step, cond, uncond, torch.tensor([1.0, 1.0]))
        b = plain.output(plain.denoiser, x, step, cond, uncond, torch.tensor([4.0, 7.0]))
    assert torch.equal(a, b)


def test_untrainable_pipelines_and_text_loras_of_flow_models_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SuiteError, match="is a PixArtSigmaPipeline, which rl finetune cannot train; it trains SD"):
        policy_for(BUILDERS["pixart"](tmp_path), 3, 1.0)
    with pytest.raises(SuiteError, match="lora.text_encoder_rank: 2, but a SD3/SD3.5 model"):
        policy_for(BUILDERS["sd3"](tmp_path), 3, 0.7, text_encoder_rank=2)


# ------------------------------------------------------------------------------------- rl finetune


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    built: dict[str, Path] = {}

    def folder(family: str) -> Path:
        if family not in built:
            built[family] = save_tiny_pipeline(family, tmp_path_factory.mktemp(family))
        return built[family]

    return folder


def write_config(folder: Path, model: Path, **extra: Any) -> Path:
    """A toy config on `model`: 2 groups of 3 images, 2 DDIM/SDE steps, the miniature config otherwise,
    rewards read by the miniature world's CLIP (a natural-domain classifier)."""
    (folder / "battery.yaml").write_text(BATTERY)
    data = yaml.safe_load((ROOT / "rl" / "configs" / "miniature-mmd.yaml").read_text())  # no KL term
    data.update(model=str(model), battery="battery.yaml", reward_classifier=f"clip:{CLIP}", embedder=f"clip:{CLIP}",
                validity_threshold=0.0, checkpoint_every=1, **extra)
    data["sampling"].update(steps=2, prompts_per_epoch=2, group_size=3, batch_size=6, guidance_scales=[1.0, 4.0])
    data["training"].update(batch_size=3, learning_rate=1e-2, timestep_window=1.0, timestep_fraction=0.5)
    data["lora"].update(rank=2, alpha=2.0)
    data["evaluation"].update(classifier=f"clip:{CLIP}", allow_same_classifier=True)
    data["rewards"] = [{"name": "diversity", "weight": 1.0}, {"name": "alignment", "weight": 0.1}]
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def finetune(config: Path, out: Path, *extra: str) -> int:
    return rl_main(["-q", "finetune", "--config", str(config), "--no-eval", f"output_dir={out}", *extra])


def sample_images(pipe: Any, family: str) -> Any:
    kwargs: dict[str, Any] = {"height": 32, "width": 32} if family != "flux" else {"height": 16, "width": 16}
    generator = torch.Generator().manual_seed(0)
    return pipe(prompt=PROMPTS[0], num_inference_steps=2, guidance_scale=4.0, generator=generator,
                output_type="np", **kwargs).images


def finetune_family(family: str, tiny_model: Callable[[str], Path], tmp_path: Path, *extra: str) -> None:
    model = tiny_model(family)
    config = write_config(tmp_path, model)
    text = ("lora.text_encoder_rank=2",) if family == "sdxl" else ()
    assert finetune(config, tmp_path / "whole", "training.epochs=2", *text, *extra) == 0
    assert finetune(config, tmp_path / "cut", "training.epochs=1", *text, *extra) == 0
    shutil.rmtree(tmp_path / "cut" / "adapter")
    assert finetune(config, tmp_path / "cut", "training.epochs=2", *text, *extra) == 0  # resumes from epoch 1
    whole, cut = (tmp_path / "whole", tmp_path / "cut")
    rows = [[{k: v for k, v in json.loads(line).items() if k != "epoch_s"}
             for line in (run / "log.jsonl").read_text().splitlines()] for run in (whole, cut)]
    assert rows[0] == rows[1] and len(rows[0]) == 2
    assert json.loads((whole / "process-0.json").read_text()) == json.loads((cut / "process-0.json").read_text())
    assert (whole / "adapter" / "pytorch_lora_weights.safetensors").read_bytes() == \
        (cut / "adapter" / "pytorch_lora_weights.safetensors").read_bytes()
    # one epoch moved every LoRA B of the denoiser (it starts at zero)
    first = load_file(str(whole / "checkpoints" / "step-000001" / "lora.safetensors"))
    prefix = "unet." if family in ("sd1", "sdxl") else "transformer."
    assert first and all(k.startswith((prefix, "text_encoder.", "text_encoder_2.")) for k in first)
    assert all(v.abs().sum() > 0 for k, v in first.items() if "lora_B" in k and k.startswith(prefix))
    if text:  # SDXL's context is each CLIP's penultimate states, which a one-layer CLIP's LoRA cannot reach;
        # the second CLIP's pooled projection, after its layer, can
        assert all(v.abs().sum() > 0 for k, v in first.items() if "lora_B" in k and k.startswith("text_encoder_2."))
        assert any(k.startswith("text_encoder.") for k in first)

    # the exported adapter loads into the plain diffusers pipeline, leaves its base weights and changes its images
    from diffusers import DiffusionPipeline

    plain = DiffusionPipeline.from_pretrained(model, use_safetensors=True)
    tuned = DiffusionPipeline.from_pretrained(model, use_safetensors=True)
    tuned.load_lora_weights(str(whole / "adapter"))
    denoiser = "unet" if family in ("sd1", "sdxl") else "transformer"
    for part in (denoiser, *(("text_encoder", "text_encoder_2") if text else ())):
        tuned_sd, base_sd = getattr(tuned, part).state_dict(), getattr(plain, part).state_dict()
        assert any("lora" in name for name in tuned_sd), part
        for name, tensor in tuned_sd.items():
            if "lora" not in name:
                assert torch.equal(tensor, base_sd[name.replace(".base_layer", "")]), name
    before, after = sample_images(plain, family), sample_images(tuned, family)
    assert abs(before - after).max() > 0
    info = json.loads((whole / "adapter" / "adapter_info.json").read_text())
    assert info["adapter"][denoiser]["rank"] == 2
    if family == "sdxl":  # the kohya file names both text encoders as kohya-ss does for SDXL
        kohya = load_file(str(whole / "adapter" / "kohya" / "adapter.safetensors"))
        assert {k.split("_", 2)[1] for k in kohya} == {"unet", "te1", "te2"}
        assert info["base_model_version"] == "sdxl_base_v1-0"
        again = DiffusionPipeline.from_pretrained(model, use_safetensors=True)
        again.load_lora_weights(str(whole / "adapter" / "kohya" / "adapter.safetensors"))
        assert abs(sample_images(again, family) - after).max() < 1e-4
    else:
        assert info["adapter"]["kohya_file"] is None or family == "sd1"


def test_finetune_moves_the_lora_resumes_exactly_and_exports_a_loadable_adapter(
        tiny_model: Callable[[str], Path], tmp_path: Path) -> None:
    """SD3 (the flow SDE) end to end; the other families in the slow tier."""
    finetune_family("sd3", tiny_model, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd1", "sdxl", "flux"])
def test_finetune_of_the_other_families(family: str, tiny_model: Callable[[str], Path], tmp_path: Path) -> None:
    """As above for a tiny SD 1.x folder, SDXL with a LoRA on both text encoders and its kohya file, and Flux
    (its pipeline renders 128 x 128 latents: slow)."""
    finetune_family(family, tiny_model, tmp_path)


def test_finetune_refuses_an_untrainable_pipeline_before_it_loads(tiny_model: Callable[[str], Path], tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, tiny_model("pixart"))
    assert finetune(config, tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert "model: " in err and "is a PixArtSigmaPipeline, which rl finetune cannot train" in err, err
    assert err.count("\n  - ") <= 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()
    sd3 = write_config(tmp_path, tiny_model("sd3"))
    assert finetune(sd3, tmp_path / "run", "lora.text_encoder_rank=2") == 2
    assert "lora.text_encoder_rank: 2, but a SD3/SD3.5 model" in capsys.readouterr().err
    assert finetune(write_config(tmp_path, tiny_model("sdxl")), tmp_path / "run", "drop_t5=true") == 2
    assert "drop_t5: " in capsys.readouterr().err
    (tmp_path / "adapter").mkdir()  # rl kl-profile refuses the class before it loads, beside its other problems
    assert rl_main(["kl-profile", str(tmp_path / "adapter"), "--model", str(tiny_model("pixart"))]) == 2
    err = capsys.readouterr().err
    assert "is a PixArtSigmaPipeline, which rl finetune cannot train" in err and "Traceback" not in err, err
