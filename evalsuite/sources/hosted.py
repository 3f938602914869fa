"""A hosted image model behind an OpenAI-compatible images endpoint (DALL-E 3, gpt-image-1, or any
service that speaks the same API), audited as `--model openai:NAME`.

One image is one request, `POST {base}/images/generations` with JSON `{"model": NAME, "prompt": ...,
"n": 1}` (plus `size`, `quality` and `response_format` where given) and the header `Authorization:
Bearer <key>`, the key read from the environment variable `--api-key-env` names (default
OPENAI_API_KEY) and never written anywhere: not to run.json, records, logs or messages (a service's
answer quoted in a message has the key masked). The answer's `data[0].b64_json` is decoded, or
`data[0].url` fetched (without the key: the URL is the service's signed link, possibly on another host).

Requests of a batch run concurrently, at most `concurrency` at a time. HTTP 429 and 5xx answers, time-outs
and broken connections are retried up to `retries` times, after the wait the answer's `Retry-After` asks
for (seconds or an HTTP date, at most MAX_WAIT_S), else BACKOFF_S x 2^attempt. A refusal by the service's
safety filter (HTTP 400 whose `error.code` is one of REFUSAL_CODES) is the image's result, status
"refused", not an error. Any other failure (retries spent, another 4xx, an answer that is not an image)
is one `SuiteError` naming the prompt and what the service said.

Every image (and every refusal) is saved under the run folder's `RECEIVED` folder the moment it arrives,
keyed by its unit (prompt index, scale, image index), so a run that is killed or fails loses no paid
request: the same command resumes and requests only the images not saved. The folder goes when the run
completes (its images are then in images/ as PNG).

The service exposes neither a guidance scale nor a seed: a battery that sweeps guidance is refused
(`evalsuite.sources.base.one_scale_problem`), and records carry the unit's derived seed as an identifier
only (run.json's `source.not_exposed` says so).
"""

from __future__ import annotations

import base64
import binascii
import concurrent.futures
import email.utils
import http.client
import io
import json
import logging
import math
import os
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from evalsuite.errors import SuiteError
from evalsuite.models import ModelProfile
from evalsuite.sources.base import Made, Source, Wanted, describe_source

log = logging.getLogger(__name__)

HOSTED_PREFIX = "openai:"  # --model openai:NAME audits model NAME of an OpenAI-compatible images endpoint
DEFAULT_BASE = "https://api.openai.com/v1"
REFUSAL_CODES = ("content_policy_violation", "moderation_blocked")  # error.code of a safety refusal (HTTP 400)
RECEIVED = ".received"  # under the run folder: what the service returned, kept until the run completes
BACKOFF_S = 1.0  # the first retry's wait when the service names none; doubled at each further retry
MAX_WAIT_S = 300.0  # the longest wait between two tries, whatever Retry-After asks
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SIZE = re.compile(r"\d+x\d+|auto")
_WORD = re.compile(r"[A-Za-z0-9_.-]+")


def _option(help: str, kind: type = str, metavar: str | None = None) -> dict[str, Any]:
    return {"help": help, "type": kind, "metavar": metavar}


@dataclass(frozen=True)
class HostedOptions:
    """How to reach a hosted model (`--model openai:NAME`): each field is the command-line option
    `--api-<field>` (declared here once; `evalsuite.cli` builds the options from these fields)."""

    base: str = field(default=DEFAULT_BASE, metadata=_option(
        "base URL of the OpenAI-compatible images API (default %(default)s)", metavar="URL"))
    key_env: str = field(default="OPENAI_API_KEY", metadata=_option(
        "environment variable holding the API key (default %(default)s); the key is never written", metavar="VAR"))
    size: str | None = field(default=None, metadata=_option(
        "image size the service is asked for, e.g. 1024x1024 (default: the service's)", metavar="WxH"))
    quality: str | None = field(default=None, metadata=_option(
        "quality the service is asked for, e.g. standard, hd, low, high (default: the service's)"))
    response_format: str | None = field(default=None, metadata=_option(
        "b64_json or url (default: not sent; gpt-image models always answer b64_json)"))
    concurrency: int = field(default=4, metadata=_option("requests in flight at once (default %(default)s)", int))
    retries: int = field(default=5, metadata=_option(
        "retries of a request after HTTP 429, 5xx, a time-out or a broken connection (default %(default)s)", int))
    timeout: float = field(default=120.0, metadata=_option(
        "seconds to wait for one answer (default %(default)s)", float))

    def changed(self) -> list[str]:
        """The command-line options of the fields not at their default."""
        return [flag(f.name) for f in fields(self) if getattr(self, f.name) != f.default]


