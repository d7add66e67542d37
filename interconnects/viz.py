"""Pictures of what a hybrid model does: pure functions of tensors and modules.

Drawing is torchvision's (``draw_keypoints`` with ``connectivity`` for edges, ``make_grid``) and
matplotlib's (colour maps, figures); this module only decides what to draw where.

Pixel convention. A feature map ``h × w`` made from an ``H × W`` image has strides
``s_h = H / h`` and ``s_w = W / w``; cell ``(r, c)`` covers the pixel block
``[r·s_h, (r + 1)·s_h) × [c·s_w, (c + 1)·s_w)`` (the block ``Keypoints(select="given")`` maps a pixel
back from: ``cell = row·h // H``) and is drawn at the block's centre, in pixel-index coordinates
(pixel ``i`` is centred on ``i``)::

    (row, col) = ((r + 0.5)·s_h − 0.5, (c + 0.5)·s_w − 0.5)

Images are upscaled by an integer factor ``u`` (nearest neighbour) before drawing, so that dots and
lines are visible on 28 × 28 digits; pixel ``p`` of the input is centred on ``(p + 0.5)·u − 0.5`` of
the picture, which is the same formula with the stride ``s·u``.
"""

from __future__ import annotations

import math
from typing import Sequence

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure
from sklearn.metrics import ConfusionMatrixDisplay
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.utils import draw_keypoints, make_grid

#: Node colours, one per drawn neighbourhood (matplotlib's ``tab10``), as RGB byte tuples.
PALETTE = [tuple(int(round(255 * v)) for v in rgb) for rgb in matplotlib.colormaps["tab10"].colors]
KEYPOINT_COLOR = (255, 64, 64)
#: Pictures are upscaled (nearest) to at least this many pixels a side: large enough to see a 28×28
#: digit's keypoints and edges, small enough that drawing and encoding them stays a few percent of
#: an epoch (224 cost 7% of an epoch on the MNIST sample, 168 about 4%: docs/benchmarks.md).
PICTURE_SIZE = 168


def denormalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Undo the dataset normalisation: ``images [B, C, H, W]`` → ``[B, C, H, W]`` in ``[0, 1]``."""
    mean = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    return (images.float() * std + mean).clamp(0.0, 1.0)


def cell_to_pixel(pos: Tensor, fmap_size: tuple[int, int], image_size: tuple[int, int]) -> Tensor:
    """Feature-map cells ``pos [..., 2]`` (row, col) → pixel centres ``[..., 2]`` (row, col) of an
    image of ``image_size`` (the module's pixel convention: ``(r + 0.5)·stride − 0.5``)."""
    stride = torch.tensor([image_size[0] / fmap_size[0], image_size[1] / fmap_size[1]],
                          dtype=torch.float32, device=pos.device)
    return (pos.float() + 0.5) * stride - 0.5


def upscale_factor(image_size: tuple[int, int], min_size: int) -> int:
    """The integer factor that makes the longer side of ``image_size`` at least ``min_size``."""
    return max(1, math.ceil(min_size / max(image_size)))


def to_canvas(images: Tensor, factor: int) -> Tensor:
    """``images [B, C, H, W]`` in ``[0, 1]`` (C = 1 or 3) → ``[B, 3, H·factor, W·factor]`` uint8,
    grey repeated to RGB and upscaled by nearest neighbour: what ``draw_keypoints`` draws on."""
    images = images.float()
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    elif images.shape[1] != 3:
        images = images[:, :1].expand(-1, 3, -1, -1)  # only the first channel can be shown as grey
    if factor > 1:
        images = F.interpolate(images, scale_factor=factor, mode="nearest")
    return (images * 255).round().clamp(0, 255).to(torch.uint8)


def colorize(values: Tensor, cmap: str = "magma", low: float | None = None, high: float | None = None) -> Tensor:
    """A heat map: ``values [B, h, w]`` → ``[B, 3, h, w]`` float in ``[0, 1]``, each map scaled
    to its own minimum and maximum (or every map to ``low … high``, the range a colour bar then
    shows), coloured with the matplotlib colour map ``cmap``."""
    values = values.detach().float()
    low = values.amin(dim=(1, 2), keepdim=True) if low is None else torch.tensor(float(low))
    high = values.amax(dim=(1, 2), keepdim=True) if high is None else torch.tensor(float(high))
    scaled = (values - low) / (high - low).clamp_min(1e-12)
    lut = torch.tensor(matplotlib.colormaps[cmap](torch.linspace(0, 1, 256).numpy())[:, :3],
                       dtype=torch.float32, device=values.device)
    return lut[(scaled * 255).round().long()].permute(0, 3, 1, 2)


def _wrap(text: str, font, width: float) -> list[str]:
    """``text`` broken into lines no wider than ``width`` pixels in ``font``."""
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def annotate(picture: Tensor, title: str, *, colorbar: tuple[float, float, str] | None = None,
             legend: Sequence[tuple[tuple[int, int, int], str]] = (), font_size: int = 11) -> Tensor:
    """A picture that explains itself: ``picture [3, H, W]`` float in ``[0, 1]`` → ``[3, H', W']``
    with ``title`` above it (wrapped to its width), a colour bar to its right (``(low, high, cmap)``:
    the values the colours of ``cmap`` stand for, high at the top) and the ``legend`` entries
    (``(RGB colour, label)``: a dot of the colour, then the label) below it. Drawn with PIL's own
    font, so the same picture reaches TensorBoard and the PNG files made from it."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=font_size)  # (Latin letters and digits only: no × or …)
    pixels = (picture.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    h, w = pixels.shape[:2]
    line, pad = font_size + 4, 4
    bar_labels = [f"{colorbar[1]:.3g}", f"{colorbar[0]:.3g}"] if colorbar else []
    bar_width = (pad + 10 + pad + int(max(font.getlength(t) for t in bar_labels)) + pad) if colorbar else 0
    width = w + bar_width
    title_lines = _wrap(title, font, width - 2 * pad)
    rows: list[list[tuple[tuple[int, int, int], str]]] = []  # the legend entries, row by row
    x = pad
    for color, label in legend:
        entry = 12 + font.getlength(label) + 10
        if not rows or x + entry > width - pad:
            rows.append([])
            x = pad
        rows[-1].append((color, label))
        x += entry
    top = pad + line * len(title_lines)
    canvas = Image.new("RGB", (width, top + h + (pad + line * len(rows) if rows else 0)), "white")
    canvas.paste(Image.fromarray(np.ascontiguousarray(pixels)), (0, top))
    draw = ImageDraw.Draw(canvas)
    for i, text in enumerate(title_lines):
        draw.text((pad, pad // 2 + i * line), text, fill="black", font=font)
    if colorbar:
        low, high, cmap = colorbar
        lut = matplotlib.colormaps[cmap](np.linspace(1.0, 0.0, h))[:, :3]  # top row: the highest value
        bar = np.repeat((lut * 255).round().astype(np.uint8)[:, None, :], 10, axis=1)
        canvas.paste(Image.fromarray(np.ascontiguousarray(bar)), (w + pad, top))
        draw.rectangle([w + pad, top, w + pad + 9, top + h - 1], outline="black")
        draw.text((w + 2 * pad + 10, top), bar_labels[0], fill="black", font=font)
        draw.text((w + 2 * pad + 10, top + h - line), bar_labels[1], fill="black", font=font)
    y = top + h + pad // 2
    for row in rows:
        x = pad
        for color, label in row:
            draw.ellipse([x, y + 3, x + 8, y + 11], fill=tuple(color), outline="black")
            draw.text((x + 12, y), label, fill="black", font=font)
            x += 12 + font.getlength(label) + 10
        y += line
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1).float() / 255


def image_rows(*rows: Tensor, padding: int = 2) -> Tensor:
    """One picture with each of ``rows`` (``[N, C, H, W]`` in ``[0, 1]``, the same shape) as a row:
    inputs above their reconstructions, for example. Returns ``[C', H', W']`` in ``[0, 1]``."""
    if not rows:
        raise ValueError("image_rows needs at least one row of images")
    shapes = {tuple(r.shape) for r in rows}
    if len(shapes) != 1 or rows[0].dim() != 4:
        raise ValueError(f"image_rows needs rows of the same shape [N, C, H, W], got {sorted(shapes)}")
    stacked = torch.cat([r.detach().float().cpu().clamp(0, 1) for r in rows])
    return make_grid(stacked, nrow=rows[0].shape[0], padding=padding, pad_value=1.0)


def spread_nodes(pos: Tensor, activity: Tensor, size: tuple[int, int], count: int) -> tuple[Tensor, Tensor]:
    """Pick up to ``count`` nodes per graph spread over the map: the map is cut into a ``g × g``
    lattice of regions (``g = ceil(sqrt(count))``) and each region gives its most active node.

    Args:
        pos: node cells ``[B, N, 2]`` (row, col).
        activity: ``[B, N]``, higher is picked first.
        size: the feature map's ``(h, w)``.

    Returns ``(nodes [B, g²] long, found [B, g²] bool)``: ``found`` is false for regions without nodes.
    """
    b, n = activity.shape
    g = max(1, math.ceil(math.sqrt(count)))
    h, w = size
    rows = (pos[..., 0].long() * g // h).clamp(0, g - 1)
    cols = (pos[..., 1].long() * g // w).clamp(0, g - 1)
    region = rows * g + cols  # [B, N]
    order = activity.argsort(dim=1, descending=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=order.device).expand(b, n))
    # the best (lowest) rank in each region; n marks a region without nodes
    best = torch.full((b, g * g), n, dtype=torch.long, device=order.device)
    best = best.scatter_reduce(1, region, rank, reduce="amin")
    found = best < n
    return order.gather(1, best.clamp(max=n - 1)), found


def strongest_neighbours(adj: Tensor, nodes: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """The ``count`` in-neighbours with the strongest edges (largest ``|weight|``) of each of ``nodes``.

    Args:
        adj: dense adjacency ``[B, N, N]`` (``adj[b, i, j]`` the edge ``j → i``).
        nodes: ``[B, G]`` node ids.

    Returns ``(neighbours [B, G, m], present [B, G, m] bool)`` with ``m = min(count, N - 1)``;
    ``present`` is false where a node has fewer than ``m`` neighbours besides itself.
    """
    b, n, _ = adj.shape
    strength = adj.gather(1, nodes.unsqueeze(-1).expand(-1, -1, n)).abs()  # [B, G, N]
    strength = strength.scatter(2, nodes.unsqueeze(-1), 0.0)  # a self-loop is not a neighbour
    top = strength.topk(max(1, min(count, n - 1)), dim=2)
    return top.indices, top.values > 0


def _xy(pixels: Tensor) -> Tensor:
    """(row, col) → the (x, y) order ``draw_keypoints`` takes, rounded to the nearest pixel
    (``draw_keypoints`` would truncate)."""
    return pixels.flip(-1).round()


def _tile(pictures: Tensor | list[Tensor], nrow: int) -> Tensor:
    """uint8 ``[N, 3, H, W]`` → one float picture ``[3, H', W']`` in ``[0, 1]``."""
    if isinstance(pictures, list):
        pictures = torch.stack(pictures)
    return make_grid(pictures.float() / 255, nrow=nrow, padding=2, pad_value=1.0)


@torch.no_grad()
def graph_pictures(
    model: nn.Module,
    images: Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    num_nodes: int = 4,
    num_neighbours: int = 8,
    min_size: int = PICTURE_SIZE,
    explain: bool = True,
) -> dict[str, Tensor]:
    """What the interconnect of a :class:`~interconnects.models.hybrid.HybridModel` makes of ``images``.

    Args:
        model: a HybridModel (``backbone``, ``interconnect``, ``graph(image)``); run in eval mode
            here and put back in the mode it was in.
        images: a few normalised input images ``[B, C, H, W]`` on the model's device.
        mean, std: the dataset normalisation, to show the images as they are.
        num_nodes: how many nodes' neighbourhoods ``graph/edges`` draws per image (spread over the
            image: the most active node of each region, see :func:`spread_nodes`).
        num_neighbours: how many of each such node's strongest in-edges are drawn.
        min_size: the pictures are upscaled (nearest) by an integer factor to at least this many pixels.
        explain: give each picture its title, and colour bar or legend (:func:`annotate`); without,
            the bare drawings (the geometry above holds for them).

    Returns ``{tag: picture [3, H', W'] float in [0, 1]}``, one picture per tag with one tile per image:

    - ``graph/keypoints``: the graph's nodes at the pixel centres of their cells (keypoints mode: the
      K chosen cells; grid and kNN: every cell);
    - ``graph/scores`` (keypoints chosen by a learned score): per image, the keypoints beside the
      score map as a heat map with the same keypoints on it;
    - ``graph/edges``: for a few nodes, lines to their strongest in-neighbours, one colour per node
      (kNN: the nearest cells in feature space, wherever they lie in the image);
    - ``graph/adjacency``: the first image's adjacency matrix ``[N, N]`` as a heat map (row ``i``:
      the edges into node ``i``).

    ``{}`` when the model has no interconnect (the CNN baseline).
    """
    explained = annotate if explain else (lambda picture, *args, **kwargs: picture)
    interconnect = getattr(model, "interconnect", None)
    if interconnect is None:
        return {}
    was_training = model.training
    model.eval()
    try:
        fmap, graph = model.graph(images)
        scores = interconnect.score_map(fmap) if hasattr(interconnect, "score_map") else None
    finally:
        model.train(was_training)

    b, _, height, width = images.shape
    factor = upscale_factor((height, width), min_size)
    canvas = to_canvas(denormalize(images, mean, std).cpu(), factor)  # [B, 3, H·u, W·u]
    big = (height * factor, width * factor)
    pixels = cell_to_pixel(graph.pos.cpu(), graph.size, big)  # [B, N, 2] node centres on the canvas
    stride = min(big[0] / graph.size[0], big[1] / graph.size[1])
    radius = max(2, round(stride / 6))
    xy = _xy(pixels)

    pictures: dict[str, Tensor] = {}
    marked = [draw_keypoints(canvas[i], xy[i : i + 1], colors=KEYPOINT_COLOR, radius=radius) for i in range(b)]
    pictures["graph/keypoints"] = explained(_tile(marked, nrow=b), f"graph nodes (red): {graph.num_nodes} per image, "
                                            "each at the centre of its feature-map cell")
    regions = getattr(graph, "regions", None)
    if regions is not None:  # region graphs (superpixels): the regions' boundaries over the input
        pictures["graph/regions"] = _tile(region_boundaries(canvas, regions.cpu()), nrow=b)

    if scores is not None:
        low, high = float(scores.min()), float(scores.max())  # one scale for every image: one colour bar
        heat = colorize(scores[:, 0].cpu(), low=low, high=high)  # [B, 3, h, w]
        heat = to_canvas(F.interpolate(heat, size=big, mode="nearest"), 1)
        pairs = []
        for i in range(b):
            pairs += [marked[i], draw_keypoints(heat[i], xy[i : i + 1], colors=(255, 255, 255), radius=radius)]
        pictures["graph/scores"] = explained(
            _tile(pairs, nrow=2), "keypoint scores: per image, the chosen keypoints (left) and the score map they "
            "are the top cells of (right, chosen cells in white)", colorbar=(low, high, "magma"))

    adj = graph.dense_adj().detach().float().cpu()  # [B|1, N, N]
    adj = adj.expand(b, -1, -1)
    n = graph.num_nodes
    activity = fmap.detach().float().norm(dim=1).flatten(1).cpu()  # [B, h·w] how strongly each cell fires
    activity = activity.gather(1, graph.cell_index().cpu().clamp(0, activity.shape[1] - 1))  # [B, N]
    centres, found = spread_nodes(graph.pos.cpu(), activity, graph.size, num_nodes)  # [B, G]
    neighbours, present = strongest_neighbours(adj, centres, num_neighbours)  # [B, G, m]
    groups = torch.cat([centres.unsqueeze(-1), neighbours], dim=2)  # [B, G, 1 + m]: centre first
    visible = torch.cat([found.unsqueeze(-1), present & found.unsqueeze(-1)], dim=2)
    points = xy.gather(1, groups.flatten(1).unsqueeze(-1).expand(-1, -1, 2)).view(*groups.shape, 2)
    spokes = [(0, j) for j in range(1, groups.shape[2])]
    width_px = max(1, round(stride / 12))
    drawn = []
    for i in range(b):  # a few images, a few neighbourhoods each: one draw call per neighbourhood
        picture = canvas[i]
        for g in range(groups.shape[1]):
            if not bool(found[i, g]):
                continue
            color = PALETTE[g % len(PALETTE)]
            picture = draw_keypoints(picture, points[i, g : g + 1], connectivity=spokes, colors=color,
                                     radius=max(1, radius - 1), width=width_px, visibility=visible[i, g : g + 1])
            picture = draw_keypoints(picture, points[i, g : g + 1, :1], colors=color, radius=radius + 1)
        drawn.append(picture)
    legend = [(PALETTE[g % len(PALETTE)], f"node of region {g + 1}") for g in range(groups.shape[1])]
    pictures["graph/edges"] = explained(
        _tile(drawn, nrow=b), f"edges: per image, the most active node of each of {groups.shape[1]} regions "
        f"(numbered row by row; large dot) and lines to its {groups.shape[2] - 1} strongest in-neighbours",
        legend=legend)

    low, high = float(adj[0].min()), float(adj[0].max())
    matrix = colorize(adj[:1], cmap="viridis")  # [1, 3, N, N]
    matrix = F.interpolate(matrix, scale_factor=upscale_factor((n, n), min_size), mode="nearest")
    pictures["graph/adjacency"] = explained(
        matrix[0].clamp(0, 1), f"adjacency of the first image, {n} x {n}: row i (top to bottom, 0 to {n - 1}) holds the "
        f"edge weights into node i, column j (left to right) those from node j", colorbar=(low, high, "viridis"))
    return pictures


def region_boundaries(canvas: Tensor, regions: Tensor, color: tuple[int, int, int] = KEYPOINT_COLOR) -> Tensor:
    """Region boundaries drawn over the input: ``canvas [B, 3, H·u, W·u]`` uint8 (:func:`to_canvas`)
    and ``regions [B, H, W]`` (the region of each input pixel) → ``[B, 3, H·u, W·u]`` uint8, every
    picture pixel whose right or lower neighbour lies in another region painted ``color``."""
    factor = canvas.shape[-1] // regions.shape[-1]
    big = regions.repeat_interleave(factor, 1).repeat_interleave(factor, 2)  # [B, H·u, W·u]
    edge = torch.zeros(big.shape, dtype=torch.bool)
    edge[:, :, :-1] |= big[:, :, 1:] != big[:, :, :-1]
    edge[:, :-1, :] |= big[:, 1:, :] != big[:, :-1, :]
    paint = torch.tensor(color, dtype=torch.uint8).view(1, 3, 1, 1)
    return torch.where(edge.unsqueeze(1), paint, canvas)


def confusion_figure(confusion: Tensor, class_names: Sequence[str] | None = None) -> Figure:
    """The confusion matrix ``confusion [C, C]`` (row: true class, column: predicted class; counts)
    as a matplotlib figure, drawn by scikit-learn's ``ConfusionMatrixDisplay``; the title gives the
    accuracy. ``class_names``: ``C`` labels (default ``0 … C-1``)."""
    confusion = torch.as_tensor(confusion).detach().cpu()
    if confusion.dim() != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(f"confusion must be a square [C, C] matrix, got shape {tuple(confusion.shape)}")
    classes = confusion.shape[0]
    names = [str(i) for i in range(classes)] if class_names is None else [str(c) for c in class_names]
    if len(names) != classes:
        raise ValueError(f"class_names has {len(names)} names for a {classes}×{classes} confusion matrix")
    counts = confusion.round().long() if confusion.is_floating_point() else confusion.long()
    side = min(24.0, max(4.5, 0.45 * classes + 2.5))
    fig = Figure(figsize=(side + 1.0, side), layout="constrained")
    ax = fig.subplots()
    display = ConfusionMatrixDisplay(counts.numpy(), display_labels=names)
    display.plot(ax=ax, include_values=classes <= 20, cmap="Blues", colorbar=True, values_format="d",
                 xticks_rotation="vertical" if classes > 10 else "horizontal")
    total = int(counts.sum())
    accuracy = float(counts.diagonal().sum()) / max(1, total)
    ax.set_title(f"confusion on {total:,} images (accuracy {accuracy:.2%})")
    return fig


def report_written(paths: Sequence, folder, notes: Sequence[str] = ()) -> int:
    """What the plotting scripts print when they are done: their notes, each file written, then
    ``N plots written to FOLDER``; returns the exit status 0."""
    for line in [*notes, *map(str, paths)]:
        print(line)
    print(f"{len(paths)} plots written to {folder}")
    return 0
