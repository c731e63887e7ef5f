"""The ComfyUI layer: V3 nodes that wire residual_core into ModelPatcher patches."""

from comfy_api.latest import ComfyExtension, io
from typing_extensions import override

from .files import LoadResidual, SaveResidual
from .lag import LagMaskPreview, LagSampler
from .lora import LagLora
from .train import TrainPersonalizedResidual

NODES = [TrainPersonalizedResidual, SaveResidual, LoadResidual, LagSampler, LagLora, LagMaskPreview]


class PersonalizedResidualsExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES
