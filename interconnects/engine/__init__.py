"""The engine: training loop, checkpoints, logging, and the train / evaluate entry points."""
