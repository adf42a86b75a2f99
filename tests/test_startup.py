"""A command starts in about a second: nothing heavy is imported before the config is checked
(``benchmarks/bench_startup.py`` measures the CPU), and ``--help`` costs one composition."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
from conftest import CONF
from lpcvlab_runs import REPO
from omegaconf import OmegaConf

from lpcvlab.app import check_before_hydra_runs, help_text
from lpcvlab.errors import ConfigError

HEAVY = (
    "mlflow",
    "pandas",
    "torch",
    "open_clip",
    "onnx",
    "onnxruntime",
    "numpy",
    "pytorch_lightning",
    "sklearn",
    "matplotlib",
    "qai_hub",
    "av",
)
# Runs a command as its console script or `python run.py` would, then lists the heavy modules
# it imported (stderr's last line).
PROBE = """
import atexit, runpy, sys
heavy = {heavy!r}
atexit.register(lambda: print("imported:", sorted(
    m for m in sys.modules if m.split(".")[0] in heavy), file=sys.stderr))
sys.argv = {argv!r}
{run}
"""
RUN_PY = "runpy.run_path(sys.argv[0], run_name='__main__')"
CLI = "from lpcvlab.cli import main; sys.exit(main())"


@pytest.mark.parametrize(
    ("argv", "code", "expect"),
    [
        (["seed=-1"], 1, "error: seed=-1 must be >= 0"),
        (["--help"], 0, "Groups you choose"),
        (["--cfg", "job"], 0, "seed: 0"),
        (["-m", "seed=0,1", "sweep.fail_on=some"], 1, "sweep.fail_on"),
    ],
)
def test_run_py_checks_the_config_before_importing_anything_heavy(tmp_path, argv, code, expect):
    probe = PROBE.format(heavy=HEAVY, argv=[str(REPO / "run.py"), *argv], run=RUN_PY)
    proc = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == code, proc.stderr[-3000:]
    assert expect in proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "imported: []"
    if argv[0] != "-m":  # a refused single run leaves no output folder behind
        assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["hub.foo=1"],  # composition: not a key
        ["backbone=nope"],  # composition: not an option
        ["+foo=1"],  # a key the schema does not have
        ["track=retrieval", "preprocess=dynamic_fps"],  # groups that cannot go together
    ],
)
def test_a_refused_config_is_one_line_and_leaves_no_output_folder(tmp_path, argv):
    """Checked before Hydra's run makes the output folder (app.check_before_hydra_runs)."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "run.py"), *argv],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: ") and argv[-1].split("=")[0].lstrip("+") in line
    assert not list(tmp_path.iterdir())  # no outputs/, no log


@pytest.mark.parametrize(
    "argv",
    [
        ["-m", "seed=-1"],  # a sweep: its callback checks the base config
        ["hparams_search=retrieval_optuna", "seed=-1"],  # a sweep without -m (hydra.mode)
        ["--cfg", "job", "seed=-1"],  # another command
        ["-cn", "other", "seed=-1"],  # another config
        ["--no-such-flag"],  # Hydra's parser says what is wrong, once, from main()
        ["paths.cache_dir=${hydra:runtime.output_dir}/cache"],  # known once Hydra runs the job
    ],
)
def test_what_the_early_check_leaves_to_hydra(argv, capsys):
    check_before_hydra_runs(CONF, "config", argv)
    assert capsys.readouterr() == ("", "")


def test_the_early_check_refuses_a_single_runs_mistake():
    with pytest.raises(ConfigError, match="seed=-1 must be >= 0"):
        check_before_hydra_runs(CONF, "config", ["seed=-1"])
    check_before_hydra_runs(CONF, "config", ["backbone=clip_tiny", "seed=3"])  # fine: no error


@pytest.mark.parametrize("argv", [["--help"], ["compare", "--help"], ["qevd", "organise", "-h"]])
def test_lpcvlab_help_imports_nothing_heavy(tmp_path, argv):
    probe = PROBE.format(heavy=HEAVY, argv=["lpcvlab", *argv], run=CLI)
    proc = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("usage: lpcvlab")
    assert proc.stderr.strip().splitlines()[-1] == "imported: []"


def test_a_verbs_help_is_its_library_modules_docstring(capsys):
    from lpcvlab import cli
    from lpcvlab.tracking import compare

    with pytest.raises(SystemExit):
        cli.main(["compare", "--help"])
    assert compare.__doc__.strip().splitlines()[0] in capsys.readouterr().out


class _Hydra:
    """What Hydra's ``get_help`` calls on its Hydra object, counting the group listings."""

    def __init__(self) -> None:
        self.listings = 0

    def format_config_groups(self, predicate, compact: bool = True) -> str:
        self.listings += 1
        groups = ["backbone", "hydra/launcher", "track"]
        return "".join(f"{g}: a, b\n" for g in groups if predicate(g))

    @staticmethod
    def format_args_help(args_parser) -> str:
        return "--help,-h : Application's help\n"


def _hydras_own_get_help():
    """Hydra 1.3's ``Hydra.get_help``, from a fresh copy of its module (run.py replaces the
    method in the process that runs it)."""
    spec = importlib.util.find_spec("hydra._internal.hydra")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Hydra.get_help


@pytest.mark.parametrize(
    "template",
    [
        "lpcvlab: header\n$CONFIG\nfooter",  # lpcvlab's kind: no group listing
        "== Flags ==\n$FLAGS_HELP\n== Groups ==\n$APP_CONFIG_GROUPS\n$HYDRA_CONFIG_GROUPS\n$CONFIG",
    ],
)
def test_help_lists_the_groups_only_when_its_template_prints_them(template):
    help_cfg = OmegaConf.create({"template": template})
    cfg = OmegaConf.create({"seed": 0, "track": {"name": "retrieval"}})
    ours, theirs = _Hydra(), _Hydra()
    text = help_text(ours, help_cfg, cfg, None, False)
    assert text == _hydras_own_get_help()(theirs, help_cfg, cfg, None, False)
    assert theirs.listings == 2  # Hydra lists the groups twice, whatever the template says
    assert ours.listings == template.count("CONFIG_GROUPS")
