"""A bug injected into one job of a sweep (tests only: ``PYTHONPATH=tests/inject``).

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
