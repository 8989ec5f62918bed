"""The TRL glue: `PerceptionGRPOTrainer` (the rails CPPO and PAPO share) and each method's trainer and config, one
`*_trainer.py` / `*_config.py` pair per method as in TRL."""
