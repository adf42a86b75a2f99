"""Typed configuration: schemas registered with Hydra, loaded and checked once, at the top.

``import lpcvlab.config`` registers every schema in Hydra's ConfigStore (``run.py`` does it before
composing). :func:`load_settings` turns a composed DictConfig into a :class:`RunConfig` of plain
dataclasses, checks values and group combinations, and raises a one-line
:class:`~lpcvlab.errors.ConfigError` naming the key or the two groups -- before any MLflow run,
data or model work. :func:`composition_error` does the same for errors Hydra raises while
composing (an unknown key, a value of the wrong type, a missing option).
"""

from __future__ import annotations

import re
from dataclasses import fields, is_dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

import lpcvlab.config.resolvers  # noqa: F401  (${lpcvlab_uid:} in hydra.run.dir)
from lpcvlab.config.checks import check_combinations
from lpcvlab.config.schema import SCHEMAS, RunConfig, validate
from lpcvlab.config.weights import report_weights
from lpcvlab.errors import ConfigError

__all__ = ["RunConfig", "as_schema", "composition_error", "load_settings", "register"]

# Keys a run may carry beside the schema: `+reproduce=RUN_ID` is handled before the pipeline.
EXTRA_KEYS = ("reproduce",)


def register() -> None:
    """Store the schemas: ``run_config`` (top level) and ``schema/<group>/<kind>``."""
    cs = ConfigStore.instance()
    cs.store(name="run_config", node=RunConfig)
    for (group, name), node in SCHEMAS.items():
        cs.store(group=f"schema/{group}", name=name, node=node)


register()


def load_settings(cfg: DictConfig | RunConfig, report: bool = True) -> RunConfig:
    """The composed config as typed dataclasses, every value and combination checked;
    ``report=False`` leaves out the weights' check and report (it imports open_clip or torch and
    logs), for a check made before the run's logging is set up."""
    if isinstance(cfg, RunConfig):
        settings = cfg
    else:
        body = cfg
        extra = [k for k in EXTRA_KEYS if k in cfg]
        if extra:
            body = OmegaConf.masked_copy(cfg, [k for k in cfg if k not in extra])
        try:
            if OmegaConf.get_type(body) is not RunConfig:
                body = typed(body)
            settings = OmegaConf.to_object(body)
        except MissingMandatoryValue as exc:
            key = getattr(exc, "full_key", "") or "a required key"
            raise ConfigError(
                f"{key} is not set; give it on the command line ({key}=...) or in its config file"
            ) from None
        except OmegaConfBaseException as exc:
            raise ConfigError(_omegaconf_message(exc)) from None
    assert isinstance(settings, RunConfig)
    if not isinstance(cfg, RunConfig):
        _no_added_keys(body, settings)
    check_combinations(settings)  # first: a group that cannot go with the track says so
    validate(settings)
    if report:
        report_weights(settings)  # last: it imports open_clip / torch to look in a cache
    return settings


def _no_added_keys(node: Any, obj: Any, prefix: str = "") -> None:
    """A key added with ``+key=value`` lands in the config but not in the schema: refuse it
    rather than drop it silently."""
    if not is_dataclass(obj) or not isinstance(node, DictConfig):
        return
    known = {f.name: getattr(obj, f.name) for f in fields(obj)}
    for key in node.keys():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in known:
            what = getattr(type(obj), "what", type(obj).__name__)
            raise ConfigError(
                f"{full} is not a setting of {what}; check the spelling (known keys: "
                f"{', '.join(sorted(known))})"
            )
        _no_added_keys(node._get_node(key), known[key], full)


def schema_for(group: str, node: Any) -> type | None:
    """The schema of a group's plain node: the smallest one that has every key it sets."""
    keys = set(node.keys()) if isinstance(node, (dict, DictConfig)) else set()
    fits = [
        cls
        for (g, _), cls in SCHEMAS.items()
        if g == group and keys <= {f.name for f in fields(cls)}
    ]
    return min(fits, key=lambda cls: len(fields(cls)), default=None)


def typed(plain: DictConfig) -> DictConfig:
    """A config saved as plain YAML (a run's ``config.yaml``) typed again with the schemas, so
    that it loads exactly as the composed config it was written from."""
    groups = {g for g, _ in SCHEMAS}
    top = OmegaConf.structured(RunConfig)
    rest = {}
    for key, node in plain.items():
        schema = schema_for(str(key), node) if key in groups else None
        if schema is not None:
            top[key] = as_schema(node, schema, as_node=True)
        else:
            rest[key] = node
    return OmegaConf.merge(top, rest)


