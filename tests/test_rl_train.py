"""The RL trainer end to end on the miniature model, at toy size: LoRA moves, base weights do not,
a resumed run continues the uninterrupted one exactly, two processes stay in sync, bad configs fail."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from evalsuite.miniature import ASSETS
from rl.cli import main as rl_main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "rl" / "configs" / "miniature-mmd.yaml"  # the toys below were measured with the MMD reward
SHIPPED = ROOT / "rl" / "configs" / "miniature.yaml"
pytestmark = pytest.mark.skipif(not (ASSETS / "pipeline").is_dir(), reason="the shipped miniature world is missing")
TOY = ["sampling.steps=4", "sampling.prompts_per_epoch=2", "sampling.group_size=4", "sampling.batch_size=8",
       "training.batch_size=4", "training.gradient_accumulation_steps=1", "training.timestep_fraction=0.5",
       "training.learning_rate=1e-2", "checkpoint_every=1", "lora.rank=2", "lora.alpha=2",
       "rewards.2.weight=0.5"]  # the drift term is off in the shipped file; the toy runs exercise it


def finetune(out: Path, *extra: str) -> int:
    return rl_main(["-q", "finetune", "--config", str(CONFIG), "--no-eval", f"output_dir={out}", *TOY, *extra])


def log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_two_steps_move_every_lora_weight_and_no_base_weight(tmp_path: Path) -> None:
    from diffusers import UNet2DConditionModel

    assert finetune(tmp_path / "run", "training.epochs=2", "lora.text_encoder_rank=2") == 0
    rows = log(tmp_path / "run")
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    saved = load_file(str(tmp_path / "run" / "adapter" / "pytorch_lora_weights.safetensors"))
    assert saved and all(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k or "lora.up" in k)
    # LoRA A starts random and B at zero: after two Adam steps both differ from their start
    first = load_file(str(sorted((tmp_path / "run" / "checkpoints").iterdir())[0] / "lora.safetensors"))
    last = load_file(str(sorted((tmp_path / "run" / "checkpoints").iterdir())[-1] / "lora.safetensors"))
    assert all(not torch.equal(first[k], last[k]) for k in first)
    assert any("text_encoder" in k for k in saved) and any("text_encoder" in k for k in first)
    base = UNet2DConditionModel.from_pretrained(ASSETS / "pipeline" / "unet")
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(ASSETS / "pipeline", safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    pipe.load_lora_weights(str(tmp_path / "run" / "adapter"))
    plain_pipe = StableDiffusionPipeline.from_pretrained(ASSETS / "pipeline", safety_checker=None,
                                                         feature_extractor=None, requires_safety_checker=False)
    for tuned, plain_model in ((pipe.unet, base), (pipe.text_encoder, plain_pipe.text_encoder)):
        base_sd = plain_model.state_dict()
        lora_names = [name for name in tuned.state_dict() if "lora" in name]
        assert lora_names, type(tuned).__name__  # the adapter reached both models
        for name, tensor in tuned.state_dict().items():
            if "lora" not in name:
                assert torch.equal(tensor, base_sd[name.replace(".base_layer", "")]), name
    info = json.loads((tmp_path / "run" / "adapter" / "adapter_info.json").read_text())
    assert info["metadata"]["training_guidance_scales"] == [7.5] if "metadata" in info else True


def test_a_resumed_run_reproduces_the_next_losses_exactly(tmp_path: Path) -> None:
    # the default window, so a config saved without the key means the same; a text-encoder LoRA, whose
    # weights and optimizer state the checkpoint must restore too
    window = ("training.timestep_window=1.0", "lora.text_encoder_rank=2")
    assert finetune(tmp_path / "whole", "training.epochs=3", *window) == 0
    assert finetune(tmp_path / "cut", "training.epochs=2", *window) == 0
    shutil.rmtree(tmp_path / "cut" / "adapter")
    assert finetune(tmp_path / "cut", "training.epochs=3", *window, "training.learning_rate=0.5") == 2  # not the same
    saved = json.loads((tmp_path / "cut" / "config.json").read_text())
    del saved["training"]["timestep_window"]  # a checkpoint written before an optional key existed still resumes
    (tmp_path / "cut" / "config.json").write_text(json.dumps(saved))
    assert finetune(tmp_path / "cut", "training.epochs=3", *window) == 0  # resumes from the epoch-2 checkpoint
    whole, cut = log(tmp_path / "whole"), log(tmp_path / "cut")
    assert [r["epoch"] for r in cut] == [1, 2, 3]
    for key in ("loss", "approx_kl", "clipfrac", "reward_mean"):
        assert cut[2][key] == whole[2][key], key
    assert json.loads((tmp_path / "cut" / "process-0.json").read_text())["lora_sha256"] == \
        json.loads((tmp_path / "whole" / "process-0.json").read_text())["lora_sha256"]


def test_a_rerun_before_the_first_checkpoint_starts_an_empty_log(tmp_path: Path) -> None:
    # a run stopped before its first checkpoint leaves log.jsonl and config.json but no checkpoints/:
    # the rerun starts afresh, so its log holds each epoch once (it used to append to the stale rows)
    run = tmp_path / "run"
    assert finetune(run, "training.epochs=2") == 0
    first = log(run)
    shutil.rmtree(run / "checkpoints")
    shutil.rmtree(run / "adapter")
    assert finetune(run, "training.epochs=2") == 0
    again = log(run)
    assert [r["epoch"] for r in again] == [1, 2]
    assert [(r["loss"], r["reward_mean"]) for r in again] == [(r["loss"], r["reward_mean"]) for r in first]


def test_the_same_seed_on_the_same_machine_gives_the_same_adapter_bytes(tmp_path: Path) -> None:
    # what must be deterministic (docs/measured.md, "Reproducibility"): two fresh runs of one config and seed,
    # here the shipped one (the per-image quota reward, a KL on the untrained steps), write byte-identical
    # adapters; another seed does not
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        assert rl_main(["-q", "finetune", "--config", str(SHIPPED), "--no-eval", f"output_dir={tmp_path / name}",
                        f"seed={seed}", *TOY[:-1], "training.epochs=2"]) == 0
    adapter = [(tmp_path / name / "adapter" / "pytorch_lora_weights.safetensors").read_bytes() for name in "abc"]
    assert adapter[0] == adapter[1] and adapter[0] != adapter[2]
    assert [r["reward_mean"] for r in log(tmp_path / "a")] == [r["reward_mean"] for r in log(tmp_path / "b")]
    assert "quota_mean" in log(tmp_path / "a")[0]


def test_a_kl_penalty_keeps_the_policy_near_the_base_model(tmp_path: Path) -> None:
    # training.kl_coef (DPOK's per-step KL to the base model): the same toy run, penalised hard, stays nearer
    assert finetune(tmp_path / "weak", "training.epochs=3", "training.kl_coef=1e-6") == 0
    assert finetune(tmp_path / "strong", "training.epochs=3", "training.kl_coef=1000") == 0
    weak, strong = log(tmp_path / "weak"), log(tmp_path / "strong")
    # epoch 1 starts at the base model (LoRA B = 0): KL and its gradient are exactly 0 there, so the first
    # update, and the KL measured after it, do not depend on the coefficient
    assert weak[0]["kl_to_base"] == strong[0]["kl_to_base"] > 0
    assert all(math.isfinite(r["loss"]) for r in weak + strong)
    assert strong[-1]["kl_to_base"] < weak[-1]["kl_to_base"] / 2, (weak, strong)


def test_with_a_text_encoder_lora_the_ratio_starts_at_one(tmp_path: Path) -> None:
    # training re-encodes the prompts as sampling did (adapters on): with a learning rate that cannot move
    # the policy, every importance ratio is 1 (no clipped term) and the approximate KL is 0
    assert finetune(tmp_path / "run", "training.epochs=1", "lora.text_encoder_rank=2",
                    "training.learning_rate=1e-20", "training.kl_coef=0.1", "training.kl_steps=chain") == 0
    row = log(tmp_path / "run")[0]
    assert row["clipfrac"] == 0 and row["approx_kl"] < 1e-12, row


def _late_step_kl(run: Path) -> float:
    """Mean per-element KL to the base model of the adapter's steps outside the toy's window (steps 3 and 4
    of 4), along the adapter's own trajectories of two prompts at guidance 3 (`rl.profile.kl_profile`)."""
    from evalsuite.models import load_model
    from rl.families import policy_for
    from rl.profile import kl_profile

    policy = policy_for(load_model("miniature", lora=str(run / "adapter")).pipe, 4, 1.0)
    profile = kl_profile(policy, ["a photo of a doctor", "a photo of a nurse"], 3.0, images=4, seed=1)
    assert [p.index for p in profile] == [0, 1, 2, 3] and all(p.kl > 0 for p in profile)
    return (profile[2].kl + profile[3].kl) / 2


