"""avgpool(size=2, stride=size, ceil=false): the mean of each window (a partial window at the
edge with ceil=true averages only the pixels it covers). Shape rule as maxpool."""
from ..layers import register
from .maxpool import Pool


@register("avgpool", aliases=("avg2d", "avgpool2d"))
class AvgPool(Pool):
    pass
