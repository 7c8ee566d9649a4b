"""``hematovision`` as torchrun starts it in tests/train/test_distributed.py, plus test hooks.

- ``ddp_tiny_cnn``: tiny_cnn without batch norm. Under gloo each rank normalises over its own
  slice of the batch (torch has no CPU SyncBatchNorm), so only a network without batch norm can
  equal one process exactly; the registration also runs when the test imports this module.
- ``HEMATOVISION_TEST_SIGINT=RANK:STEP``: that rank sends itself SIGINT (a Ctrl-C reaching one
  process only) after its STEP-th optimizer step.
- ``HEMATOVISION_TEST_COUNT_FEATURES=1``: every rank reports on stderr how many images it passed
  through the frozen backbone (``rank N extracted K``), to show that the ranks shared the work.
- Ranks other than 0 report on stderr (``rank N wrote: ...``) every file or folder they create,
  write, rename or delete under the working directory (Python audit events, which also see
  safetensors' files through the atomic rename that puts them in place).
"""

from __future__ import annotations

import os
import signal
import sys

from torch import Tensor, nn

from hematovision.cli import main
from hematovision.models.registry import register_model
from hematovision.train import finetune as finetune_module


class NoNormCNN(nn.Module):
    def __init__(self, num_classes: int, width: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        logits: Tensor = self.classifier(self.pool(self.features(x)).flatten(1))
        return logits


@register_model(family="test", input_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
def ddp_tiny_cnn(num_classes: int, pretrained: bool = False) -> nn.Module:
    """tiny_cnn without batch norm, for the distributed equivalence test."""
    return NoNormCNN(num_classes)


def _interrupt_one_rank(spec: str) -> None:
    rank, step = map(int, spec.split(":"))
    if int(os.environ.get("RANK", "0")) != rank:
        return
    real_optimizer = finetune_module.make_optimizer
    steps = {"n": 0}

    def interruptible_optimizer(*args, **kwargs):  # type: ignore[no-untyped-def]
        optimizer = real_optimizer(*args, **kwargs)

        def count(*_: object) -> None:
            steps["n"] += 1
            if steps["n"] == step:
                os.kill(os.getpid(), signal.SIGINT)

        optimizer.register_step_post_hook(count)
        return optimizer

    finetune_module.make_optimizer = interruptible_optimizer


def _count_features(rank: int) -> None:
    from hematovision.train.features import FeatureExtractor

    real_extract = FeatureExtractor.extract

    def counted(self, images, progress=False):  # type: ignore[no-untyped-def]
        print(f"rank {rank} extracted {len(images)}", file=sys.stderr)
        return real_extract(self, images, progress)

    FeatureExtractor.extract = counted  # type: ignore[method-assign]


WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND


def _report_writes(rank: int) -> None:
    here = os.getcwd()

    def audit(event: str, args: tuple) -> None:  # type: ignore[type-arg]
        if event == "open":
            path, mode, flags = args
            writes = any(c in str(mode or "") for c in "wax+") or bool(int(flags or 0) & WRITE_FLAGS)
        elif event in ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.unlink"):
            path, writes = args[0], True
        else:
            return
        if writes and isinstance(path, (str, os.PathLike)) and os.path.abspath(path).startswith(here):
            print(f"rank {rank} wrote: {event} {path}", file=sys.stderr)

    sys.addaudithook(audit)


if __name__ == "__main__":
    if int(os.environ.get("RANK", "0")):
        _report_writes(int(os.environ["RANK"]))
    if os.environ.get("HEMATOVISION_TEST_COUNT_FEATURES"):
        _count_features(int(os.environ.get("RANK", "0")))
    if os.environ.get("HEMATOVISION_TEST_SIGINT"):
        _interrupt_one_rank(os.environ["HEMATOVISION_TEST_SIGINT"])
    sys.exit(main(sys.argv[1:]))
