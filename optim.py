"""The optimizers of the reference and the learning-rate schedule (linear warm-up)."""
import torch

from config import TrainConfig


class AdagradWithGradClip(torch.optim.Optimizer):
    """The reference's Adagrad: per-tensor clipping scales the step size, not the gradient,
    and the accumulator adds the unclipped g^2."""

    def __init__(self, params, lr: float, grad_clip: float = 0.0, eps: float = 1e-10):
        defaults = dict(lr=lr, lr_decay=0, eps=eps, weight_decay=0, initial_accumulator_value=0,
                        grad_clip=grad_clip)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter with a gradient, in a few multi-tensor (foreach)
        operations and without host syncs: the per-tensor clip factor
        ``min(1, clip / (|g| + 1e-10))`` is applied on the device."""
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if not self.state[p]:
                    self.state[p]["step"] = torch.tensor(0.0)
                    self.state[p]["sum"] = torch.zeros_like(p)
            grads = [p.grad for p in params]
            steps = [self.state[p]["step"] for p in params]
            sums = [self.state[p]["sum"] for p in params]
            torch._foreach_add_(steps, 1)
            torch._foreach_addcmul_(sums, grads, grads, value=1)
            std = torch._foreach_sqrt(sums)
            torch._foreach_add_(std, group["eps"])
            if group["grad_clip"] <= 0 and group["lr_decay"] == 0:
                torch._foreach_addcdiv_(params, grads, std, value=-group["lr"])
                continue
            rate = self._step_sizes(group, grads, steps)  # (P,)
            updates = torch._foreach_div(grads, std)
            torch._foreach_mul_(updates, [r.to(p.device) for r, p in zip(rate.unbind(), params)])
            torch._foreach_add_(params, updates)

    @staticmethod
    def _step_sizes(group: dict, grads: list, steps: list) -> torch.Tensor:
        """Per tensor: minus the learning rate, decayed, times the clip factor. (P,)"""
        device = grads[0].device
        rate = torch.full((len(grads),), -group["lr"], dtype=torch.float64, device=device)  # (P,)
        if group["lr_decay"] != 0:
            count = torch.stack([s.to(device) for s in steps]).double()  # (P,)
            rate = rate / (1 + (count - 1) * group["lr_decay"])  # (P,)
        if group["grad_clip"] > 0:
            clip = group["grad_clip"]
            norms = torch.stack([n.to(device) for n in torch._foreach_norm(grads)]).double()  # (P,)
            rate = rate * torch.where(norms > clip, clip / (norms + 1e-10), 1.0)  # (P,)
        return rate.float()  # (P,)


def build_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optim == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum)
    if cfg.optim == "adagrad":
        return AdagradWithGradClip(params, lr=cfg.lr, grad_clip=cfg.grad_clip)
    return torch.optim.Adam(params, lr=cfg.lr)


def lr_at(update: int, cfg: TrainConfig) -> float:
    """Linear warm-up ``min(1, t / warmup)`` for update t counted from 1, then constant."""
    return cfg.lr * (min(1.0, update / cfg.lr_warmup) if cfg.lr_warmup > 0 else 1.0)
