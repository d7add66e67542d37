"""Loggers: TensorBoard, or none. Both have the same methods: ``scalars``, ``images``, ``image``,
``figure``, ``text``, ``graph``, ``hparams`` and ``close``."""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor, nn

log = logging.getLogger(__name__)


def png_summary(tag: str, image: Tensor):
    """A TensorBoard image summary of ``image [C, H, W]`` in ``[0, 1]`` (C = 1 or 3): PNG-encoded with
    fast compression and no resampling (``SummaryWriter.add_image`` passes every picture through a
    Lanczos resize and the default compression, which cost several times the drawing)."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    pixels = image.detach().cpu()
    if pixels.dtype != torch.uint8:
        pixels = pixels.float().mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)  # round half up, one pass each
    channels, height, width = pixels.shape
    array = pixels[0].numpy() if channels == 1 else pixels.permute(1, 2, 0).contiguous().numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    encoded = Summary.Image(height=height, width=width, colorspace=channels, encoded_image_string=buffer.getvalue())
    return Summary(value=[Summary.Value(tag=tag, image=encoded)])


class NullLogger:
    """Logs nothing (``logger=none``, fast dev runs)."""

    log_dir = None

    def scalars(self, values: dict[str, float], step: int) -> None:
        pass

    def images(self, tag: str, images: Tensor, step: int) -> None:
        pass

    def image(self, tag: str, image: Tensor, step: int) -> None:
        pass

    def figure(self, tag: str, figure, step: int) -> None:
        pass

    def text(self, tag: str, text: str, step: int) -> None:
        pass

    def graph(self, model: nn.Module, example_input) -> None:
        pass

    def hparams(self, params: dict, metrics: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardLogger(NullLogger):
    """Writes TensorBoard event files into ``log_dir``.

    ``purge_step``: when resuming, events at or after this step (written after the checkpoint the run
    resumes from) are discarded, so curves do not double back.
    """

    def __init__(self, log_dir: str | Path, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(str(self.log_dir), purge_step=purge_step)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, float(value), step)

    def images(self, tag: str, images: Tensor, step: int) -> None:
        """A batch of raw (normalised) images ``[N, C, H, W]``, each rescaled to its own range and tiled."""
        from torchvision.utils import make_grid

        grid = make_grid(images.detach().float().cpu(), nrow=8, normalize=True, scale_each=True)
        self.image(tag, grid, step)

    def image(self, tag: str, image: Tensor, step: int) -> None:
        """One finished picture ``[C, H, W]`` with values in ``[0, 1]`` (C = 1 or 3), kept as it is;
        a batch ``[N, C, H, W]`` is tiled first."""
        from torchvision.utils import make_grid

        if image.dim() == 4:
            image = make_grid(image.detach().float().cpu().clamp(0, 1), nrow=8)
        # (the file writer's own add_summary: what add_image calls, after its slower encoding)
        self.writer._get_file_writer().add_summary(png_summary(tag, image), step)

    def figure(self, tag: str, figure, step: int) -> None:
        """A matplotlib figure, rendered to a picture (and closed)."""
        self.writer.add_figure(tag, figure, step, close=True)

    def text(self, tag: str, text: str, step: int) -> None:
        """Text (markdown) shown in TensorBoard's text tab."""
        self.writer.add_text(tag, text, step)

    def graph(self, model: nn.Module, example_input) -> None:
        """The model's graph for TensorBoard's graph tab, traced on ``example_input`` (a tensor or a
        tuple of tensors) in eval mode without gradient, so that tracing changes no running
        statistics. Best effort: a model the tracer cannot follow only logs a warning."""
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # tracer and deprecation warnings say nothing to our users
                self.writer.add_graph(model, example_input)
        except Exception as exc:  # noqa: BLE001 - any tracing failure is only a missing picture
            message = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            log.warning("the model's graph was not logged to TensorBoard (%s: %s)", type(exc).__name__, message)
        finally:
            model.train(was_training)

    def hparams(self, params: dict, metrics: dict[str, float]) -> None:
        clean = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in params.items()}
        self.writer.add_hparams(clean, {f"hparam/{k}": v for k, v in metrics.items()}, run_name=".")

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


def build_logger(name: str, log_dir: str | Path, purge_step: int | None = None) -> NullLogger:
    if name == "tensorboard":
        return TensorBoardLogger(log_dir, purge_step)
    if name == "none":
        return NullLogger()
    raise ValueError(f"logger={name!r} is not supported; choose 'tensorboard' or 'none'")
