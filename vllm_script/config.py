"""Pruning settings: parse, validate, merge server + request; and the count rule.

Server-wide settings come from `--hf-overrides '{"script": {...}}'` (they land on the
HF config as the attribute `script`); per-request ones from
`mm_processor_kwargs={"script": {...}}`. The request's keys override the server's.
`kept_count` is the one place that decides how many tokens an image keeps.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace

# method -> needs a query (relevance) to select
METHODS = {
    "none": False,
    "script": True,
    "gsp": False,
    "qcsp": True,
    "trim": True,
    "prumerge+": False,
    "divprune": False,
    "uniform": False,
}
RELEVANCE_SOURCES = ("llm", "clip")
# "paper": each method as its paper defines it (default); "code": as its authors' released
# code selects (see README, "Fidelity")
REFERENCES = ("paper", "code")
# where selection runs: "auto" = Triton kernels for CUDA tensors, PyTorch twins otherwise;
# "torch" = the PyTorch twins everywhere (a way around a Triton / driver problem)
BACKENDS = ("auto", "torch")
# which per-request processor kwargs the plugin's processors accept: only `script`
# ("script-only"), or any (vLLM's behaviour with --trust-request-mm-kwargs)
REQUEST_KWARGS = ("script-only", "all")
# keys only the server may set: they size start-up profiling, load weights or choose code
SERVER_ONLY_KEYS = ("max_budget", "clip_path", "backend", "request_kwargs")


MAX_GAMMA = 20.0


class SettingsError(ValueError):
    """A bad pruning setting; the message names the key, the value and what is allowed."""


@dataclass(frozen=True)
class ScriptSettings:
    """One image's pruning settings (all keys, with defaults filled in)."""

    method: str = "script"
    budget: int = 64
    relevance: str = "llm"
    tau: float = 0.2  # GSP edge threshold on cosine similarity
    gamma: float = 1.0  # GSP: weight of the mean edge similarity in the redundancy score
    theta: float = 0.5  # QCSP: relevance/diversity trade-off in [0, 1)
    gsp_ratio: float = 0.5  # script: GSP may remove up to this share of the src tokens
    negate_relevance: bool = False  # the CLIP authors' sign flip (clip relevance only)
    reference: str = "paper"  # follow the paper, or reproduce the authors' released code
    max_budget: int | None = None  # server only: largest per-request budget (profiled)
    # server only: a local Hugging Face CLIP checkpoint (text tower + projections), checked
    # and loaded at start-up whenever set; requests may then ask for relevance="clip"
    clip_path: str | None = None
    backend: str = "auto"  # server only: see BACKENDS
    request_kwargs: str = "script-only"  # server only: see REQUEST_KWARGS

    @property
    def active(self) -> bool:
        return self.method != "none"

    @property
    def needs_query(self) -> bool:
        return self.active and METHODS[self.method]

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> ScriptSettings:
        return cls(**json.loads(text))


_FIELDS = {f.name: f for f in fields(ScriptSettings)}


def _bad(key: str, value: object, allowed: str, where: str) -> SettingsError:
    return SettingsError(
        f"{where}: invalid value for 'script.{key}': {value!r}; allowed: {allowed}"
    )


def _check_value(key: str, value: object, where: str) -> object:
    def is_int(v: object) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def is_num(v: object) -> bool:
        try:
            return (is_int(v) or isinstance(v, float)) and math.isfinite(v)
        except OverflowError:  # an int beyond float range
            return False

    choices = {
        "method": sorted(METHODS),
        "relevance": list(RELEVANCE_SOURCES),
        "reference": list(REFERENCES),
        "backend": list(BACKENDS),
        "request_kwargs": list(REQUEST_KWARGS),
    }
    if key in choices:
        # isinstance first: a list or dict is unhashable and must get this message too
        if not isinstance(value, str) or value not in choices[key]:
            raise _bad(key, value, f"one of {choices[key]}", where)
    elif key in ("budget", "max_budget"):
        if key == "max_budget" and value is None:
            return value
        if not is_int(value) or value < 1:
            raise _bad(key, value, "an integer >= 1", where)
    elif key == "tau":
        if not is_num(value) or not -1.0 <= value <= 1.0:
            raise _bad(key, value, "a number in [-1, 1] (a cosine similarity)", where)
        value = float(value)
    elif key == "gamma":
        # bounded so that exp(gamma * (mu - tau)), |mu - tau| <= 2, stays finite in fp32
        if not is_num(value) or not 0.0 <= value <= MAX_GAMMA:
            raise _bad(key, value, f"a number in [0, {MAX_GAMMA:g}]", where)
        value = float(value)
    elif key == "theta":
        if not is_num(value) or not 0.0 <= value < 1.0:
            raise _bad(key, value, "a number in [0, 1)", where)
        value = float(value)
    elif key == "gsp_ratio":
        if not is_num(value) or not 0.0 <= value <= 1.0:
            raise _bad(key, value, "a number in [0, 1]", where)
        value = float(value)
    elif key == "negate_relevance":
        if not isinstance(value, bool):
            raise _bad(key, value, "true or false", where)
    elif key == "clip_path" and value is not None and (not isinstance(value, str) or not value):
        raise _bad(key, value, "a path to a local CLIP checkpoint directory", where)
    return value


