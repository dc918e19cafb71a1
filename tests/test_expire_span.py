"""Expire-span: mask, loss and dropping against plain loops; gradients of w and b."""
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from expire_span import (ExpireSpan, distances, expire_loss, expire_mask, key_positions,  # noqa: E402
                         pack, unpack)
from numeric import assert_matches_finite_differences  # noqa: E402


def loop_mask_and_loss(spans, ages, block, ramp, coef):
    """Per stream, query j and key c (memory ages, then the block): m and the loss, by loops."""
    B, T = spans.shape
    C = T - block
    mask = torch.zeros(B, block, T, dtype=torch.float64)
    loss = 0.0
    for b in range(B):
        for j in range(block):
            for c in range(T):
                d = j + ages[b, c].item() if c < C else j - (c - C)
                if d < 1:
                    continue
                e = spans[b, c].item()
                m = min(max((e - d) / ramp + 1, 0.0), 1.0)
                mask[b, j, c] = m
                if 0 < m < 1:
                    loss += (e - d)
    return mask, coef * loss / (ramp * block)


def test_mask_and_loss_match_a_loop():
    torch.manual_seed(0)
    B, C, M, R = 3, 7, 5, 4
    ages = torch.sort(torch.randint(1, 30, (B, C)).double(), dim=1, descending=True).values  # (B, C)
    spans = torch.rand(B, C + M, dtype=torch.float64) * 25  # (B, T)
    dist = distances(key_positions(ages, M), M)  # (B, M, T)
    mask = expire_mask(spans, dist, R)
    want_mask, want_loss = loop_mask_and_loss(spans, ages, M, R, 0.3)
    torch.testing.assert_close(mask, want_mask, rtol=0, atol=1e-12)
    assert ((mask > 0) & (mask < 1)).sum() > 5  # the ramp is exercised
    assert expire_loss(spans, dist, mask, R, 0.3).item() == pytest.approx(want_loss, rel=1e-12)


def test_spans_start_at_the_init_percentage():
    module = ExpireSpan(8, 1000, 16, 1.0, 0.1, 0.0)
    spans = module.spans(torch.randn(2, 5, 8))
    torch.testing.assert_close(spans, torch.full((2, 5), 100.0))


def test_gradients_of_w_and_b_by_finite_differences():
    torch.manual_seed(1)
    B, C, M, H, R = 2, 6, 4, 5, 3
    module = ExpireSpan(H, 20, R, 2.0, 0.4, 1.0).double().train()
    with torch.no_grad():
        module.span_predictor.weight.normal_(0, 0.5)
    hidden = torch.randn(B, C + M, H, dtype=torch.float64)
    dist = distances(key_positions(torch.arange(C, 0, -1, dtype=torch.float64).expand(B, C) * 2, M), M)
    values = torch.randn(B, M, C + M, dtype=torch.float64)

    def loss():
        mask = module.mask(hidden, dist)  # (B, M, T)
        return (mask * values).sum() + module.loss()

    assert_matches_finite_differences(loss, [module.span_predictor.weight, module.span_predictor.bias],
                                      stride=1, atol=1e-6, rtol=1e-5)


def test_dropping_never_removes_a_memory_a_later_query_weighs():
    torch.manual_seed(2)
    B, M, H, L, R = 3, 4, 6, 24, 3
    module = ExpireSpan(H, L, R, 1.0, 0.3, 0.0)
    with torch.no_grad():
        module.span_predictor.weight.normal_(0, 2.0)
    memory = torch.zeros(B, 0, H + 2)
    seen = {}  # absolute position -> hidden state, per stream
    dropped_total = 0
    for step in range(30):
        block = torch.randn(B, M, H)
        for b in range(B):
            for j in range(M):
                seen[(b, step * M + j)] = block[b, j]
        memory = module.next_memory(memory, block)
        hidden, spans, ages = unpack(memory)
        start = (step + 1) * M  # the next block's first position
        assert (ages[:, -M:] == torch.arange(M, 0, -1).float()).all()  # the block's states stay
        assert memory.size(1) % M == 0
        for b in range(B):
            kept = {start - int(a) for a in ages[b].tolist()}
            for pos in range(start):
                if pos in kept:
                    continue
                dropped_total += 1
                e = module.spans(seen[(b, pos)].view(1, 1, H)).item()
                # the next block's first query is the nearest later one; the mask only shrinks further
                assert (e - (start - pos)) / R + 1 <= 0, (step, b, pos)
            torch.testing.assert_close(hidden[b], torch.stack([seen[(b, start - int(a))]
                                                               for a in ages[b].tolist()]))
        assert torch.all(ages[:, 1:] < ages[:, :-1])  # time order
    assert dropped_total > 0 and memory.size(1) < 30 * M


