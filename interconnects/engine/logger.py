"""Loggers: TensorBoard, or none. Both have the same four methods."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor


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
        from torchvision.utils import make_grid

        grid = make_grid(images.detach().float().cpu(), nrow=8, normalize=True, scale_each=True)
        self.writer.add_image(tag, grid, step)

    def image(self, tag: str, image: Tensor, step: int) -> None:
        """One picture ``[C, H, W]`` (or a batch ``[N, C, H, W]``, tiled) with values in [0, 1]."""
        from torchvision.utils import make_grid

        image = image.detach().float().cpu().clamp(0, 1)
        self.writer.add_image(tag, make_grid(image, nrow=8) if image.dim() == 4 else image, step)

    def figure(self, tag: str, figure, step: int) -> None:
        self.writer.add_figure(tag, figure, step, close=True)

    def text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, text, step)

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
