"""Pictures of what a model does (placeholder until the drawing module lands)."""

from __future__ import annotations


def graph_pictures(model, images, mean, std) -> dict:
    return {}


def confusion_figure(confusion, class_names):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(confusion.numpy())
    return fig
