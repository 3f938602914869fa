"""The `rl` command line.

    rl finetune [--config rl/configs/miniature.yaml] [--reward diversity] [--no-eval] [key=value ...]
    rl compare BASE_RUN TUNED_RUN [--classifier oracle] [--attribute skin_tone] [--reward-classifier miniature]
               [--reference EXPLICIT_RUN [--class-slot tone]] [--overlap]
    rl kl-profile ADAPTER [--model miniature] [--prompt TEXT ...] [--guidance 7.5] [--images 16] [--steps 20]

`--reward NAME` trains with the reward NAME: a reward the config lists keeps its weight and options (switched
on at weight 1 if the config gives it 0); a reward it does not list replaces the config's rewards, alone at
weight 1. `key=value` overrides any config field by its dotted path (`training.learning_rate=1e-4`,
`sampling.guidance_scales=[3,7.5]`). A bad config is one message and exit status 2, before any model
loads. Run the same command again after an interruption: training resumes from the last checkpoint.
Several processes or GPUs: `accelerate launch -m rl.cli finetune ...`.

`rl compare` prints the before/after tables of `eval/comparison.md` for any two results folders of the
same battery, e.g. a base run and an `evalsuite run ... --lora ADAPTER` run; runs of different batteries,
prompts, steps, images per prompt, guidance scales, sampler or eta are refused (one message listing each
difference) unless `--overlap` asks to compare the images they share, which the output then says. `rl kl-profile` prints
where in the denoising chain an adapter departs from its base model (`rl.profile`).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from evalsuite.errors import SuiteError
from evalsuite.models import adapter_weight_problems

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "miniature.yaml"


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="rl", description="RL fine-tuning of text-to-image models toward diversity")
    ap.add_argument("-q", "--quiet", action="store_true")
    sub = ap.add_subparsers(dest="command", required=True)
    ft = sub.add_parser("finetune", help="train a LoRA adapter with DDPO and distribution rewards")
    ft.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help=f"YAML config (default {DEFAULT_CONFIG.name})")
    ft.add_argument("--reward", default=None,
                    help="train with this reward (a name registered in rl/rewards.py, e.g. diversity): one the "
                         "config lists keeps its weight and options (weight 0 becomes 1); any other replaces "
                         "the config's rewards, alone at weight 1")
    ft.add_argument("--no-eval", action="store_true", help="skip the before/after battery evaluation")
    ft.add_argument("--allow-plugins", action="store_true",
                    help="let the config name code plug-ins ('module:factory', 'file.py:factory') as its "
                         "reward_classifier, evaluation.classifier or embedder (sets EVALSUITE_ALLOW_PLUGINS=1)")
    ft.add_argument("overrides", nargs="*", metavar="key=value")
    cmp = sub.add_parser("compare", help="base -> tuned tables of two results folders")
    cmp.add_argument("base", type=Path, help="results folder of the base model")
    cmp.add_argument("tuned", type=Path, help="results folder of the tuned model (same battery)")
    cmp.add_argument("--classifier", default="oracle", help="evaluation classifier (default oracle)")
    cmp.add_argument("--attribute", default="skin_tone", help="the attribute trained (default skin_tone)")
    cmp.add_argument("--reward-classifier", default="miniature",
                     help="classifier whose low-confidence rate measures validity (default miniature)")
    cmp.add_argument("--reference", type=Path, default=None,
                     help="a base-model run of a battery that asks for each class (e.g. prompts/"
                          "occupations-explicit-tone.yaml): adds each run's low confidence against the rate "
                          "the base model has drawing the same classes when asked for them")
    cmp.add_argument("--class-slot", default=None,
                     help="the reference battery's slot that names the class (default tone)")
    cmp.add_argument("--overlap", action="store_true",
                     help="compare runs that differ (battery, prompts, steps, images per prompt, guidance scales, "
                          "sampler, eta) on the images they share: the same prompt, scale and image index")
    kp = sub.add_parser("kl-profile", help="per-step KL of an adapter to its base model")
    kp.add_argument("adapter", type=Path, help="adapter folder (as rl finetune saves it)")
    kp.add_argument("--model", default="miniature", help="base model: miniature, a local folder or a hub id")
    kp.add_argument("--prompt", action="append", default=None,
                    help="a prompt (repeatable; default: a photo of a doctor, nurse, engineer, teacher)")
    kp.add_argument("--guidance", type=float, default=7.5, help="guidance scale (>= 1, default 7.5)")
    kp.add_argument("--images", type=int, default=16, help="chains per prompt (>= 1, default 16)")
    kp.add_argument("--steps", type=int, default=20, help="sampler steps (>= 1, default 20)")
    kp.add_argument("--eta", type=float, default=1.0,
                    help="the sampler's noise, as the RL config's sampling.eta: DDIM eta for UNet models, the flow "
                         "SDE's noise level for SD3 and Flux (in (0, 1], default 1)")
    kp.add_argument("--seed", type=int, default=0, help="seed of the initial and step noise (>= 0)")
    return ap


def _kl_profile(args: argparse.Namespace) -> None:
    problems = [f"--{name} {value}: {rule}" for name, value, ok, rule in (
        ("guidance", args.guidance, args.guidance >= 1, "must be >= 1"),
        ("images", args.images, args.images >= 1, "must be >= 1"),
        ("steps", args.steps, args.steps >= 1, "must be >= 1"),
        ("eta", args.eta, 0 < args.eta <= 1, "must be in (0, 1] (eta = 0 has no step density, eta > 1 no step)"),
        ("seed", args.seed, args.seed >= 0, "must be >= 0")) if not ok]
    if not args.adapter.is_dir():
        problems.append(f"adapter '{args.adapter}': no such folder")
    else:  # safetensors only, refused before the model loads
        problems += [p.removeprefix("--lora: ") for p in adapter_weight_problems(str(args.adapter))]
    from .families import policy_for, trainable_problems

    problems += [f"--model {args.model}: {message}" for _, message in trainable_problems(args.model)]
    if problems:
        raise SuiteError("; ".join(problems))
    from evalsuite.models import load_model

    from .profile import kl_profile, profile_table

    pipe = load_model(args.model, lora=str(args.adapter)).pipe
    policy = policy_for(pipe, args.steps, args.eta, args.model)
    prompts = args.prompt or [f"a photo of a {o}" for o in ("doctor", "nurse", "engineer", "teacher")]
    print(profile_table(kl_profile(policy, prompts, args.guidance, args.images, args.seed)))


def _compare(args: argparse.Namespace) -> None:
    """`rl compare`: the before/after tables of two comparable runs (or of their overlap, `--overlap`)."""
    from .compare import comparison_markdown

    if args.class_slot is not None and args.reference is None:
        raise SuiteError("--class-slot: given without --reference (it names the reference battery's slot)")
    print(comparison_markdown(args.base, args.tuned, args.classifier, args.attribute, args.reward_classifier,
                              args.reference, args.class_slot or "tone", args.overlap))


def main(argv: Sequence[str] | None = None) -> int:
    from evalsuite.cli import configure_logging

    args = _parser().parse_args(argv)
    configure_logging(args.quiet)
    try:
        if args.command == "compare":
            _compare(args)
            return 0
        if args.command == "kl-profile":
            _kl_profile(args)
            return 0
        from .config import load_config, with_reward

        if args.allow_plugins:
            from evalsuite.classifiers import PLUGINS_ENV

            os.environ[PLUGINS_ENV] = "1"
        cfg = load_config(args.config, args.overrides)
        if args.reward:
            cfg = with_reward(cfg, args.reward)
        from .train import train

        out = train(cfg, evaluate=not args.no_eval)
        if (out / "eval" / "comparison.md").exists():
            print((out / "eval" / "comparison.md").read_text())
        print(f"adapter and logs: {out}")
    except SuiteError as exc:
        print(f"rl: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rl: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
