"""``dsa``: gradient matching (DC) with Differentiable Siamese Augmentation (Zhao & Bilen, ICML 2021).

The same DC loop, with one DSA transform per class applied identically to that class's real and
synthetic rows before each gradient is taken, and per-sample DSA in the network's inner steps.
"""

from __future__ import annotations

from pydantic import Field

from attar.condense.base import register
from attar.condense.dc import DC, DCParams


@register("dsa")
class DCWithDSA(DC):
    summary = "gradient matching with differentiable siamese augmentation (DSA)"

    class Params(DCParams):
        dsa: bool = Field(True, description="differentiable siamese augmentation")