def as_schema(node: Any, schema: type, as_node: bool = False) -> Any:
    """``node`` (a plain mapping or DictConfig: a saved config's group, an option file, a
    checkpoint's record) read with ``schema`` as a composed config is: defaults filled, values
    converted to the field types. The dataclass instance (one of ``schema`` is returned as it
    is), or with ``as_node`` the typed DictConfig."""
    if isinstance(node, schema):
        return node
    merged = OmegaConf.merge(OmegaConf.structured(schema), node)
    return merged if as_node else OmegaConf.to_object(merged)


def _omegaconf_message(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", "") or ""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"{key}: {first}" if key else first


# --------------------------------------------------------------------------- Hydra's errors

_NOT_IN = re.compile(r"Key '(?P<key>[^']+)' (?:not in|is not in struct) '?(?P<type>\w+)'?")
_FULL_KEY = re.compile(r"full_key: (?P<full>\S+)")
_IN_CONFIG = re.compile(r"^In '(?P<where>[\w/]+)'")
_CONVERT = re.compile(
    r"Value '(?P<value>.*)' of type '(?P<got>\w+)' could not be converted to (?P<to>\w+)"
)
_KINDS = {"Integer": "a whole number", "Float": "a number", "Boolean": "true or false"}
_NOT_FOUND = re.compile(r"Could not find '(?P<group>[\w/]+)/(?P<option>[\w.-]+)'")


def _schema_by_name(name: str) -> type | None:
    """The schema class called ``name``: a group's, or a section nested in one."""
    todo = list(SCHEMAS.values())
    while todo:
        node = todo.pop(0)
        if node.__name__ == name:
            return node
        todo += [f.default_factory for f in fields(node) if is_dataclass(f.default_factory)]
    return None


def _who_has(group: str, key: str) -> list[str]:
    out = []
    for (g, _), node in SCHEMAS.items():
        if g == group and key in {f.name for f in fields(node)}:
            out.append(str(getattr(node, "what", node.__name__)))
    return out


def composition_error(exc: BaseException) -> str | None:
    """One line for an error Hydra raised while composing, or None when it is not one."""
    from hydra.errors import HydraException, OverrideParseException

    if not isinstance(exc, (HydraException, OmegaConfBaseException)):
        return None
    if isinstance(exc, OverrideParseException):
        reason = str(exc.message).strip().splitlines()[0] if exc.message else "unreadable"
        return (
            f"cannot read the override {exc.override!r} ({reason}); quote a value with special "
            "characters: key='value'"
        )
    text = "\n".join(str(e) for e in (exc, exc.__cause__) if e is not None)
    found = _NOT_FOUND.search(text)
    if found:
        group, option = found["group"], found["option"]
        options = re.findall(r"^\t(\S+)$", text, re.M)
        listed = f"; choose one of: {', '.join(options)}" if options else ""
        return f"{group}={option} is not an option of the {group} group{listed}"
    full = _FULL_KEY.search(text)
    key = full["full"] if full else ""
    where = _IN_CONFIG.search(str(exc))
    missing = _NOT_IN.search(text)
    if missing and key:
        group = key.split(".")[0]
        node = _schema_by_name(missing["type"])
        chosen = getattr(node, "what", missing["type"]) if node else missing["type"]
        others = [w for w in _who_has(group, missing["key"]) if w != chosen]
        has = f"; {' and '.join(others)} has it" if others else ""
        if where and where["where"].split("/")[0] in ("experiment", "hparams_search"):
            preset = where["where"].replace("/", "=", 1)
            return (
                f"{preset} sets {key}, which {chosen} does not have{has}: choose the other "
                f"option, or remove {key} from the preset"
            )
        return f"{key} is not a setting of {chosen}{has}; check the spelling or the group option"
    convert = _CONVERT.search(text)
    if convert and key:
        wanted = _KINDS.get(convert["to"], convert["to"].lower())
        return f"{key}={convert['value']!r} is not {wanted}; give {wanted} there"
    first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
    if key and key not in first:
        first = f"{key}: {first}"
    return f"{first} (`python run.py --cfg job` prints the composed config)"
