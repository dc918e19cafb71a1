"""The cases of scripts/bench.py: head-span profiles, the layer and model steps it times,
their configurations and attention FLOPs per token.

Dimension legend: B batch, M block length, L max span, H hidden, K heads, D head dim,
V vocabulary.
"""
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adaptive_span import AdaptiveSpan  # noqa: E402
from attention import plan_groups  # noqa: E402
from compile_model import compile_layers  # noqa: E402
from models import ATTN_IMPLS, ModelConfig, TransformerSeq  # noqa: E402
from optim import AdagradWithGradClip  # noqa: E402
from measure import training_step  # noqa: E402  (scripts/measure.py)

IMPLS = ("reference", "grouped")
PROFILES = ("learned", "short", "mixed", "max")
RAMP = 32
H200_BF16_PEAK = 989e12  # dense bf16 FLOP/s of an H100/H200 SXM (datasheet)


# ---- spans ---------------------------------------------------------------------
def profile_spans(profile: str, max_span: int, nheads: int) -> list:
    """Head spans (positions with a non-zero mask) of a span profile."""
    if profile == "learned":
        return [34 + (72 - 34) * k // (nheads - 1) for k in range(nheads)]  # 34 .. 72
    if profile == "short":
        return [32 + (512 - 32) * k // (nheads - 1) for k in range(nheads)]  # 32 .. 512
    if profile == "mixed":
        base = [32, 64, 64, 128, 128, 256, 512]
        return (base[:nheads - 1] + [max_span])[-nheads:]
    return [max_span] * nheads


def set_spans(span: AdaptiveSpan, spans: list) -> None:
    """current_val such that head_spans() == spans (z just below an integer)."""
    L = span.attn_span
    vals = [1.0 if s >= L else max(0.0, (s - span.ramp - 0.5) / L) for s in spans]
    with torch.no_grad():
        span.current_val.copy_(torch.tensor(vals).view(-1, 1, 1))


# ---- FLOPs ---------------------------------------------------------------------
def span_module(head_spans: list, max_span: int) -> AdaptiveSpan:
    """A span module whose head_spans() are ``head_spans`` (its windows, trim and cache
    follow from the rules of adaptive_span.py)."""
    span = AdaptiveSpan(max_span, len(head_spans), ramp=RAMP)
    set_spans(span, head_spans)
    return span


def executed_groups(head_spans: list, max_span: int, impl: str, batch: int, block: int,
                    width: int) -> list:
    """[(window, chunk, heads)] the path runs: L' for every head (reference), else the
    groups of attention.plan_groups."""
    span = span_module(head_spans, max_span)
    if impl == "reference":
        return [(span.kept_len(), block, len(head_spans))]
    groups, _ = plan_groups(tuple(span.head_windows()), batch, block, width)
    return [(w, c, len(range(len(head_spans))[h]) if isinstance(h, slice) else len(h))
            for w, c, h in groups]


def attention_flops_per_token(cfg: ModelConfig, head_spans: list, impl: str,
                              block_size: int, batch: int = 8) -> float:
    """Multiply-adds per token of one forward pass of the attention of all layers:
    content logits QK^T, position logits, probs@V and the K/V projections (the
    query and output projections do not depend on the span and are left out).
    ``head_spans``: per layer a list of per-head spans (or one list for every layer)."""
    per_layer = head_spans if isinstance(head_spans[0], list) else [head_spans] * cfg.nlayers
    M, H, D, L = block_size, cfg.hidden_size, cfg.head_dim, cfg.attn_span
    total = 0.0
    for spans in per_layer:
        for W, chunk, heads in executed_groups(spans, L, impl, batch, M, D):
            band = chunk + W  # keys per query of the banded (or dense: chunk = M) product
            total += heads * (band * D + W * D + band * D)  # q.k, q.pe, probs @ V
            total += heads * 2 * (W + M) / M * H * D  # the group's K and V rows, per query
    return total


def model_flops_per_token(cfg: ModelConfig, head_spans: list, impl: str, block_size: int) -> float:
    """FLOPs per token of a training step (forward + backward = 3 x forward, 2 per MAC)."""
    H, I, V = cfg.hidden_size, cfg.inner_hidden_size, cfg.vocab_size
    dense = cfg.nlayers * (2 * H * H + (2 * H * I if cfg.has_ff else 0)) + H * V
    return 3 * 2 * (dense + attention_flops_per_token(cfg, head_spans, impl, block_size))


def layer_step(impl: str, max_span: int, profile: str, B: int, M: int, device: str):
    """One attention layer's forward+backward with a full cache of L states."""
    K, D = 8, 64
    H = K * D
    torch.manual_seed(0)
    span = AdaptiveSpan(max_span, K, ramp=RAMP).to(device)
    set_spans(span, profile_spans(profile, max_span, K))
    query = torch.randn(B, M, H, device=device, requires_grad=True)  # (B, M, H)
    h_all = torch.randn(B, max_span + M, H, device=device, requires_grad=True)  # (B, L+M, H)
    w_key = (torch.randn(H, H, device=device) / math.sqrt(H)).requires_grad_()  # (H, H)
    w_val = (torch.randn(H, H, device=device) / math.sqrt(H)).requires_grad_()  # (H, H)
    key_pe = torch.randn(1, D, max_span, device=device, requires_grad=True)  # (1, D, L)
    fn = ATTN_IMPLS[impl]

    def step():
        out = fn(query, h_all, w_key, w_val, key_pe, K, span, None, 0.0, True)  # (B, M, H)
        out.sum().backward()

    return step


def model_step(cfg: ModelConfig, spans: list, B: int, M: int, device: str, bf16: bool,
               compiled: bool = False):
    """A training step: forward, span loss, backward, Adagrad step (the reference's,
    lr 0.07, clip 0.03), span reset."""
    torch.manual_seed(0)
    model = TransformerSeq(cfg).to(device)
    for layer in model.layers:
        set_spans(layer.span, spans)
    counter = compile_layers(model) if compiled else None
    opt = AdagradWithGradClip(model.parameters(), lr=0.07, grad_clip=0.03)
    x = torch.randint(0, cfg.vocab_size, (B, M + 1), device=device)
    caches = [torch.randn_like(c) for c in model.init_cache(B, device)]

    def keep_spans():
        for layer in model.layers:  # keep the spans where they were set
            set_spans(layer.span, spans)
        model.refresh_spans()  # as clamp_spans does after every update

    step = training_step(model, opt, x, caches, device, bf16, after=keep_spans)
    step.counter = counter
    return step


def medium_config(max_span: int) -> ModelConfig:
    return ModelConfig(vocab_size=205, hidden_size=128, inner_hidden_size=512, nlayers=4,
                       nheads=4, attn_span=max_span, dropout=0.0, adapt_span=True,
                       adapt_span_cache=True, adapt_span_ramp=RAMP)


def enwik8_config(impl: str) -> ModelConfig:
    return ModelConfig(vocab_size=205, hidden_size=512, inner_hidden_size=2048, nlayers=12,
                       nheads=8, attn_span=8192, dropout=0.0, adapt_span=True,
                       adapt_span_cache=True, adapt_span_ramp=RAMP, attn_impl=impl)


MEDIUM_SPANS = [32, 64, 128, None]  # None: the layer's max span (one long head)
ENWIK8_SPANS = [32, 64, 64, 128, 128, 256, 512, 8192]


def make_step(spec: dict, impl: str):
    if spec["kind"] == "layer":
        return layer_step(impl, spec["max_span"], spec["profile"], spec["B"], spec["M"],
                          spec["device"])
    if spec["kind"] == "model":
        L = spec["max_span"]
        cfg = medium_config(L)
        cfg.attn_impl = impl
        spans = spec.get("spans") or [s or L for s in MEDIUM_SPANS]
        return model_step(cfg, spans, 8, 128, spec["device"], False)
    return model_step(enwik8_config(impl), ENWIK8_SPANS, 8, 512, "cuda", True)  # "enwik8"
