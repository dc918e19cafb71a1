"""Numerical checks shared by the tests."""
import torch


def assert_matches_finite_differences(loss, params, stride: int, atol: float, rtol: float,
                                      eps: float = 1e-6) -> None:
    """The autograd gradient of ``loss()`` (a float64 scalar) with respect to every
    ``stride``-th element of ``params`` against central differences of step ``eps``."""
    grads = torch.autograd.grad(loss(), params)
    for p, g in zip(params, grads):
        for i in range(0, p.numel(), stride):
            with torch.no_grad():
                p.view(-1)[i] += eps
                up = loss().item()
                p.view(-1)[i] -= 2 * eps
                down = loss().item()
                p.view(-1)[i] += eps
            want = (up - down) / (2 * eps)
            assert abs(want - g.view(-1)[i].item()) <= atol + rtol * abs(want), (p.shape, i)
