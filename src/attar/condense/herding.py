"""``herding``: per class, greedily pick real rows whose running feature mean tracks the class mean."""

from __future__ import annotations

from attar.condense.base import CondenseContext, CondenseOutput, Condenser, register
from attar.condense.selection import SelectionParams, class_features, herding_select


@register("herding")
class Herding(Condenser):
    summary = "herding selection in a ConvNet's feature space"
    Params = SelectionParams

    def run(self, ctx: CondenseContext) -> CondenseOutput:
        feats, valid, table = class_features(ctx, self.p, "herding")
        pos = herding_select(feats, valid, ctx.ipc)
        rows = table.gather(1, pos).flatten()
        return CondenseOutput(ctx.x[rows].clone(), ctx.y[rows].clone(), extra={"rows": rows.tolist()})
