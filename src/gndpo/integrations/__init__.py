"""gndpo's exact core inside other trainers. Each module here is imported by the other framework, never by gndpo.

- ``gndpo.integrations.verl`` (+ ``verl_trainer``, ``verl_configs``): advantage estimators, a policy loss, a
  trainer and a Hydra config for stock verl 0.9.x, loaded by verl itself through the ``verl.plugins`` entry point
  that ``pip install gndpo`` declares.
- ``gndpo.integrations.trl``: ``GNDPOTrainer``, TRL 1.16's ``GRPOTrainer`` with gndpo.core's advantages.

The modules import ``gndpo.core`` only (never the loop). docs/INTEGRATIONS.md says what each one reproduces
exactly and where it differs from ``gndpo train``.
"""
