"""Issue 22, other image sources: a hosted model behind an OpenAI-compatible images API (`--model openai:NAME`)
and a folder of images made elsewhere (`--images PATH`), each through the real CLI into a real results folder.

The hosted service is a real HTTP server on the loopback address, started here, that speaks the images API
and answers with a photograph (scikit-image's astronaut, in which the face detector finds a face); no test
reaches any other address. The photographs are scored with `skin-tone` after the `opencv-haar` detector
(the battery's natural set, offline) and embedded with the miniature world's CLIP.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from cli_errors import expect_error
from PIL import Image

from evalsuite.cli import main
from evalsuite.miniature import ASSETS
from evalsuite.sources import RECEIVED

ROOT = Path(__file__).resolve().parents[1]
CLIP = ASSETS / "clip"
KEY = "sk-test-0123456789abcdef"  # the API key; it must appear in no file of a results folder
KEY_ENV = "EVALSUITE_TEST_IMAGES_KEY"
pytestmark = pytest.mark.skipif(not (CLIP / "config.json").is_file(), reason="the shipped miniature world is missing")
PROMPTS = ["a photo of a doctor", "a photo of a nurse"]


def photo(flip: bool = False) -> np.ndarray:
    """A 128-pixel photograph with one face (scikit-image's astronaut), mirrored with `flip`."""
    from skimage.data import astronaut

    image = np.asarray(Image.fromarray(astronaut()).resize((128, 128)))
    return image[:, ::-1].copy() if flip else image


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


class Service:
    """What the loopback images service does and saw.

    `faults` are answered, one each, to the next requests in order ("429": Too Many Requests with
    Retry-After 1; "500"; "slow": the answer comes after 2 s; "malformed": 200 with no data[0]); `refuse`:
    prompts its safety filter refuses (HTTP 400, content_policy_violation); after `fail_after` images it
    answers every request with 500, and after `hang_after` images it holds every request until `release` is
    set. `seen` holds each request: (time, method, path, headers, JSON body)."""

    def __init__(self) -> None:
        self.faults: list[str] = []
        self.refuse: set[str] = set()
        self.fail_after: int | None = None
        self.hang_after: int | None = None
        self.release = threading.Event()
        self.served = 0
        self.seen: list[tuple[float, str, str, dict[str, str], dict[str, Any]]] = []
        self.lock = threading.Lock()
        self.url = ""

    def posts(self) -> list[dict[str, Any]]:
        return [body for _, method, _, _, body in self.seen if method == "POST"]

    def answer(self, method: str, path: str, headers: dict[str, str], body: dict[str, Any]) -> tuple[int, dict, bytes]:
        with self.lock:
            self.seen.append((time.monotonic(), method, path, headers, body))
            fault = self.faults.pop(0) if self.faults and method == "POST" else None
            if self.fail_after is not None and self.served >= self.fail_after:
                fault = "500"
            hang = self.hang_after is not None and self.served >= self.hang_after and method == "POST"
        if hang:
            self.release.wait(30)
        if method == "GET":  # a URL answer's image
            return 200, {"Content-Type": "image/png"}, png(photo(flip=path.endswith("nurse.png")))
        if fault == "429":
            return 429, {"Retry-After": "1"}, json.dumps({"error": {"message": "slow down"}}).encode()
        if fault == "500":
            return 500, {}, json.dumps({"error": {"message": "the server broke"}}).encode()
        if fault == "slow":
            time.sleep(2)
        if fault == "malformed":
            return 200, {}, json.dumps({"data": []}).encode()
        if headers.get("Authorization") != f"Bearer {KEY}":
            return 401, {}, json.dumps({"error": {"message": f"Incorrect API key provided: "
                                                             f"{headers.get('Authorization')}"}}).encode()
        if body["prompt"] in self.refuse:
            error = {"code": "content_policy_violation", "type": "invalid_request_error",
                     "message": "Your request was rejected by the safety system."}
            return 400, {}, json.dumps({"error": error}).encode()
        with self.lock:
            self.served += 1
        flip = "nurse" in body["prompt"]
        if body.get("response_format") == "url":
            item = {"url": f"{self.url}/files/{'nurse' if flip else 'doctor'}.png"}
        else:
            item = {"b64_json": base64.b64encode(png(photo(flip))).decode()}
        return 200, {"Content-Type": "application/json"}, json.dumps({"created": 0, "data": [item]}).encode()


@pytest.fixture
def service(monkeypatch: pytest.MonkeyPatch) -> Iterator[Service]:
    """A fresh images service on 127.0.0.1 (a free port), and the key in the environment."""
    state = Service()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _reply(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else {}
            code, headers, data = state.answer(method, self.path, dict(self.headers), body)
            try:
                self.send_response(code)
                for name, value in {**headers, "Content-Length": str(len(data))}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)
            except OSError:  # the client gave up waiting (a time-out test)
                pass

        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            self._reply("POST")

        def do_GET(self) -> None:  # noqa: N802
            self._reply("GET")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(KEY_ENV, KEY)
    yield state
    state.release.set()
    server.shutdown()
    server.server_close()


def battery(tmp_path: Path, **changes: Any) -> Path:
    """The shipped battery cut to a doctor and a nurse, 3 images each at one scale."""
    data = yaml.safe_load((ROOT / "prompts" / "occupations.yaml").read_text())
    data.update(slots={"occupation": ["doctor", "nurse"]}, heldout={}, test={}, guidance_scales=[1.0],
                images_per_prompt=3, intersections=[], **changes)
    path = tmp_path / "battery.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run(tmp_path: Path, name: str, *args: str, results: Path | None = None) -> int:
    return main(["-q", "run", str(battery(tmp_path)), "--classifier", "skin-tone", "--embedder", f"clip:{CLIP}",
                 "--device", "cpu", "--results", str(results or tmp_path / "results"), "--name", name, *args])


def hosted(service: Service, *extra: str) -> list[str]:
    return ["--model", "openai:test-image-1", "--api-base", service.url + "/v1", "--api-key-env", KEY_ENV, *extra]


def records(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / "records.jsonl").read_text().splitlines()]