@pytest.mark.slow
def test_a_kl_penalty_outside_the_window_holds_the_untrained_steps_near_the_base(tmp_path: Path) -> None:
    # the toy trains 1 of the first 2 of 4 steps; chain and untrained add one KL-only step from the last 2.
    # Its three epochs draw from the 36 occupations that are not held out for validation (the battery's test
    # split put back into training, as when this was measured): a toy this small is one draw of prompts
    data = yaml.safe_load((ROOT / "prompts" / "occupations.yaml").read_text())
    del data["test"]
    (tmp_path / "battery.yaml").write_text(yaml.safe_dump(data))
    common = ("training.epochs=3", "training.kl_coef=1000", f"battery={tmp_path / 'battery.yaml'}")
    late = {}
    for where in ("trained", "chain", "untrained"):
        assert finetune(tmp_path / where, *common, f"training.kl_steps={where}") == 0
        late[where] = _late_step_kl(tmp_path / where)
    assert late["chain"] < 0.6 * late["trained"] and late["untrained"] < 0.6 * late["trained"], late
    assert rl_main(["kl-profile", str(tmp_path / "chain" / "adapter"), "--images", "2", "--steps", "4"]) == 0


def launch2(out: Path, *extra: str, evaluate: bool = False) -> subprocess.CompletedProcess[str]:
    """`rl finetune` in two processes through accelerate's launcher; without a GPU each runs on the CPU (gloo)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "rl.cli",
           "-q", "finetune", "--config", str(CONFIG), *([] if evaluate else ["--no-eval"]), f"output_dir={out}",
           *TOY, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_cpu_processes_keep_one_model(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    done = launch2(out, "training.epochs=2", "training.kl_coef=0.1", "training.kl_steps=chain",  # base and KL-only
                   "lora.text_encoder_rank=2")  # passes in DDP; the text encoder's gradients are averaged by hand
    assert done.returncode == 0, done.stderr[-3000:]
    assert "samples per epoch: 2 process(es)" in done.stdout
    digests = [json.loads((out / f"process-{r}.json").read_text()) for r in (0, 1)]
    assert digests[0]["world"] == 2 and digests[0]["lora_sha256"] == digests[1]["lora_sha256"]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_resume_their_own_trackers_and_share_the_evaluation(tmp_path: Path) -> None:
    # two training prompts at one scale: every epoch draws both on each process, so each process's
    # per-prompt tracker (min_count 1) normalises epoch 2 with the rewards it saw in epoch 1
    data = yaml.safe_load((ROOT / "prompts" / "occupations.yaml").read_text())
    data["slots"]["occupation"], data["heldout"]["occupation"] = ["doctor", "nurse", "teacher"], ["teacher"]
    del data["test"]
    (tmp_path / "battery.yaml").write_text(yaml.safe_dump(data))
    tracker = (f"battery={tmp_path / 'battery.yaml'}", "sampling.guidance_scales=[3]", "training.advantage=tracker",
               "training.tracker_min_count=1")
    evaluation = ("evaluation.every=1", "evaluation.images_per_prompt=2", "evaluation.guidance_scales=[3]",
                  "evaluation.steps=2")
    whole = launch2(tmp_path / "whole", "training.epochs=2", *tracker, *evaluation, evaluate=True)
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert launch2(tmp_path / "cut", "training.epochs=1", *tracker).returncode == 0
    ckpt = tmp_path / "cut" / "checkpoints" / "step-000001"
    saved = [torch.load(ckpt / f"process-{r}.pt", weights_only=True)["tracker"]["buffers"] for r in (0, 1)]
    assert saved[0].keys() == saved[1].keys() == {"a photo of a doctor|g=3", "a photo of a nurse|g=3"}
    assert saved[0] != saved[1]  # each process's own rewards
    resumed = launch2(tmp_path / "cut", "training.epochs=2", *tracker)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # the same weights as the uninterrupted run: rank 1 resumed its own tracker, not rank 0's
    whole_sha, cut_sha = (json.loads((tmp_path / run / "process-1.json").read_text())["lora_sha256"]
                          for run in ("whole", "cut"))
    assert whole_sha == cut_sha
    assert [r["epoch"] for r in log(tmp_path / "cut")] == [1, 2]
    # every process rendered its share of each evaluation: 3 prompts x 1 scale x 2 images
    for name in ("base", "epoch-0001", "epoch-0002", "final"):
        info = json.loads((tmp_path / "whole" / "eval" / name / "run.json").read_text())
        assert (info["status"], info["n_images"]) == ("complete", 6), name
    assert (tmp_path / "whole" / "eval" / "comparison.md").is_file()


@pytest.mark.parametrize("override, needle", [
    ("rewards.0.name=diversty", "did you mean 'diversity'"),
    ("sampling.group_size=1", "sampling.group_size"),
    ("training.batch_size=5", "training.batch_size"),
    ("model=./no/such/model", "./no/such/model"),
    ("lora.rank=0", "lora.rank"),
    ("evaluation.classifier=miniature", "refused unless explicitly allowed"),
])
def test_bad_configs_fail_before_any_model_loads(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 override: str, needle: str) -> None:
    assert finetune(tmp_path / "bad", override) == 2
    err = capsys.readouterr().err
    assert err.startswith("rl: error:") and needle in err and "Traceback" not in err
    assert not (tmp_path / "bad").exists()
