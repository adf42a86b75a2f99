"""Every `python run.py ...` command in the README and docs/ composes and passes the config
checks as written (compose only: cheap), or, where the page shows the error it gives, fails
with that error. Commands for the user's own files (a checkpoint under /ckpt, data under /data)
may be refused only in one line naming what is missing."""

from __future__ import annotations

import re
import shlex

import pytest
from conftest import compose_config
from hydra.errors import HydraException
from lpcvlab_runs import REPO

from lpcvlab.config import composition_error, load_settings
from lpcvlab.errors import ConfigError

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PAGES.append(REPO / "experiments" / "README.md")
EXTERNAL_PATH = re.compile(r"=(/(?:data|ckpt|runs|path|shared)\S*|/w\.pt)")


def commands() -> list[tuple[str, str, str | None]]:
    """(page, command, the error the page shows for it or None)."""
    found = set()
    for page in PAGES:
        name = str(page.relative_to(REPO))
        text = page.read_text()
        for block in re.findall(r"```(?:bash)?\n(.*?)```", text, re.S):
            lines = re.sub(r"\\\n\s*", " ", block).splitlines()
            for i, raw in enumerate(lines):
                line = raw.split("  #")[0].split(" # ")[0].strip()
                shown = None
                if line.startswith("$ "):
                    line = line[2:]
                    nxt = lines[i + 1] if i + 1 < len(lines) else ""
                    if nxt.startswith("error: "):
                        shown = nxt[len("error: ") :].split("...")[0].strip()
                if line.startswith("python run.py"):
                    found.add((name, line, shown))
        for inline in re.findall(r"`(python run\.py[^`]*)`", text):
            found.add((name, " ".join(inline.split()), None))
    return sorted(found, key=lambda c: (c[0], c[1]))


def overrides_of(line: str) -> list[str] | None:
    """The overrides of one command, a sweep's first value of each list; None to skip."""
    if "<" in line or "..." in line or "-help" in line or "--cfg" in line:
        return None
    out = []
    for a in shlex.split(line)[2:]:
        if a in ("-m", "--multirun") or a.startswith(("hydra/launcher=", "hydra.")):
            continue  # launcher plugins and Hydra's own settings are not the run's config
        key, _, value = a.partition("=")
        if "," in value and not value.startswith("["):
            value = value.split(",")[0]
        out.append(f"{key}={value}")
    return out


COMMANDS = [c for c in commands() if overrides_of(c[1]) is not None]
# Refusals the pages describe in prose, or that come after the data is read (not at compose).
DESCRIBED_REFUSALS = {
    "python run.py -m seed=0,1 hub.warmup_iterations=-1": "hub.warmup_iterations=-1 must be >= 0",
    "python run.py precision=w8a8 precision.calibration_samples=64": None,  # 40 demo images
    "python run.py -m seed=-1,0": "seed=-1 must be >= 0",  # the job with seed=-1 fails alone
}


def test_the_docs_have_commands_to_check():
    assert len(COMMANDS) >= 40


@pytest.mark.parametrize(("page", "line", "shown"), COMMANDS)
def test_documented_command_composes_and_checks(page, line, shown):
    message = None
    try:
        load_settings(compose_config(*overrides_of(line)))
    except ConfigError as exc:
        message = str(exc)
    except HydraException as exc:
        message = composition_error(exc) or str(exc)
    if line in DESCRIBED_REFUSALS:
        assert message == DESCRIBED_REFUSALS[line], message
        return
    if shown is not None:
        assert message is not None and message.startswith(shown), (page, line, message)
        return
    if message is None:
        return
    assert "\n" not in message, message
    external = [p for p in EXTERNAL_PATH.findall(line) if p in message]
    needs_data = "needs data.root=" in message and "data.root" not in line
    assert external or needs_data, f"{page}: `{line}` -> {message}"
