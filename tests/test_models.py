"""TransformerSeq: published model sizes."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import ModelConfig, TransformerSeq  # noqa: E402

CHAR = dict(vocab_size=205, hidden_size=512, nheads=8, attn_span=8192, adapt_span=True,
            adapt_span_cache=True)


@pytest.mark.parametrize("name, overrides, millions", [
    ("enwik8", dict(nlayers=12, inner_hidden_size=2048), 38.54),
    ("enwik8_pers_small", dict(nlayers=18, inner_hidden_size=1, pers_mem_size=1024), 38.50),
    ("enwik8_pers", dict(nlayers=36, inner_hidden_size=1, pers_mem_size=2048), 114.02),
    ("wiki103_pers", dict(vocab_size=267735, nlayers=36, inner_hidden_size=1, pers_mem_size=2048,
                          attn_span=2048, adapt_io=True, adapt_io_tied=True), 132.49),
])
def test_published_parameter_counts(name, overrides, millions):
    """The counts the reference prints (shared tensors once) for the published scripts."""
    with torch.device("meta"):  # shapes only
        model = TransformerSeq(ModelConfig(**{**CHAR, **overrides}))
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == millions, name
