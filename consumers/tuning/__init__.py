"""Tuning service: hyperparameter searches on Optuna whose study is the log.

Imports mlbus/ and schemas/ only; talks to other components through topics."""
