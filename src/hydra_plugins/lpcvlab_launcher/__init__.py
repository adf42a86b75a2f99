"""lpcvlab's Hydra plugin: the launcher of sweeps on AI Hub (``hydra/launcher=aihub``).

Hydra instantiates launchers only from the ``hydra_plugins`` namespace, and imports every module
in it when it starts: these modules import nothing heavy at the top.
"""
