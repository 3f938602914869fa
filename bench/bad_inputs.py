"""Replay the bad-input record: every input here must end in one message and exit 2, with nothing written.

Each case builds what it needs in a fresh temporary folder, runs one `evalsuite` or `rl` command in a
child process (as a user would, with the hubs offline), and checks: exit status 2, no traceback, one
message on stderr, and no new file under the case's output folder. The table it prints (input → the
message a user sees) is docs/reliability.md's; regenerate that file with

    python bench/bad_inputs.py --write docs/reliability.md

and a case that fails its checks is marked FAIL there and makes the script exit 1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BATTERY = ROOT / "prompts" / "occupations.yaml"
MINI = ROOT / "evalsuite" / "miniature" / "assets"
SMALL = ["--limit-prompts", "1", "--images-per-prompt", "1", "--scales", "1", "--steps", "2"]


@dataclass(frozen=True)
class Case:
    what: str  # the bad input, in words
    command: Callable[[Path], list[str]]  # tmp folder -> argv (program first)
    watched: str = "out"  # the folder (under tmp) that must stay empty or absent


def battery(tmp: Path, **changes: object) -> str:
    data = yaml.safe_load(BATTERY.read_text())
    data.update(changes)
    path = tmp / "battery.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def write(tmp: Path, name: str, text: str) -> str:
    path = tmp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def pickled_adapter(tmp: Path) -> str:
    import torch

    folder = tmp / "adapter"
    folder.mkdir()
    torch.save({"unet.down_blocks.0.lora_A.weight": torch.zeros(2, 2)}, folder / "pytorch_lora_weights.bin")
    return str(folder)


def foreign_pipeline(tmp: Path) -> str:
    folder = tmp / "img2img"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionImg2ImgPipeline"}))
    return str(folder)


def locked_run(tmp: Path) -> list[str]:
    """A results folder whose lock a live process (this script) holds."""
    import socket
    import time

    folder = tmp / "results" / "busy"
    folder.mkdir(parents=True)
    (folder / ".lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}))
    return run(str(BATTERY), *SMALL, "--results", str(tmp / "results"), "--name", "busy")


def corrupt_run(tmp: Path) -> str:
    """A finished tiny run whose first image is then overwritten with junk."""
    subprocess.run([shutil.which("evalsuite") or "evalsuite", "-q", "run", str(BATTERY), *SMALL, "--results",
                    str(tmp / "results"), "--name", "r", "--device", "cpu"], check=True, capture_output=True)
    image = next((tmp / "results" / "r" / "images").rglob("*.png"))
    image.write_bytes(b"not a png")
    return str(tmp / "results" / "r")


def bad_manifest(tmp: Path) -> str:
    """A manifest of exported images: one row with a prompt the battery lacks, one with an unreadable image."""
    from evalsuite.battery import load_battery

    first = load_battery(BATTERY).prompts()[0].text
    (tmp / "broken.png").write_bytes(b"not a png")
    return write(tmp, "manifest.csv", f"prompt,path\n{first},broken.png\na photo of a nurze,broken.png\n")


def run(*args: str) -> list[str]:
    return ["evalsuite", "-q", "run", *args]


CASES = [
    Case("a battery file that does not exist", lambda t: run(str(t / "nope.yaml"), "--results", str(t / "out"))),
    Case("a battery that is not valid YAML", lambda t: run(write(t, "b.yaml", "name: [unclosed\n"),
                                                            "--results", str(t / "out"))),
    Case("a battery with an unknown key and a bad value", lambda t: run(
        battery(t, clasifier="miniature", steps=0), "--results", str(t / "out"))),
    Case("images_per_prompt: 10^12", lambda t: run(battery(t, images_per_prompt=10**12), "--results", str(t / "out"))),
    Case("a battery naming a code plug-in (file.py:factory)", lambda t: run(
        battery(t, classifier=write(t, "evil.py", "raise SystemExit('ran')\n") + ":make"), "--results",
        str(t / "out"))),
    Case("--model: a path that does not exist", lambda t: run(str(BATTERY), "--model", str(t / "nomodel"),
                                                               "--results", str(t / "out"))),
    Case("--model: a pipeline class the runner cannot drive (img2img)", lambda t: run(
        str(BATTERY), "--model", foreign_pipeline(t), "--results", str(t / "out"))),
    Case("--classifier miniature on a photo model (a diffusers folder)", lambda t: run(
        str(BATTERY), "--model", str(MINI / "pipeline"), "--classifier", "miniature", "--results", str(t / "out"))),
    Case("--classifier photo on the built-in miniature model", lambda t: run(
        str(BATTERY), "--classifier", "photo", "--results", str(t / "out"))),
    Case("--lora: a pickled adapter (pytorch_lora_weights.bin)", lambda t: run(
        str(BATTERY), *SMALL, "--lora", pickled_adapter(t), "--results", str(t / "out"))),
    Case("--no-t5 on a model without a T5", lambda t: run(str(BATTERY), "--no-t5", "--results", str(t / "out"))),
    Case("--batch-size 0 and --name with a slash", lambda t: run(str(BATTERY), "--batch-size", "0", "--name", "a/b",
                                                                  "--results", str(t / "out"))),
    Case("--device cuda on a machine without one", lambda t: run(str(BATTERY), "--device", "cuda",
                                                                  "--results", str(t / "out"))),
    Case("--eta 2", lambda t: run(str(BATTERY), "--eta", "2", "--results", str(t / "out"))),
    Case("--model openai:NAME with no API key in the environment and a battery that sweeps guidance", lambda t: run(
        str(BATTERY), "--model", "openai:gpt-image-1", "--api-key-env", "EVALSUITE_BENCH_NO_KEY",
        "--results", str(t / "out"))),
    Case("--api-size without a hosted model", lambda t: run(str(BATTERY), "--api-size", "1024x1024",
                                                            "--results", str(t / "out"))),
    Case("--images: a folder that does not exist", lambda t: run(str(BATTERY), *SMALL, "--images", str(t / "nowhere"),
                                                                 "--results", str(t / "out"))),
    Case("--images: a manifest with an unknown prompt and an unreadable image", lambda t: run(
        str(BATTERY), *SMALL, "--images", bad_manifest(t), "--results", str(t / "out"))),
    Case("a second run on a results folder another live process is writing", locked_run, watched="none"),
    Case("dashboard of a run with a corrupt image", lambda t: [
        "evalsuite", "dashboard", corrupt_run(t), "--out", str(t / "out")]),
    Case("dashboard of a folder that is not a run", lambda t: [
        "evalsuite", "dashboard", str(t / "empty"), "--out", str(t / "out")]),
    Case("publish of a folder that is not a run", lambda t: [
        "evalsuite", "publish", str(t / "empty"), "--out", str(t / "out")]),
    Case("rl finetune: a config that does not exist", lambda t: [
        "rl", "finetune", "--config", str(t / "nope.yaml"), f"output_dir={t / 'out'}"]),
    Case("rl finetune: a misspelt override and a bad value", lambda t: [
        "rl", "finetune", "training.lerning_rate=1e-4", "sampling.steps=0", f"output_dir={t / 'out'}"]),
    Case("rl finetune: a reward classifier of another domain", lambda t: [
        "rl", "finetune", "reward_classifier=photo", f"output_dir={t / 'out'}"]),
    Case("rl finetune: a reward classifier that is a code plug-in", lambda t: [
        "rl", "finetune", f"reward_classifier={write(t, 'evil.py', 'raise SystemExit(1)')}:make",
        f"output_dir={t / 'out'}"]),
    Case("rl finetune: output_dir is an existing file", lambda t: [
        "rl", "finetune", f"output_dir={write(t, 'out', 'a file')}"], watched="none"),
    Case("rl kl-profile of a pickled adapter", lambda t: ["rl", "kl-profile", pickled_adapter(t)], watched="none"),
    Case("rl compare of folders that are not runs", lambda t: ["rl", "compare", str(t / "empty"), str(t / "empty")]),
]


def replay(case: Case) -> tuple[int, str, bool, bool]:
    """(exit status, the message, no traceback, nothing written) of one case in a fresh folder."""
    tmp = Path(tempfile.mkdtemp(prefix="bad-input-"))
    try:
        (tmp / "empty").mkdir()
        argv = case.command(tmp)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "EVALSUITE_ALLOW_PLUGINS": ""}
        exe = shutil.which(argv[0]) or argv[0]
        proc = subprocess.run([exe, *argv[1:]], capture_output=True, text=True, cwd=tmp, env=env, timeout=600)
        err = proc.stderr.strip().replace(str(tmp), "$CASE")
        watched = tmp / case.watched
        clean = case.watched == "none" or not watched.exists() or not any(watched.rglob("*"))
        return proc.returncode, err, "Traceback" not in err, clean
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", type=Path, default=None, help="write the table as a markdown file")
    args = ap.parse_args()
    rows, failed = [], 0
    for case in CASES:
        code, err, no_trace, clean = replay(case)
        ok = code == 2 and no_trace and clean and bool(err)
        failed += not ok
        message = " ".join(line.strip() for line in err.splitlines() if line.strip())
        message = message.replace("|", "\\|")
        rows.append(f"| {case.what} | {code} | {'yes' if clean else 'NO'} | {'ok' if ok else 'FAIL'} | {message} |")
        print(rows[-1], flush=True)
    if args.write:
        head = ("# Reliability record: bad inputs\n\n"
                "Every input below must end in one message and exit status 2, with no traceback and nothing "
                "written. Replay with `python bench/bad_inputs.py` (a child process per case, hubs offline); "
                "regenerate this file with `python bench/bad_inputs.py --write docs/reliability.md`. Each case "
                "runs in its own temporary folder, written `$CASE`; the lock message names a process id and a "
                "time, which vary from run to run.\n\n"
                "| input | exit | nothing written | check | message |\n|---|---|---|---|---|\n")
        args.write.write_text(head + "\n".join(rows) + "\n")
    print(f"{len(CASES) - failed} of {len(CASES)} cases end in one message, exit 2 and nothing written")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
