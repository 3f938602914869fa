"""The `evalsuite` command line: run, validate, dashboard, publish, classifiers, miniature.

Every user error ends in one message on stderr and exit status 2, with no traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import SuiteError

if TYPE_CHECKING:
    from .sources import HostedOptions

log = logging.getLogger("evalsuite")


def _scales(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 1,3,7.5, got '{text}'") from None


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="evalsuite", description=__doc__.splitlines()[0])
    ap.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = ap.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="generate a battery across guidance scales, classify, measure")
    run.add_argument("battery", type=Path)
    run.add_argument("--model", default=None,
                     help="'miniature' (default), a local pipeline folder, a hub id, or openai:NAME, a hosted model of "
                          "an OpenAI-compatible images API (the --api-* options; docs/sources.md)")
    run.add_argument("--images", default=None, metavar="PATH",
                     help="audit images made elsewhere instead of a model: a folder (a subfolder per prompt, or a "
                          "manifest.csv/.jsonl) or a manifest of prompt, path, seed*, guidance_scale* "
                          "(docs/sources.md)")
    run.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    run.add_argument("--lora", default=None, help="a LoRA adapter folder or file to load into the pipeline")
    run.add_argument("--lora-scale", type=float, default=1.0,
                     help="strength of the --lora adapter: 0 = base model, 1 = as trained (default)")
    run.add_argument("--lora-window", type=float, default=1.0,
                     help="share of the denoising steps, from the first (noisiest), that the --lora adapter's "
                          "denoiser layers act on; the base denoiser runs the rest, a text-encoder part of the "
                          "adapter acts throughout (default 1 = every step)")
    run.add_argument("--dtype", default="float32", help="float32 (default), float16 or bfloat16")
    run.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    run.add_argument("--batch-size", type=int, default=64)
    run.add_argument("--classifier", action="append", default=None, dest="classifiers",
                     help="attribute classifier (repeatable; the first is primary); default: the battery's")
    run.add_argument("--embedder", default="clip", help="image embedder for diversity and alignment")
    run.add_argument("--results", type=Path, default=Path("results"), help="results root (default results/)")
    run.add_argument("--name", default=None, help="run folder name (default: battery__model)")
    run.add_argument("--overwrite", action="store_true", help="start afresh instead of resuming")
    run.add_argument("--compile", action="store_true",
                     help="torch.compile the denoiser (UNet or transformer; for SD 1.x/2.x also the VAE decoder): "
                          "pays on GPUs for long runs; on a CPU it needs a C++ compiler")
    run.add_argument("--allow-plugins", action="store_true",
                     help="let the battery name code plug-ins ('module:factory', 'file.py:factory') and import "
                          "them (sets EVALSUITE_ALLOW_PLUGINS=1); plug-ins given on the command line need no flag")
    run.add_argument("--no-t5", action="store_true", dest="drop_t5",
                     help="load an SD3 model without its T5 text encoder (its T5 context is then zeros): less "
                          "memory, weaker prompt following; refused for other models")
    _hosted_arguments(run.add_argument_group("a hosted model (--model openai:NAME)"))
    small = run.add_argument_group("a smaller run")
    small.add_argument("--limit-prompts", type=int, default=None)
    small.add_argument("--images-per-prompt", type=int, default=None)
    small.add_argument("--scales", type=_scales, default=None, help="guidance scales, e.g. 1,7.5")
    small.add_argument("--steps", type=int, default=None, help="sampler steps")
    small.add_argument("--eta", type=float, default=None,
                       help="DDIM eta in [0, 1] (default: the battery's, else 0 = deterministic)")
    small.add_argument("--seed", type=int, default=None)

    val = sub.add_parser("validate", help="check battery files; exit 2 on any problem")
    val.add_argument("batteries", type=Path, nargs="+")

    dash = sub.add_parser("dashboard", help="build a static dashboard site from one or two runs")
    dash.add_argument("runs", type=Path, nargs="+")
    dash.add_argument("--out", type=Path, required=True)
    dash.add_argument("--max-images-per-cell", type=int, default=8,
                      help="images shown per prompt and guidance scale on the images page (default 8)")

    pub = sub.add_parser("publish", help="write a run as a Hugging Face datasets dataset")
    pub.add_argument("run", type=Path)
    pub.add_argument("--out", type=Path, required=True)
    pub.add_argument("--push-to-hub", default=None, metavar="REPO_ID")

    sub.add_parser("classifiers", help="list the registered classifiers, face detectors and embedders, and the "
                                       "image domains each reads")

    mini = sub.add_parser("miniature", help="the built-in miniature world")
    msub = mini.add_subparsers(dest="action", required=True)
    build = msub.add_parser("build", help="rebuild the miniature world from a seed")
    build.add_argument("--out", type=Path, default=None, help="default: the shipped assets folder")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--quick", action="store_true", help="a few steps per stage (for tests)")
    build.add_argument("--threads", type=int, default=None)
    msub.add_parser("describe", help="print every occupation's training distribution")
    rep = msub.add_parser("report", help="measure the shipped world against its truth")
    rep.add_argument("--images", type=int, default=200, help="images per occupation and guidance scale")
    rep.add_argument("--out", type=Path, default=None, help="also write the report (Markdown) here")
    return ap


def _hosted_arguments(group: argparse._ArgumentGroup) -> None:
    """The options `--api-<field>` of `evalsuite.sources.HostedOptions`, declared there once."""
    from dataclasses import MISSING, fields

    from .sources import HostedOptions, flag

    for f in fields(HostedOptions):
        default = None if f.default is MISSING else f.default
        group.add_argument(flag(f.name), dest=f"api_{f.name}", type=f.metadata["type"], default=default,
                           metavar=f.metadata["metavar"], help=f.metadata["help"])


def _hosted_options(args: argparse.Namespace) -> HostedOptions:
    from dataclasses import fields

    from .sources import HostedOptions

    return HostedOptions(**{f.name: getattr(args, f"api_{f.name}") for f in fields(HostedOptions)})


def _cmd_run(args: argparse.Namespace) -> None:
    if args.allow_plugins:
        from .classifiers import PLUGINS_ENV

        os.environ[PLUGINS_ENV] = "1"
    from .battery import load_battery
    from .runner import RunOptions, run_battery

    battery = load_battery(args.battery).with_overrides(
        limit_prompts=args.limit_prompts, images_per_prompt=args.images_per_prompt,
        guidance_scales=args.scales, steps=args.steps, seed=args.seed, eta=args.eta)
    options = RunOptions(results_dir=args.results, name=args.name, model=args.model, revision=args.revision,
                         lora=args.lora, lora_scale=args.lora_scale, lora_window=args.lora_window,
                         dtype=args.dtype, device=args.device,
                         batch_size=args.batch_size,
                         classifiers=tuple(args.classifiers or ()), embedder=args.embedder,
                         overwrite=args.overwrite, compile=args.compile, drop_t5=args.drop_t5, images=args.images,
                         hosted=_hosted_options(args))
    run_dir = run_battery(battery, options)
    from accelerate import PartialState

    state = PartialState()
    if state.is_main_process:  # the other processes return before the summary is written
        print((run_dir / "summary.txt").read_text(), end="")
    # under `accelerate launch` every process leaves the process group together, once the main one is done:
    # a process that exited while the others still held the group could abort at exit (gloo's threads)
    state.wait_for_everyone()
    state.destroy_process_group()


def _cmd_validate(args: argparse.Namespace) -> None:
    from .battery import battery_plugins, load_battery
    from .classifiers import PLUGINS_ENV, check_classifier_spec, check_detector_spec

    failed = []
    for path in args.batteries:
        try:
            b = load_battery(path)
            checks = [("classifier", b.classifier, check_classifier_spec)]
            for domain, setup in b.domains:
                checks.append((f"domains.{domain}.classifier", setup.classifier, check_classifier_spec))
                if setup.detector:
                    checks.append((f"domains.{domain}.detector", setup.detector, check_detector_spec))
            if problems := [f"{path}: {key}: {p}" for key, spec, check in checks for p in check(spec)]:
                raise SuiteError("\n".join(problems))
            print(f"{path}: ok ({len(b.prompts())} prompts x {len(b.guidance_scales)} scales x "
                  f"{b.images_per_prompt} images)")
            for key, spec in battery_plugins(b):
                print(f"{path}: {key}: '{spec}' is a code plug-in: `evalsuite run` imports it only with "
                      f"--allow-plugins or {PLUGINS_ENV}=1")
        except SuiteError as exc:
            failed.append(str(exc))
    if failed:
        raise SuiteError("\n".join(failed))


def _cmd_miniature(args: argparse.Namespace) -> None:
    from .miniature import ASSETS, describe_world

    if args.action == "describe":
        print(describe_world())
        return
    if args.action == "report":
        import json

        from .miniature.report import measure_world, to_markdown

        if args.out and not args.out.parent.is_dir():  # before the measurement, not after it
            raise SuiteError(f"--out: folder '{args.out.parent}' does not exist")
        measured = measure_world(ASSETS, n=args.images)
        text = to_markdown(measured)
        print(text)
        if args.out:
            args.out.write_text(text)
            args.out.with_suffix(".json").write_text(json.dumps(measured, indent=1))
        return
    from .miniature.build import BuildConfig, build_world

    config = BuildConfig.quick(args.seed) if args.quick else BuildConfig(seed=args.seed)
    t0 = time.perf_counter()
    info = build_world(args.out or ASSETS, config, threads=args.threads)
    print(f"built the miniature world in {time.perf_counter() - t0:.0f} s "
          f"(peak memory {info['peak_rss_mb']:.0f} MB) -> {args.out or ASSETS}")


def _cmd_dashboard(args: argparse.Namespace) -> None:
    from .dashboard import build_dashboard

    index = build_dashboard(args.runs, args.out, max_images_per_cell=args.max_images_per_cell)
    print(f"dashboard: {index}")


def _cmd_publish(args: argparse.Namespace) -> None:
    from .publish import publish_run

    out = publish_run(args.run, args.out, push_to_hub=args.push_to_hub, token=os.environ.get("HF_TOKEN"))
    print(f"dataset: {out}")


def _cmd_classifiers(args: argparse.Namespace) -> None:
    from .classifiers import registered

    for kind in ("classifier", "detector", "embedder"):
        print(f"{kind}s (name: the image domains it reads):")
        for name, domains in registered(kind).items():
            print(f"  {name:<12} {', '.join(domains) if domains else 'any'}")


COMMANDS = {"run": _cmd_run, "validate": _cmd_validate, "miniature": _cmd_miniature,
            "dashboard": _cmd_dashboard, "publish": _cmd_publish, "classifiers": _cmd_classifiers}


def configure_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="[%(name)s] %(message)s")
    for noisy in ("diffusers", "transformers", "accelerate", "httpx", "urllib3", "datasets"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
        from diffusers.utils import logging as dlog

        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
    except ImportError:
        pass


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging(args.quiet)
    try:
        COMMANDS[args.command](args)
    except SuiteError as exc:
        print(f"evalsuite: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("evalsuite: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
