"""Deployment precision: fp16, w8a16 and w8a8 per component, and the fidelity gate.

- :mod:`~lpcvlab.deploy.precision.plan` -- what each component is deployed in (built once from the
  ``precision`` settings) and the calibration data it carries;
- :mod:`~lpcvlab.deploy.precision.calibration` -- which of the track's inputs calibrate a quantized
  component, checked and content-hashed;
- :mod:`~lpcvlab.deploy.precision.emulate` -- the same precisions on this machine with ONNX Runtime
  (static QDQ quantization, float16 conversion), for ``hub=local``;
- :mod:`~lpcvlab.deploy.precision.fidelity` -- outputs against the fp32 export's, and the gate.

How a hub deploys a precision is the hub's (``hubs/local.py`` emulates, ``hubs/aihub`` submits a
quantize job or compiles with fp16 options); the pipeline only hands each
:class:`~lpcvlab.hubs.base.ComponentJob` its :class:`ComponentPrecision`.
"""

from lpcvlab.deploy.precision.plan import FP32, Calibration, ComponentPrecision, PrecisionPlan

__all__ = ["FP32", "Calibration", "ComponentPrecision", "PrecisionPlan"]
