"""The ``qai-hub`` client as lpcvlab uses it: credentials, errors, reachability, devices.

The client already retries what a network does to a request: every HTTP request goes through
urllib3's ``LogRetry`` (``qai_hub.util.session``: 7 tries with exponential back-off on refused
or dropped connections, timeouts, 429 and 5xx answers), and job creation is retried on top of
that. lpcvlab adds no retry loop of its own; it adds only what the client lacks:

- the API token never leaves this package: every message quoting the service goes through a
  :class:`Redactor`, and errors are raised without the client's exception attached;
- :func:`guard` turns a client error into one line: a :class:`~lpcvlab.errors.ConfigError` for a
  rejected token, a :class:`~lpcvlab.errors.RuntimeStageError` naming what failed otherwise;
- :func:`submit` recognises a job that AI Hub created but the client could not fetch afterwards
  (``submit_*_job`` creates, then ``get_job``\\s; :class:`HubClient` notes every fetched ID) and
  raises :class:`CreatedButUnfetched`, so that the job is recorded instead of paid for twice;
- :func:`preflight` fails within ``hub.connect_timeout_s`` with one line when AI Hub cannot be
  reached (DNS, refused, no answer), before checking the token and the device.

The token comes from ``QAI_HUB_API_TOKEN`` or the client's own config file
(``~/.qai_hub/client.ini``, or ``$QAIHUB_CLIENT_INI``).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

import botocore.exceptions
import qai_hub
import qai_hub.client as hub_client
import requests
import urllib3.exceptions as u3
from qai_hub import api_utils
from qai_hub.public_rest_api import DEFAULT_HUB_API_URL, DEFAULT_HUB_WEB_URL, APIException
from requests.adapters import HTTPAdapter

from lpcvlab.errors import ConfigError, RuntimeStageError
from lpcvlab.types import CompiledIO, DeviceTensor

TOKEN_ENV = "QAI_HUB_API_TOKEN"
log = logging.getLogger(__name__)
T = TypeVar("T")

# What the client and its transports raise (requests for the REST API and pre-signed URLs,
# botocore for transfers with S3 credentials); anything else is a bug and keeps its traceback.
CLIENT_ERRORS = (
    hub_client.Error,
    APIException,
    requests.RequestException,
    ValueError,
    botocore.exceptions.BotoCoreError,
    botocore.exceptions.ClientError,
)


# --------------------------------------------------------------------------- credentials


def load_client_config() -> qai_hub.ClientConfig:
    """The client configuration with its API token, or a ConfigError saying how to provide one.

    ``QAI_HUB_API_TOKEN`` wins; otherwise the file the ``qai-hub`` client itself reads
    (``$QAIHUB_CLIENT_INI`` or ``~/.qai_hub/client.ini``). Its API/web URLs are used either way,
    so an account on another AI Hub deployment keeps working.
    """
    path = api_utils.get_config_path()
    file_cfg = None
    unreadable = False
    if os.path.exists(path):
        try:
            file_cfg = api_utils.load_api_config_from_file(path)
        except Exception:  # noqa: BLE001 - parser messages may quote the file (and so the token)
            unreadable = True
    env_token = os.environ.get(TOKEN_ENV, "").strip()
    if env_token:
        return qai_hub.ClientConfig(
            api_token=env_token,
            api_url=file_cfg.api_url if file_cfg else DEFAULT_HUB_API_URL,
            web_url=file_cfg.web_url if file_cfg else DEFAULT_HUB_WEB_URL,
            verbose=False,
            default_project=file_cfg.default_project if file_cfg else None,
        )
    if file_cfg is not None and file_cfg.api_token.strip():
        file_cfg.verbose = False  # the client's own progress bars and polling prints stay off
        return file_cfg
    found = (
        f"{path} could not be read as an AI Hub client config (it needs an [api] section with "
        "api_url, web_url and api_token)"
        if unreadable
        else f"{path} has no api_token"
        if file_cfg is not None
        else f"{path} does not exist"
    )
    raise ConfigError(
        f"no Qualcomm AI Hub API token: {TOKEN_ENV} is not set and {found}. Run "
        "`qai-hub configure --api_token <your token>` (token from the Account page of "
        f"https://aihub.qualcomm.com) or export {TOKEN_ENV}=<your token>; "
        "hub=local runs without an account."
    )


class Redactor:
    """Removes the API token from any text that leaves this package."""

    def __init__(self, secret: str) -> None:
        self._secret = secret

    def __call__(self, text: object) -> str:
        out = str(text)
        if self._secret and len(self._secret) >= 4:
            out = out.replace(self._secret, "***")
        return out

    def __repr__(self) -> str:
        return "<redactor>"


class HubClient(qai_hub.Client):
    """A ``qai_hub.Client`` that notes every job ID it fetches.

    ``submit_*_job`` creates a job, then fetches it with ``get_job``. When that fetch fails (the
    network went down past the client's retries), the job exists and is billed although the
    submission raised; the noted ID lets :func:`submit` tell that case apart.
    """

    def __init__(self, config: qai_hub.ClientConfig) -> None:
        super().__init__(config=config)
        self.fetched_job_ids: list[str] = []

    def get_job(self, job_id: str, job_type: Any = None) -> Any:  # type: ignore[override]
        self.fetched_job_ids.append(job_id)
        return super().get_job(job_id, job_type)


def make_client(config: qai_hub.ClientConfig | None = None) -> HubClient:
    """A client bound to an explicit config (never the module-global one)."""
    return HubClient(config or load_client_config())


# --------------------------------------------------------------------------- errors


def one_line(text: str) -> str:
    """The client wraps advice in box drawings; one line reads better in a log or an error."""
    text = re.sub(r"[┌┐└┘─│]+", " ", text)
    text = re.sub(r"(?<!\S)\|(?!\S)", " ", text)  # the box's side borders
    return re.sub(r"\s+", " ", text).strip()


def describe(error: object, redact: Callable[[object], str]) -> str:
    """One line for a client error (or a reason AI Hub gave), scrubbed of the token."""
    return one_line(redact(error)) or type(error).__name__


def _is_auth_failure(message: str) -> bool:
    return "Failed to authenticate" in message or "API token is missing" in message


def stage_error(what: str, message: str) -> Exception:
    """The error for a client call that failed while ``what``: a rejected token is the user's
    configuration, anything else a failed stage."""
    if _is_auth_failure(message):
        return ConfigError(
            f"AI Hub rejected the API token while {what}. Check the token on the Account page of "
            f"https://aihub.qualcomm.com, then run `qai-hub configure --api_token <token>` or set "
            f"{TOKEN_ENV}."
        )
    return RuntimeStageError(f"AI Hub: {what} failed: {message}")


def guard(
    fn: Callable[[], T],
    what: str,
    redact: Callable[[object], str],
    passthrough: tuple[type[BaseException], ...] = (),
) -> T:
    """``fn()``, a client error turned into one line (see :func:`stage_error`) naming ``what``.

    No retries here: the client has retried network errors already. The error is raised without
    the original exception attached (it may quote the token); ``passthrough`` types reach the
    caller untouched.
    """
    try:
        return fn()
    except passthrough:
        raise
    except CLIENT_ERRORS as exc:
        message = describe(exc, redact)
    raise stage_error(what, message)


class CreatedButUnfetched(Exception):
    """A submission created its job, then failed to fetch it: the job exists and is paid for."""

    def __init__(self, job_id: str, reason: str) -> None:
        super().__init__(job_id)
        self.job_id = job_id
        self.reason = reason


# How the client waits between job creations refused with 429 (Client._api_call_with_retry):
# 20 s, doubled up to 60 s, for at most RATE_LIMIT_RETRY_TIMEOUT minutes.
RATE_LIMIT_FIRST_WAIT_S = 20.0
RATE_LIMIT_MAX_WAIT_S = 60.0


def submit(
    client: Any,
    fn: Callable[[], T],
    what: str,
    redact: Callable[[object], str],
    *,
    find: Callable[[], T | None] | None = None,
    retry_rate_limits: bool = False,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Submit a job through ``fn`` as :func:`guard` does, but raise :class:`CreatedButUnfetched`
    when the job was created and only fetching it failed (needs a :class:`HubClient`).

    ``retry_rate_limits``: a 429 is waited out as the client does for compile and inference
    creation (it does not for quantize jobs). ``find``: when the submission failed with no job ID
    seen (the creation response itself was lost), look the job up (by its unique name) before
    giving up, so that a job AI Hub created is used rather than paid for twice.
    """
    fetched: list[str] | None = getattr(client, "fetched_job_ids", None)
    seen = len(fetched) if fetched is not None else 0
    waited, pause = 0.0, RATE_LIMIT_FIRST_WAIT_S
    while True:
        try:
            return fn()
        except hub_client.RateLimitedError as exc:
            limit_s = hub_client.RATE_LIMIT_RETRY_TIMEOUT * 60
            if not retry_rate_limits or waited >= limit_s:
                message = describe(exc, redact)
                break
            log.warning("AI Hub: %s: rate-limited (429); retrying in %.0f s", what, pause)
            sleep(pause)
            waited += pause
            pause = min(pause * 2, RATE_LIMIT_MAX_WAIT_S)
        except CLIENT_ERRORS as exc:
            message = describe(exc, redact)
            break
    created = fetched[seen:] if fetched is not None else []
    if created:
        raise CreatedButUnfetched(created[-1], message)
    if find is not None:
        found = guard(find, f"looking for the job of {what}", redact)
        if found is not None:
            log.warning(
                "AI Hub: %s failed (%s), but AI Hub had created the job: found it by name",
                what,
                message,
            )
            return found
    raise stage_error(what, message)


def find_job_by_name(client: Any, job_type: qai_hub.JobType, name: str, limit: int = 50) -> Any:
    """The most recent job of ``job_type`` named ``name`` among the account's last ``limit``
    jobs (the client's job summaries), fetched; None when there is none."""
    for summary in client.get_job_summaries(limit=limit, type=job_type):
        if summary.name == name:
            return client.get_job(summary.job_id)
    return None


def target_io(model: Any, what: str, redact: Callable[[object], str]) -> CompiledIO:
    """A compiled (target) model's inputs and outputs as AI Hub describes them
    (``Model.input_spec`` / ``output_spec``, qai-hub >= 0.52: ``TensorSpec`` with the scale and
    zero point of quantized I/O), every graph of the model in order."""

    def read(kind: str) -> tuple[DeviceTensor, ...]:
        spec = guard(lambda: getattr(model, kind), f"reading the {kind} of {what}", redact)
        return tuple(
            DeviceTensor(
                str(t.name),
                tuple(int(d) for d in (t.shape or ())),
                str(t.dtype),
                None if t.scale is None else float(t.scale),
                None if t.zero_point is None else int(round(float(t.zero_point))),
            )
            for graph in (spec or {}).values()
            for t in graph
        )

    return CompiledIO(read("input_spec"), read("output_spec"))


# --------------------------------------------------------------------------- devices, preflight


def list_devices(
    client: qai_hub.Client | None = None,
    attributes: Sequence[str] = (),
    redact: Callable[[object], str] | None = None,
) -> list[str]:
    """Names of the AI Hub devices this account can target (what ``device.aihub_name`` takes)."""
    client = client or make_client()
    redact = redact or Redactor(client.config.api_token)
    devices = guard(
        lambda: client.get_devices(attributes=list(attributes)), "listing devices", redact
    )
    return sorted({d.name for d in devices})


def check_device(client: qai_hub.Client, device: str, redact: Callable[[object], str]) -> None:
    """The token works and the account can target ``device``; a ConfigError otherwise."""
    devices = guard(
        lambda: client.get_devices(name=device), f"looking up device {device!r}", redact
    )
    if not devices:
        raise ConfigError(
            f"AI Hub has no device named {device!r} for this account (device.aihub_name); "
            "run `lpcvlab hub devices` to see the names it accepts"
        )


def probe(api_url: str, timeout_s: float) -> None:
    """One request to the API host, ``timeout_s`` to connect and to answer, no retries: any HTTP
    answer means AI Hub can be reached; no answer is a one-line ConfigError saying what to check.
    """
    session = requests.Session()
    adapter = HTTPAdapter(max_retries=0)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    try:
        with session:
            response = session.get(
                api_url, timeout=(timeout_s, timeout_s), allow_redirects=False, stream=True
            )
            response.close()
    except requests.RequestException as exc:
        reason = _unreachable_reason(exc, urlsplit(api_url).hostname or api_url, timeout_s)
    else:
        return
    raise ConfigError(
        f"AI Hub cannot be reached at {api_url}: {reason}. Check this machine's network "
        f"connection, its proxy settings (HTTPS_PROXY, NO_PROXY) and {_url_source()}; "
        "hub=local runs without AI Hub."
    )


def _url_source() -> str:
    """Where the API URL came from, naming the client's config file only when it exists."""
    path = api_utils.get_config_path()
    if os.path.isfile(path):
        return f"the api_url in {path}"
    return (
        "the API URL (the client's default: no client config file; `qai-hub configure "
        "--api_token <token> --api_url <url>` writes one)"
    )


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc``, what it wraps (requests wraps urllib3's MaxRetryError, which names a reason)."""
    out: list[BaseException] = []
    todo: list[Any] = [exc]
    while todo:
        e = todo.pop(0)
        if not isinstance(e, BaseException) or any(e is seen for seen in out):
            continue
        out.append(e)
        todo += [getattr(e, "reason", None), *e.args[:1], e.__cause__, e.__context__]
    return out


def _unreachable_reason(exc: requests.RequestException, host: str, timeout_s: float) -> str:
    causes = _causes(exc)

    def has(*types: type[BaseException]) -> bool:
        return any(isinstance(c, types) for c in causes)

    if has(requests.exceptions.ProxyError, u3.ProxyError):
        return "the proxy refused or dropped the connection"
    if has(u3.NameResolutionError, socket.gaierror):
        return f"the name {host} could not be resolved (DNS)"
    if has(ConnectionRefusedError) or any("refused" in str(c).lower() for c in causes):
        return f"{host} refused the connection"
    if has(requests.exceptions.ConnectTimeout, u3.ConnectTimeoutError):
        return f"{host} did not accept a connection within {timeout_s:g} s (hub.connect_timeout_s)"
    if has(requests.exceptions.ReadTimeout, u3.ReadTimeoutError):
        return f"{host} did not answer within {timeout_s:g} s (hub.connect_timeout_s)"
    if has(requests.exceptions.SSLError, u3.SSLError):
        return f"the TLS handshake with {host} failed (a proxy that inspects traffic?)"
    return f"the connection to {host} failed ({type(causes[-1]).__name__})"


def preflight(
    client: qai_hub.Client, device: str, timeout_s: float, redact: Callable[[object], str]
) -> None:
    """AI Hub answers within ``timeout_s``, accepts the token, and knows ``device``."""
    probe(client.config.api_url, timeout_s)
    check_device(client, device, redact)
