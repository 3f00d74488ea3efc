"""verl configs for GNDPO and the paper's OPD: ``--config-path pkg://gndpo.integrations.verl_configs``."""