def flag(name: str) -> str:
    """The command-line option of HostedOptions field `name`."""
    return "--api-" + name.replace("_", "-")


def is_hosted(model: str | None) -> bool:
    """Whether `--model` names a hosted model (openai:NAME)."""
    return bool(model) and str(model).startswith(HOSTED_PREFIX)


def hosted_problems(model: str, options: HostedOptions) -> list[str]:
    """What is wrong with `--model openai:NAME` and its `--api-*` options, one message each, before any
    request (the key's variable must be set; its value is never shown)."""
    problems = []
    name = model[len(HOSTED_PREFIX):]
    if not _WORD.fullmatch(name):
        problems.append(f"--model: '{model}' must name the service's model after '{HOSTED_PREFIX}', e.g. "
                        f"{HOSTED_PREFIX}gpt-image-1")
    url = urllib.parse.urlparse(options.base)
    if url.scheme not in ("http", "https") or not url.netloc:
        problems.append(f"{flag('base')}: '{options.base}' is not an http(s) URL, e.g. {DEFAULT_BASE}")
    if not _ENV_NAME.fullmatch(options.key_env):
        problems.append(f"{flag('key_env')}: '{options.key_env}' is not an environment variable name")
    elif not os.environ.get(options.key_env):
        problems.append(f"{flag('key_env')}: the environment variable {options.key_env} is not set; put the "
                        f"service's API key in it (it is read from there and never written)")
    if options.size is not None and not _SIZE.fullmatch(options.size):
        problems.append(f"{flag('size')}: '{options.size}' must be WIDTHxHEIGHT (e.g. 1024x1024) or auto")
    if options.quality is not None and not _WORD.fullmatch(options.quality):
        problems.append(f"{flag('quality')}: '{options.quality}' must be one word, e.g. standard, hd, high")
    if options.response_format not in (None, "b64_json", "url"):
        problems.append(f"{flag('response_format')}: '{options.response_format}' must be b64_json or url")
    for name_, value, low, high in (("concurrency", options.concurrency, 1, 64), ("retries", options.retries, 0, 20)):
        if not low <= value <= high:
            problems.append(f"{flag(name_)}: must be an int in [{low}, {high}], got {value}")
    if not (math.isfinite(options.timeout) and options.timeout > 0):
        problems.append(f"{flag('timeout')}: must be a number of seconds > 0, got {options.timeout:g}")
    return problems


def hosted_source(model: str, options: HostedOptions, device: str, run_dir: Path) -> Source:
    """The hosted model `model` (openai:NAME) as a `Source`; its received images are kept in
    `run_dir`/RECEIVED. Call `hosted_problems` first."""
    name = model[len(HOSTED_PREFIX):]
    generator = HostedGenerator(name, options, os.environ.get(options.key_env, ""), run_dir / RECEIVED)
    info = describe_source("hosted", (), api="OpenAI-compatible images (POST /images/generations)",
                           base_url=options.base, model=name, size=options.size, quality=options.quality,
                           response_format=options.response_format, key_env=options.key_env,
                           concurrency=options.concurrency, retries=options.retries, timeout_s=options.timeout,
                           requests="one per image (n=1): prompts x images_per_prompt, plus retries")
    entry = {"id": model, "revision": None, "builtin": False, "domain": "natural", "lora": None,
             "guidance": "not exposed"}
    return Source(generator, entry, ModelProfile(), device, info=info, refusals=True, scratch=RECEIVED)


class _Refused(Exception):
    """The service's safety filter refused a prompt (HTTP 400 with one of REFUSAL_CODES)."""


