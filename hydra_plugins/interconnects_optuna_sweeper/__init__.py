"""A Hydra sweeper that runs an Optuna study (ask-and-tell) through Hydra's configured launcher."""
