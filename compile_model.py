"""``--compile``: torch.compile of every layer, with a bounded number of graphs.

Each layer is compiled with static shapes (``dynamic=False``). Everything that sets a
shape is a plain int computed outside the compiled code, once per optimizer step: the
span integers cached by ``TransformerSeq.refresh_spans`` and the attention plan (L', the
head groups and their windows, multiples of 64) that the model passes to each layer. A
layer is recompiled only when its plan or its cache length changes, i.e. when a learned
span crosses a 64-position bucket; no host sync happens inside a compiled layer.

Layers of the same shapes share their graphs (parameters are graph inputs), so the
number of graphs is the number of distinct (plan, cache length, batch, block, train/eval)
combinations met, bounded by ``MAX_GRAPHS`` (torch._dynamo's recompile limit is raised to
it; past it a new combination runs eagerly). ``GraphCounter`` counts them and logs one
line per compiled graph.
"""
from typing import Callable, Optional

import torch

from models import TransformerSeq

MAX_GRAPHS = 64


class GraphCounter:
    """A torch.compile backend that counts the graphs it compiles, then hands them on."""

    def __init__(self, backend: str = "inductor", log: Optional[Callable[[str], None]] = None):
        self.backend = backend
        self.log = log
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.graphs += 1
        if self.log is not None:
            self.log(f"torch.compile: {self.graphs} graph(s) compiled so far ({self.backend})")
        from torch._dynamo.backends.registry import lookup_backend
        return lookup_backend(self.backend)(gm, example_inputs)


def compile_layers(model: TransformerSeq, backend: str = "inductor", max_graphs: int = MAX_GRAPHS,
                   log: Optional[Callable[[str], None]] = None) -> GraphCounter:
    """Compile every layer of ``model`` in place (its forward then runs them); returns the
    counter of compiled graphs. ``backend``: inductor, aot_eager or eager."""
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, max_graphs)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, max_graphs)
    counter = GraphCounter(backend, log)
    model.compiled_layers = [torch.compile(layer, backend=counter, dynamic=False)
                             for layer in model.layers]
    return counter