class HostedGenerator:
    """Makes each unit's image with one request to the service (see the module docstring); a unit whose
    image or refusal is already saved under `received` is not requested again."""

    def __init__(self, model: str, options: HostedOptions, key: str, received: Path) -> None:
        self.model, self.options, self.received = model, options, received
        self._key = key
        self._lock = threading.Lock()
        self.requests = 0  # requests sent by this generator (retries and URL fetches included)

    def make(self, units: Sequence[Wanted]) -> Made:
        images: list[np.ndarray | None] = [None] * len(units)
        refusals: list[str | None] = [None] * len(units)
        todo = []
        for i, unit in enumerate(units):
            saved = self._saved(unit)
            if saved is None:
                todo.append(i)
            else:
                images[i], refusals[i] = saved
        if todo:
            self._request_all(units, todo, images, refusals)
        return Made(images, refusals, [None] * len(units))

    def _request_all(self, units: Sequence[Wanted], todo: list[int], images: list[np.ndarray | None],
                     refusals: list[str | None]) -> None:
        """Request the units at `todo` concurrently; after a failure (or an interrupt) no request begins, those
        in flight finish (and are saved), then the first failure is raised."""
        failed = threading.Event()

        def one(unit: Wanted) -> tuple[np.ndarray | None, str | None] | None:
            if failed.is_set():
                return None
            try:
                return self._one(unit)
            except BaseException:
                failed.set()
                raise

        failure: BaseException | None = None
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(self.options.concurrency, len(todo))) as pool:
            futures = {pool.submit(one, units[i]): i for i in todo}
            try:
                for future in concurrent.futures.as_completed(futures):
                    try:
                        got = future.result()
                    except BaseException as exc:  # noqa: BLE001 - raised below, once the requests in flight end
                        failure = failure or exc
                        continue
                    if got is not None:
                        images[futures[future]], refusals[futures[future]] = got
            except BaseException:  # Ctrl-C: the pool's exit waits for the requests in flight, begins none
                failed.set()
                raise
        if failure is not None:
            raise failure

    def _one(self, unit: Wanted) -> tuple[np.ndarray | None, str | None]:
        """One unit's image (or refusal), requested and saved."""
        body: dict[str, Any] = {"model": self.model, "prompt": unit.prompt.text, "n": 1}
        for key in ("size", "quality", "response_format"):
            if getattr(self.options, key) is not None:
                body[key] = getattr(self.options, key)
        request = urllib.request.Request(
            self.options.base.rstrip("/") + "/images/generations", data=json.dumps(body).encode(), method="POST",
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {self._key}"})
        try:
            data = self._image_bytes(self._send(request, unit), unit)
        except _Refused as refused:
            reason = str(refused)
            self._save(self._path(unit, ".refused.json"), json.dumps({"refused": reason}).encode())
            return None, reason
        image = _decode(data, lambda what: self._error(unit, what))
        self._save(self._path(unit, ".image"), data)
        return image, None

    def _image_bytes(self, answer: bytes, unit: Wanted) -> bytes:
        """The image of a 200 answer: data[0].b64_json decoded, or data[0].url fetched (without the key)."""
        try:
            item = json.loads(answer)["data"][0]
        except (ValueError, KeyError, IndexError, TypeError):
            raise self._error(unit, f"malformed answer (no data[0]): {_start(answer)}") from None
        if isinstance(item, dict) and isinstance(item.get("b64_json"), str):
            try:
                return base64.b64decode(item["b64_json"], validate=True)
            except (binascii.Error, ValueError):
                raise self._error(unit, "malformed answer: data[0].b64_json is not base64") from None
        if isinstance(item, dict) and isinstance(item.get("url"), str):
            if urllib.parse.urlparse(item["url"]).scheme not in ("http", "https"):
                raise self._error(unit, f"malformed answer: data[0].url is not an http(s) URL: {item['url'][:80]}")
            return self._send(urllib.request.Request(item["url"], method="GET"), unit)
        raise self._error(unit, f"malformed answer: data[0] has neither b64_json nor url: {_start(answer)}")

    def _send(self, request: urllib.request.Request, unit: Wanted) -> bytes:
        """The body of a 200 answer to `request`, retrying 429, 5xx, time-outs and broken connections."""
        for attempt in range(self.options.retries + 1):
            wait: float | None = None
            with self._lock:
                self.requests += 1
            try:
                with urllib.request.urlopen(request, timeout=self.options.timeout) as answer:
                    return bytes(answer.read())
            except urllib.error.HTTPError as exc:
                said = exc.read()
                if exc.code != 429 and exc.code < 500:
                    if exc.code == 400 and (reason := _refusal(said)) is not None:
                        raise _Refused(self._mask(reason)) from None
                    raise self._error(unit, f"HTTP {exc.code}: {self._said(said)}") from None
                failure, wait = f"HTTP {exc.code}: {self._said(said)}", _retry_after(exc.headers.get("Retry-After"))
            except (TimeoutError, urllib.error.URLError, http.client.HTTPException, OSError) as exc:
                cause: Any = getattr(exc, "reason", None) or exc
                timed_out = isinstance(exc, TimeoutError) or isinstance(cause, TimeoutError)
                failure = (f"no answer within {self.options.timeout:g} s" if timed_out
                           else f"connection failed ({self._mask(str(cause))})")
            if attempt == self.options.retries:
                raise self._error(unit, f"{failure}, after {attempt + 1} tries")
            time.sleep(min(MAX_WAIT_S, wait if wait is not None else BACKOFF_S * 2 ** attempt))
        raise AssertionError("unreachable")  # the loop returns or raises

    def _error(self, unit: Wanted, what: str) -> SuiteError:
        return SuiteError(f"--model {HOSTED_PREFIX}{self.model}: prompt {unit.prompt.text!r} (image "
                          f"{unit.image_index}): {what}; the images received so far are kept: run the same "
                          "command again to resume")

    def _said(self, body: bytes) -> str:
        """What the service said: its error.message where it gave one, else the start of its answer."""
        try:
            error = json.loads(body).get("error")
        except (ValueError, AttributeError):
            error = None
        text = str(error.get("message") if isinstance(error, dict) else error or _start(body))
        return self._mask(text.strip() or "an empty answer")

    def _mask(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def _path(self, unit: Wanted, suffix: str) -> Path:
        return self.received / f"p{unit.prompt_index:03d}_g{unit.guidance_scale:g}_i{unit.image_index:04d}{suffix}"

    def _saved(self, unit: Wanted) -> tuple[np.ndarray | None, str | None] | None:
        """A unit's saved image or refusal (None: not saved); a saved file that cannot be read is requested
        again."""
        image, refused = self._path(unit, ".image"), self._path(unit, ".refused.json")
        try:
            if image.is_file():
                return _decode(image.read_bytes(), SuiteError), None
            if refused.is_file():
                return None, str(json.loads(refused.read_text())["refused"])
        except (SuiteError, OSError, ValueError, KeyError, TypeError):
            log.warning("%s: cannot read the saved answer; requesting it again", image.parent)
        return None

    def _save(self, path: Path, data: bytes) -> None:
        """Write `data` to `path` whole (beside it, then renamed), the moment it arrives."""
        tmp = path.with_name(f"{path.name}.{threading.get_ident()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise SuiteError(f"{path}: cannot write ({exc.strerror or exc}); free space or fix the permission, "
                             "then run the same command again to resume") from None


def _start(body: bytes) -> str:
    """The start of an answer, as text, for a message (an image answer holds no key to mask)."""
    text = body[:200].decode("utf-8", "replace")
    return text + ("..." if len(body) > 200 else "")


def _refusal(body: bytes) -> str | None:
    """The service's message where `body` (of an HTTP 400) is a safety refusal, else None."""
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return None
    if isinstance(error, dict) and error.get("code") in REFUSAL_CODES:
        return f"{error['code']}: {error.get('message') or 'refused by the safety filter'}"
    return None


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (seconds, or an HTTP date), or None if absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _decode(data: bytes, error: Any) -> np.ndarray:
    """An image file's bytes as uint8 RGB (H, W, 3); `error(what)` makes the exception for bytes that are
    not an image."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise error(f"malformed answer: the image cannot be read ({exc})") from None
