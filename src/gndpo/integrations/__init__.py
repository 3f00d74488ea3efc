"""gndpo's exact core inside other trainers. Each module here is imported by the other framework, never by gndpo.

- ``gndpo.integrations.verl``: advantage estimators, a policy loss and a trainer for stock verl 0.9.x, loaded
  by verl itself through the ``verl.plugins`` entry point that ``pip install gndpo`` declares.

The modules import ``gndpo.core`` only (never the loop). docs/INTEGRATIONS.md says what each one reproduces
exactly and where it differs from ``gndpo train``; it also says why TRL has no module here.
"""