def _parse_mapping(raw: object, where: str) -> dict[str, object]:
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise SettingsError(f"{where}: 'script' is not valid JSON ({exc})") from exc
    if not isinstance(raw, Mapping):
        raise SettingsError(
            f"{where}: 'script' must be an object of settings, got {type(raw).__name__}"
        )
    out = {}
    for key, value in raw.items():
        if key not in _FIELDS:
            raise SettingsError(
                f"{where}: unknown key 'script.{key}'; allowed keys: {sorted(_FIELDS)}"
            )
        out[key] = _check_value(key, value, where)
    return out


def parse_server_settings(raw: object) -> ScriptSettings | None:
    """The server's `script` setting (hf_overrides) -> settings, or None if unset."""
    if raw is None:
        return None
    where = "server setting (hf_overrides)"
    values = _parse_mapping(raw, where)
    settings = ScriptSettings(**values)
    if (
        settings.max_budget is not None
        and "budget" in values
        and (settings.budget > settings.max_budget)
    ):
        raise _bad("budget", settings.budget, f"<= max_budget ({settings.max_budget})", where)
    if settings.relevance == "clip" and settings.clip_path is None:
        raise _bad("clip_path", None, "a CLIP checkpoint directory when relevance='clip'", where)
    return settings


def resolve_request_settings(
    server: ScriptSettings | None, request_raw: object
) -> ScriptSettings | None:
    """Server settings overridden by one request's `script` keys -> settings or None.

    None means "no pruning": neither side asked for it, or the method is "none".
    """
    if request_raw is None:
        settings = server
    else:
        where = "request setting (mm_processor_kwargs)"
        values = _parse_mapping(request_raw, where)
        for key in SERVER_ONLY_KEYS:
            if key in values:
                raise _bad(key, values[key], "set only server-wide (hf_overrides)", where)
        settings = replace(server or ScriptSettings(), **values)
        limit = server.max_budget if server is not None else None
        if limit is not None and settings.budget > limit:
            raise _bad(
                "budget",
                settings.budget,
                f"an integer in [1, {limit}] (the server's max_budget, profiled at start-up)",
                where,
            )
        if settings.relevance == "clip" and (server is None or server.clip_path is None):
            raise _bad(
                "relevance", "clip", "'llm' (the server was started without clip_path)", where
            )
    if settings is None or not settings.active:
        return None
    return settings


def kept_count(num_tokens: int, settings: ScriptSettings | None) -> int:
    """Tokens an image of `num_tokens` visual tokens keeps under `settings`.

    The processor emits this many placeholders and the model returns this many rows.
    A budget >= num_tokens (or no settings) keeps every token. Every method fills the
    budget exactly: `trim` and `prumerge+` spend one of the K rows on their extra token
    (K - 1 selected or merged tokens + 1 aggregate of the rest); the other methods keep
    K of the image's tokens.
    """
    if settings is None or not settings.active:
        return num_tokens
    return min(settings.budget, num_tokens)


def prunes(num_tokens: int, settings: ScriptSettings | None) -> bool:
    return kept_count(num_tokens, settings) < num_tokens


def frame_counts(kept: int, num_frames: int) -> list[int]:
    """A video's kept tokens spread over its frames (Qwen3-VL: frames sit between
    timestamp text, so each frame's count is fixed in the prompt before encoding).

    Frame f keeps floor((f+1)·K/T) − floor(f·K/T): every frame floor(K/T) or ceil(K/T),
    the larger shares evenly spaced in time, and K < T keeps one token in K evenly
    spaced frames. The counts sum to K.
    """
    return [(f + 1) * kept // num_frames - f * kept // num_frames for f in range(num_frames)]