def no_key_in(folder: Path) -> None:
    for file in folder.rglob("*"):
        if file.is_file():
            assert KEY.encode() not in file.read_bytes(), file


# ---------------------------------------------------------------- the hosted source


def test_a_hosted_model_is_audited_like_a_rendered_one(service: Service, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """6 requests for 2 prompts x 3 images, each with the model, n=1, size and the key; faces found and skin
    tone measured; run.json says what the service exposes (nothing) and never holds the key; the dashboard
    shows it; a second command on the finished run requests nothing."""
    args = hosted(service, "--api-size", "128x128", "--api-quality", "low")
    assert run(tmp_path, "h", *args) == 0
    posts = service.posts()
    assert len(posts) == 6 and sorted(p["prompt"] for p in posts) == sorted(PROMPTS * 3)
    assert {(p["model"], p["n"], p["size"], p["quality"]) for p in posts} == {("test-image-1", 1, "128x128", "low")}
    assert {h["Authorization"] for _, _, _, h, _ in service.seen} == {f"Bearer {KEY}"}
    folder = tmp_path / "results" / "h"
    info = json.loads((folder / "run.json").read_text())
    assert info["status"] == "complete" and info["n_images"] == 6
    assert info["source"]["kind"] == "hosted" and info["source"]["base_url"] == service.url + "/v1"
    assert info["source"]["exposes"] == [] and info["source"]["not_exposed"] == ["guidance_scale", "seed"]
    assert info["model"]["guidance"] == "not exposed" and info["options"]["hosted"]["key_env"] == KEY_ENV
    recs = records(folder)
    assert [r["unit"] for r in recs] == list(range(6))
    assert {r["classifiers"]["skin-tone"]["skin_tone"]["status"] for r in recs} == {"ok"}
    assert all(len(r["faces"]) == 1 and (folder / r["image"]).is_file() for r in recs)
    assert not (folder / RECEIVED).exists()  # the kept answers go once their images are in images/
    no_key_in(folder)
    groups = pd.read_csv(folder / "metrics" / "groups.csv")
    assert set(groups.loc[groups.metric == "refused_rate", "value"]) == {0.0}
    capsys.readouterr()
    assert run(tmp_path, "h", *args) == 0 and len(service.posts()) == 6  # complete: nothing requested
    assert main(["-q", "dashboard", str(folder), "--out", str(tmp_path / "site")]) == 0
    methods = (tmp_path / "site" / "methods.html").read_text()
    assert "not exposed" in methods and "test-image-1" in methods and KEY not in methods


def test_a_safety_refusal_is_recorded_and_reported_as_a_rate(service: Service, tmp_path: Path) -> None:
    """The nurse prompt is refused 3 times of 6: those records say "refused" (with what the service said),
    have no image, stay out of the shares, and the refusal rate is 1 for the nurse, 0 for the doctor, 0.5 in
    all; the summary says so."""
    service.refuse = {"a photo of a nurse"}
    assert run(tmp_path, "r", *hosted(service)) == 0
    assert len(service.posts()) == 6
    folder = tmp_path / "results" / "r"
    recs = records(folder)
    refused = [r for r in recs if "refused" in r]
    assert len(refused) == 3 and {r["prompt"] for r in refused} == {"a photo of a nurse"}
    assert all(r["image"] is None and r["embedding"] is None for r in refused)
    assert all(r["refused"].startswith("content_policy_violation") for r in refused)
    assert {e["status"] for r in refused for e in r["classifiers"]["skin-tone"].values()} == {"refused"}
    assert len(list((folder / "images").rglob("*.png"))) == 3
    groups = pd.read_csv(folder / "metrics" / "groups.csv")
    rate = groups[(groups.metric == "refused_rate") & (groups.attribute == "skin_tone")].set_index("prompt")["value"]
    assert rate.to_dict() == {"a photo of a doctor": 0.0, "a photo of a nurse": 1.0}
    nurse = groups[(groups.prompt == "a photo of a nurse") & (groups.attribute == "skin_tone")]
    assert (nurse.n == 0).all() and nurse[nurse.metric == "no_person_rate"].value.isna().all()
    aggregate = pd.read_csv(folder / "metrics" / "aggregate.csv")
    pooled = aggregate[(aggregate.metric == "refused_rate") & (aggregate.split == "all")]
    assert list(pooled.attribute) == ["skin_tone"] and np.allclose(pooled.value, 0.5)  # skin-tone reads no other
    summary = (folder / "summary.txt").read_text()
    assert "refused" in summary and "0.50" in summary
    assert main(["-q", "dashboard", str(folder), "--out", str(tmp_path / "site")]) == 0


def test_429_with_retry_after_is_honoured(service: Service, tmp_path: Path) -> None:
    """A 429 asking to retry after 1 s: the same request comes again no sooner, and the run completes."""
    service.faults = ["429"]
    assert run(tmp_path, "t", *hosted(service, "--api-concurrency", "1")) == 0
    times = [t for t, method, *_ in service.seen if method == "POST"]
    assert len(times) == 7 and times[1] - times[0] >= 1.0
    assert service.posts()[0]["prompt"] == service.posts()[1]["prompt"]


def test_a_500_is_retried_then_succeeds(service: Service, tmp_path: Path) -> None:
    service.faults = ["500"]
    assert run(tmp_path, "f", *hosted(service, "--api-concurrency", "1")) == 0
    assert len(service.posts()) == 7 and service.served == 6
    assert len(records(tmp_path / "results" / "f")) == 6


@pytest.mark.parametrize(("faults", "extra", "needles"), [
    (["slow"] * 2, ["--api-timeout", "0.3", "--api-retries", "1"], ["no answer within 0.3 s, after 2 tries"]),
    (["malformed"], [], ['malformed answer (no data[0]): {"data": []}']),
    (["500"] * 2, ["--api-retries", "1"], ["HTTP 500: the server broke, after 2 tries"]),
])
def test_a_failing_service_is_one_message(service: Service, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          faults: list[str], extra: list[str], needles: list[str]) -> None:
    """A time-out, a malformed answer, retries spent: one message naming the prompt and what happened."""
    service.faults = faults
    code = run(tmp_path, "x", *hosted(service, "--api-concurrency", "1", *extra))
    expect_error(capsys, code, "--model openai:test-image-1: prompt 'a photo of a doctor' (image 0)",
                 "run the same command again to resume", *needles)


def test_a_failed_run_resumes_requesting_only_the_missing_images(service: Service, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """The service breaks after 4 images (batches of 3: the first written, one image of the second kept, and
    no request begins after the failure); the rerun requests the 2 missing images only, and its records
    equal an uninterrupted run's, byte for byte."""
    service.fail_after = 4
    args = hosted(service, "--api-concurrency", "1", "--api-retries", "0", "--batch-size", "3")
    expect_error(capsys, run(tmp_path, "k", *args), "HTTP 500")
    folder = tmp_path / "results" / "k"
    assert len(service.posts()) == 5 and len(list((folder / RECEIVED).iterdir())) == 4  # 3 written, 1 not yet
    assert len((folder / "records.rank0.jsonl").read_text().splitlines()) == 3  # the first batch
    service.fail_after = None
    before = len(service.posts())
    assert run(tmp_path, "k", *args) == 0
    assert len(service.posts()) - before == 2  # 6 units, 4 kept
    assert run(tmp_path, "whole", *args) == 0
    assert (folder / "records.jsonl").read_bytes() == (tmp_path / "results" / "whole" / "records.jsonl").read_bytes()


@pytest.mark.slow
def test_a_killed_run_resumes_requesting_only_the_missing_images(service: Service, tmp_path: Path) -> None:
    """A real kill: `evalsuite run` in a child process is killed (SIGKILL) while the service holds its
    requests after 4 images; the rerun requests exactly the images not saved, and its records equal an
    uninterrupted run's."""
    import os
    import signal
    import subprocess
    import sys

    service.hang_after = 4
    args = hosted(service, "--api-concurrency", "1", "--batch-size", "3")
    cmd = [sys.executable, "-m", "evalsuite.cli", "-q", "run", str(battery(tmp_path)), "--classifier", "skin-tone",
           "--embedder", f"clip:{CLIP}", "--device", "cpu", "--results", str(tmp_path / "results"), "--name", "k",
           *args]
    child = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    received = tmp_path / "results" / "k" / RECEIVED
    deadline = time.monotonic() + 120
    while not (received.is_dir() and len(list(received.glob("*.image"))) >= 4) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.3)  # the request held by the service is in flight: the kill comes mid-batch
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    saved = len(list(received.glob("*.image")))
    assert saved == 4 and len(service.posts()) == 5  # 4 answered, 1 held when killed
    service.hang_after, before = None, len(service.posts())
    service.release.set()
    assert run(tmp_path, "k", *args) == 0
    assert len(service.posts()) - before == 6 - saved
    assert run(tmp_path, "whole", *args) == 0
    assert (tmp_path / "results" / "k" / "records.jsonl").read_bytes() == \
        (tmp_path / "results" / "whole" / "records.jsonl").read_bytes()


def test_url_answers_are_fetched_without_the_key(service: Service, tmp_path: Path) -> None:
    assert run(tmp_path, "u", *hosted(service, "--api-response-format", "url")) == 0
    gets = [h for _, method, _, h, _ in service.seen if method == "GET"]
    assert len(gets) == 6 and all("Authorization" not in h for h in gets)
    assert {p["response_format"] for p in service.posts()} == {"url"}


@pytest.mark.parametrize("case", ["no key", "wrong key", "guidance sweep", "lora", "bad options"])
def test_hosted_refusals_before_any_request(service: Service, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    """Bad hosted inputs: one message, exit 2, no request (but the wrong key: one) and nothing written."""
    extra: list[str] = []
    if case == "no key":
        monkeypatch.delenv(KEY_ENV)
        needles = [f"--api-key-env: the environment variable {KEY_ENV} is not set"]
    elif case == "wrong key":
        monkeypatch.setenv(KEY_ENV, "sk-wrong-key-42")
        needles = ["HTTP 401: Incorrect API key provided: Bearer ***"]
    elif case == "guidance sweep":
        extra = ["--scales", "1,7.5"]
        needles = ["battery.yaml: guidance_scales: [1, 7.5]: the hosted model 'openai:test-image-1' does not "
                   "expose a guidance scale", "--scales 1"]
    elif case == "lora":
        extra = ["--lora", "adapter.safetensors"]
        needles = ["--lora: applies to diffusers models only"]
    else:
        extra = ["--api-size", "big", "--api-concurrency", "0"]
        needles = ["--api-size: 'big' must be WIDTHxHEIGHT", "--api-concurrency: must be an int in [1, 64]"]
    err = expect_error(capsys, run(tmp_path, "n", *hosted(service, "--api-concurrency", "1", *extra)), *needles)
    assert "sk-wrong-key-42" not in err and KEY not in err
    assert len(service.posts()) == (1 if case == "wrong key" else 0)
    folder = tmp_path / "results" / "n"
    assert not folder.exists() or not (folder / "records.jsonl").exists()


def test_api_options_without_a_hosted_model_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    expect_error(capsys, run(tmp_path, "m", "--api-size", "64x64"),
                 "--api-size: given without a hosted model (--model openai:NAME)")
    assert not (tmp_path / "results").exists()


# ---------------------------------------------------------------- the folder source


def write_images(folder: Path, names: list[str], flip: bool = False) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / name for name in names]
    for i, path in enumerate(paths):
        Image.fromarray(photo(flip=flip ^ bool(i % 2))).save(path)
    return paths


def test_a_folder_of_prompt_subfolders_is_audited(tmp_path: Path) -> None:
    """A subfolder per prompt, 3 images each (one a JPEG of another size): 6 records in unit order, the
    images in the run folder as PNG, faces found, and run.json says the folder exposes nothing."""
    images = tmp_path / "exported"
    write_images(images / "a photo of a doctor", ["1.png", "2.png", "3.png"])
    write_images(images / "a photo of a nurse", ["a.png", "b.png"], flip=True)
    Image.fromarray(photo()).resize((160, 160)).save(images / "a photo of a nurse" / "c.jpg")
    assert run(tmp_path, "f", "--images", str(images)) == 0
    folder = tmp_path / "results" / "f"
    info = json.loads((folder / "run.json").read_text())
    assert info["source"]["kind"] == "folder" and info["source"]["layout"] == "a subfolder per prompt"
    assert info["source"]["not_exposed"] == ["guidance_scale", "seed"] and info["source"]["images"] == 6
    recs = records(folder)
    assert [(r["prompt"], r["image_index"]) for r in recs] == [(p, i) for p in PROMPTS for i in range(3)]
    assert {r["classifiers"]["skin-tone"]["skin_tone"]["status"] for r in recs} == {"ok"}
    last = np.asarray(Image.open(folder / recs[-1]["image"]))
    assert last.shape == (160, 160, 3)
    assert main(["-q", "dashboard", str(folder), "--out", str(tmp_path / "site")]) == 0


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_a_manifest_with_seeds_and_scales_sweeps_guidance(tmp_path: Path, kind: str) -> None:
    """A manifest giving seed and guidance_scale per image: two scales are allowed, each record carries its
    row's seed, and run.json says the folder exposes both."""
    paths = write_images(tmp_path / "out", [f"{i}.png" for i in range(12)])
    rows = [{"prompt": PROMPTS[i // 6], "path": f"out/{p.name}", "seed": 100 + i,
             "guidance_scale": [1, 7.5][i // 3 % 2]} for i, p in enumerate(paths)]
    manifest = tmp_path / f"manifest.{kind}"
    if kind == "csv":
        manifest.write_text("prompt,path,seed,guidance_scale\n" + "".join(
            f"{r['prompt']},{r['path']},{r['seed']},{r['guidance_scale']}\n" for r in rows))
    else:
        manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert run(tmp_path, "m", "--images", str(manifest), "--scales", "1,7.5") == 0
    folder = tmp_path / "results" / "m"
    info = json.loads((folder / "run.json").read_text())
    assert info["source"]["exposes"] == ["guidance_scale", "seed"] and info["model"]["guidance"] == "as recorded"
    recs = records(folder)
    assert [(r["prompt"], r["guidance_scale"], r["seed"]) for r in recs] == [
        (r["prompt"], float(r["guidance_scale"]), r["seed"]) for r in rows]


def test_a_bad_folder_is_one_message_per_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A prompt not in the battery, a missing image, an unreadable one, a cell short of images: each named,
    together, exit 2, and nothing written."""
    write_images(tmp_path / "out", ["0.png", "1.png", "2.png"])
    (tmp_path / "out" / "broken.png").write_bytes(b"not a png")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("prompt,path\n" + "".join(f"a photo of a doctor,out/{i}.png\n" for i in range(3))
                        + "a photo of a nurse,out/broken.png\na photo of a nurse,out/gone.png\n"
                        + "a photo of a nurze,out/0.png\n")
    err = expect_error(capsys, run(tmp_path, "b", "--images", str(manifest)),
                       "manifest.csv, line 5: image", "broken.png' cannot be read",
                       "manifest.csv, line 6: image", "gone.png' is missing",
                       "manifest.csv, line 7: prompt 'a photo of a nurze' is not a prompt of the battery (did you "
                       "mean 'a photo of a nurse'?)")
    assert err.count("\n  - ") == 3
    assert not (tmp_path / "results").exists()
    manifest.write_text("prompt,path\n" + "".join(f"a photo of a doctor,out/{i}.png\n" for i in range(3)))
    expect_error(capsys, run(tmp_path, "b", "--images", str(manifest)),
                 "prompt 'a photo of a nurse' at guidance scale 1: 0 images, the battery asks for 3")
    expect_error(capsys, run(tmp_path, "b", "--images", str(tmp_path / "nowhere")), "nowhere' does not exist")
    manifest.write_text("prompt,path\n" + f"a photo of a doctor,{'x' * 200_000}\n")  # past csv's field limit
    expect_error(capsys, run(tmp_path, "b", "--images", str(manifest)), "manifest.csv, line 2: not CSV (field larger")
    assert not (tmp_path / "results").exists()
