"""Tasks: what one training step computes and which metrics it reports."""
