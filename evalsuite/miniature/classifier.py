"""The miniature world's supervised attribute classifier: a small CNN with a skin-tone head (4
classes) and an age head (2 classes), trained on renders and their VAE reconstructions."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .world import AGE_NAMES, TONE_NAMES


class AttributeNet(nn.Module):
    """Input: images (n, 3, 32, 32) in [-1, 1]. Output: (tone logits (n, 4), age logits (n, 2))."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
            nn.Conv2d(width, width, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
            nn.Conv2d(width, width, 3, padding=1), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.tone = nn.Linear(width, len(TONE_NAMES))
        self.age = nn.Linear(width, len(AGE_NAMES))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        return self.tone(h), self.age(h)


def save_classifier(net: AttributeNet, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / "model.safetensors"))
    meta = {"architecture": "AttributeNet", "width": net.tone.in_features, "input": "rgb 32x32 in [-1, 1]",
            "heads": {"skin_tone": list(TONE_NAMES), "age": list(AGE_NAMES)}}
    (folder / "config.json").write_text(json.dumps(meta, indent=1))


def load_classifier(folder: Path) -> AttributeNet:
    meta = json.loads((folder / "config.json").read_text())
    net = AttributeNet(width=int(meta["width"]))
    net.load_state_dict(load_file(str(folder / "model.safetensors")))
    return net.eval()
