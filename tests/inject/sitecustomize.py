"""Faults injected into a ``python run.py`` (tests only: ``PYTHONPATH=tests/inject``).

``LPCVLAB_TEST_BUG_IN_JOB=N`` makes job N's local profiling raise a plain RuntimeError -- not a
user error, so Hydra's sweeper re-raises it after the batch, as it would a real bug. Every config
value that used to crash this way is now refused when the config is loaded, so the bug has to
come from outside.

``LPCVLAB_TEST_HOLD_EXPORT=FILE`` holds the first ONNX export in the middle: once torch has
written the graph into the export's temporary folder, the folder's path is written to FILE and
the export waits (up to ten minutes) for a signal to stop it, so a test's SIGTERM arrives during
the export stage, whatever the machine's speed.

``LPCVLAB_TEST_FAKE_AIHUB=SOCKET`` makes the process talk to the fake AI Hub a test serves there
(``tests/aihub_fake.py``'s ``FakeServer``) instead of the network: every process of a sweep, or
two processes racing for the same job, see one service.
"""

import os

_JOB = os.environ.get("LPCVLAB_TEST_BUG_IN_JOB")

if _JOB is not None:
    import lpcvlab.hubs.local as _local

    _original = _local.LocalHub.profile

    def _profile(self, compiled):
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.get().job.num == int(_JOB):
            raise RuntimeError(f"injected bug in job {_JOB}: LocalHub.profile failed")
        return _original(self, compiled)

    _local.LocalHub.profile = _profile

_HOLD = os.environ.get("LPCVLAB_TEST_HOLD_EXPORT")

if _HOLD is not None:
    import time
    from pathlib import Path

    import torch.onnx

    _export = torch.onnx.export

    def _held_export(model, args, f, *a, **k):
        result = _export(model, args, f, *a, **k)
        Path(_HOLD).write_text(str(Path(f).parent))
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:  # until the test's signal stops the run
            time.sleep(0.05)
        return result

    torch.onnx.export = _held_export

_FAKE = os.environ.get("LPCVLAB_TEST_FAKE_AIHUB")

if _FAKE:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import aihub_fake

    aihub_fake.connect(_FAKE)
