"""``kcenter``: per class, greedy k-center coverage of the class in a ConvNet's feature space."""

from __future__ import annotations

from attar.condense.base import CondenseContext, CondenseOutput, Condenser, register
from attar.condense.selection import SelectionParams, class_features, kcenter_select


@register("kcenter")
class KCenter(Condenser):
    summary = "k-center greedy selection in a ConvNet's feature space"
    Params = SelectionParams

    def run(self, ctx: CondenseContext) -> CondenseOutput:
        feats, valid, table = class_features(ctx, self.p, "kcenter")
        pos = kcenter_select(feats, valid, ctx.ipc)
        rows = table.gather(1, pos).flatten()
        return CondenseOutput(ctx.x[rows].clone(), ctx.y[rows].clone(), extra={"rows": rows.tolist()})