def test_streams_drop_the_batch_smallest_count_rounded_to_the_block():
    H, R = 1, 1
    module = ExpireSpan(H, 100, R, 1.0, 0.5, 0.0)
    with torch.no_grad():  # span = 100 sigmoid(h): h = -50 expires at once, h = 50 lives long
        module.span_predictor.weight.fill_(1.0)
        module.span_predictor.bias.zero_()
    hidden = torch.tensor([[-50.0, -50.0, -50.0, 50.0, 50.0, 50.0],
                           [-50.0, 50.0, -50.0, -50.0, -50.0, 50.0]]).unsqueeze(-1)  # (2, 6, 1)
    memory = pack(hidden[:, :4], torch.zeros(2, 4), torch.tensor([[6.0, 5, 4, 3]] * 2))
    out = module.next_memory(memory, hidden[:, 4:])
    _, _, ages = unpack(out)
    # stream 0 has 3 expired memories, stream 1 three: the smallest count 3 rounds down to 2;
    # each drops its 2 most expired (the oldest here)
    assert ages.tolist() == [[6.0, 5.0, 2.0, 1.0], [7.0, 5.0, 2.0, 1.0]]
    assert math.isclose(out[0, 0, 0].item(), -50.0) and math.isclose(out[1, 1, 0].item(), -50.0)


def test_expire_attention_matches_a_loop_over_non_contiguous_memories():
    """Per stream, head and query: softmax over the keys with m > 0 of (q.k + [d <= P] q.pe[P-d])
    / sqrt(D), times m, renormalised (+1e-8), read from the values."""
    from expire_attention import expire_attention
    torch.manual_seed(3)
    B, K, D, M, C, P, R = 2, 2, 3, 4, 5, 3, 4
    H = K * D
    expire = ExpireSpan(H, 12, R, 1.0, 0.4, 0.0).double().eval()
    with torch.no_grad():
        expire.span_predictor.weight.normal_(0, 1.0)
    ages = torch.tensor([[14.0, 9, 5, 2, 1], [11.0, 7, 6, 3, 1]], dtype=torch.float64)  # (B, C): gaps
    h_all = torch.randn(B, C + M, H, dtype=torch.float64)
    query = torch.randn(B, M, H, dtype=torch.float64)
    w_key, w_val = torch.randn(H, H, dtype=torch.float64), torch.randn(H, H, dtype=torch.float64)
    key_pe = torch.randn(1, D, P, dtype=torch.float64)
    got = expire_attention(query, h_all, key_positions(ages, M), w_key, w_val, key_pe, K, expire, None,
                           0.0, False)
    spans = expire.spans(h_all)  # (B, T)
    keys, values = h_all @ w_key.t(), h_all @ w_val.t()  # (B, T, H)
    want = torch.zeros(B, M, H, dtype=torch.float64)
    seen_partial = 0
    for b in range(B):
        for k in range(K):
            cols = slice(k * D, (k + 1) * D)
            for j in range(M):
                q = query[b, j, cols]
                terms = []
                for c in range(C + M):
                    d = j + ages[b, c].item() if c < C else j - (c - C)
                    m = min(max((spans[b, c].item() - d) / R + 1, 0.0), 1.0) if d >= 1 else 0.0
                    if m == 0:
                        continue
                    seen_partial += 0 < m < 1
                    logit = q @ keys[b, c, cols] + (q @ key_pe[0, :, P - int(d)] if d <= P else 0.0)
                    terms.append((logit / math.sqrt(D), m, values[b, c, cols]))
                if not terms:
                    continue
                top = max(t[0] for t in terms)
                p = [math.exp(t[0] - top) for t in terms]
                p = [x / sum(p) * t[1] for x, t in zip(p, terms)]
                total = sum(p) + 1e-8
                want[b, j, cols] = sum(x / total * t[2] for x, t in zip(p, terms))
    assert seen_partial > 3  # the ramp is exercised
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_noisy_spans_are_clamped_to_one_random_fraction_in_training_only():
    module = ExpireSpan(4, 100, 8, 1.0, 0.9, 0.0, noisy=True)
    spans = torch.full((3, 7), 90.0)
    torch.manual_seed(4)
    limit = torch.rand(()).item() * 100
    torch.manual_seed(4)
    clamped = module.train().noisy_spans(spans)
    assert torch.equal(clamped, torch.full((3, 7), min(90.0, limit))) and limit < 90
    assert torch.equal(module.eval().noisy_spans(spans), spans)
