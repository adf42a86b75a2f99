"""What tests inject into the processes they start (``PYTHONPATH=tests/inject``).

A bug injected into one job of a sweep:

``LPCVLAB_TEST_BUG_IN_JOB=N`` makes job N's local profiling raise a plain RuntimeError -- not a
user error, so Hydra's sweeper re-raises it after the batch, as it would a real bug. Every config
value that used to crash this way is now refused when the config is loaded, so the bug has to
come from outside.
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

# ``LPCVLAB_TEST_FAKE_AIHUB=<socket>``: this process talks to the fake AI Hub a test serves
# there (tests/aihub_fake.py's FakeServer) instead of the network: every process of a sweep,
# or two processes racing for the same job, see one service.
_FAKE = os.environ.get("LPCVLAB_TEST_FAKE_AIHUB")

if _FAKE:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import aihub_fake

    aihub_fake.connect(_FAKE)
