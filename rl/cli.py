"""The `rl` command line.

    rl finetune [--config rl/configs/miniature.yaml] [--reward diversity] [--no-eval] [key=value ...]

`key=value` overrides any config field by its dotted path (`training.learning_rate=1e-4`,
`sampling.guidance_scales=[3,7.5]`). A bad config is one message and exit status 2, before any model
loads. Run the same command again after an interruption: training resumes from the last checkpoint.
Several processes or GPUs: `accelerate launch -m rl.cli finetune ...`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from evalsuite.errors import SuiteError

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "miniature.yaml"


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="rl", description="RL fine-tuning of text-to-image models toward diversity")
    ap.add_argument("-q", "--quiet", action="store_true")
    sub = ap.add_subparsers(dest="command", required=True)
    ft = sub.add_parser("finetune", help="train a LoRA adapter with DDPO and set-level rewards")
    ft.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help=f"YAML config (default {DEFAULT_CONFIG.name})")
    ft.add_argument("--reward", default=None,
                    help="the primary reward (diversity, balance, alignment, drift, confidence)")
    ft.add_argument("--no-eval", action="store_true", help="skip the before/after battery evaluation")
    ft.add_argument("overrides", nargs="*", metavar="key=value")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    from evalsuite.cli import configure_logging

    args = _parser().parse_args(argv)
    configure_logging(args.quiet)
    try:
        from .config import load_config, with_primary_reward

        cfg = load_config(args.config, args.overrides)
        if args.reward:
            cfg = with_primary_reward(cfg, args.reward)
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
