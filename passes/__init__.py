"""Pure torch.fx passes of LoCal+SGD: tracing, layer order, prefix partition, rewrite, inspection.

Each pass takes a ``GraphModule`` and returns a ``GraphModule`` or a small result dataclass; no
training state lives here.
"""
from .errors import LocalSGDError
from .inspection import LAYER_COLUMNS, layer_rows, to_dot
from .layers import Layer, LayerOrder, find_layers
from .partition import Partition, partition
from .rewrite import LocalUpdateSpec, rewrite
from .trace import modes_changed, retrace, trace

__all__ = ["LocalSGDError", "Layer", "LayerOrder", "find_layers", "Partition", "partition", "LocalUpdateSpec",
           "rewrite", "trace", "retrace", "modes_changed", "LAYER_COLUMNS", "layer_rows", "to_dot"]
