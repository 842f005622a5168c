"""Folding BatchNorm into the preceding convolution.

    y = gamma * (conv(x, W) - mean) / sqrt(var + eps) + beta
      = conv(x, W * s) + (beta - mean * s),   s = gamma / sqrt(var + eps)

computed in fp32 (fp64 for fp64 models) with the BN's own eps, then cast to the
run dtype: folding after a cast to fp16/bf16 loses accuracy.
"""

import warnings

import torch

FP16_MAX = torch.finfo(torch.float16).max


def _bn_stats(bn, name):
    mean, var = getattr(bn, "running_mean", None), getattr(bn, "running_var", None)
    if mean is None or var is None:
        raise ValueError(
            f"{name}: BatchNorm has no running statistics (track_running_stats=False), so it "
            "cannot be folded into the convolution; use the model in train mode or give the "
            "BatchNorm running statistics")
    return mean, var


def fold_conv_bn(conv, bn, name="conv", differentiable=False):
    """(weight, bias) of one convolution with `bn` folded in, in fp32 (fp64 if the
    parameters are fp64). Detached unless `differentiable`: then gradients flow to
    the conv's weight and bias and to the BN's weight and bias (never to the running
    statistics, as in torchvision's eval mode). Raises ValueError naming `name`
    when `bn` has no running statistics."""
    mean, var = _bn_stats(bn, name)
    acc = torch.float64 if conv.weight.dtype == torch.float64 else torch.float32
    keep = (lambda t: t.to(acc)) if differentiable else (lambda t: t.detach().to(acc))
    with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
        w = keep(conv.weight)
        mean, var = mean.detach().to(acc), var.detach().to(acc)
        gamma = keep(bn.weight) if bn.weight is not None else torch.ones_like(mean)
        beta = keep(bn.bias) if bn.bias is not None else torch.zeros_like(mean)
        scale = gamma * torch.rsqrt(var + bn.eps)
        bias = beta - mean * scale
        if conv.bias is not None:
            bias = bias + keep(conv.bias) * scale
        return w * scale.reshape(-1, *[1] * (w.dim() - 1)), bias


def cast_folded(weight, bias, dtype, name="conv"):
    """Casts a folded (weight, bias) to the run dtype. For fp16, values beyond
    fp16's range would become inf: such a layer is kept in fp32 (returned dtype
    says so) with a warning."""
    if dtype == torch.float16 and weight.numel():
        finite = torch.isfinite(weight).all() and torch.isfinite(bias).all()
        peak = max(weight.abs().max().item(), bias.abs().max().item() if bias.numel() else 0.0)
        problem = None
        if finite and peak > FP16_MAX:
            # (No value in the text: a warning per distinct text would repeat at each
            # refold of a model being fine-tuned.)
            problem = (f"the folded weight/bias goes beyond float16's range ({FP16_MAX:.0f}), "
                       "e.g. from a tiny running_var")
        else:
            # An output channel whose nonzero weights all flush to 0 in fp16 has
            # lost every significant bit (e.g. from a tiny gamma).
            flat = weight.flatten(1)
            lost = (flat != 0).any(1) & (flat.to(torch.float16) == 0).all(1)
            if lost.any():
                problem = ("output channel(s) of the folded weight underflow to zero in "
                           "float16")  # no count in the text either, as above
        if problem:
            warnings.warn(f"{name}: {problem}; this layer runs in float32.", RuntimeWarning,
                          stacklevel=3)
            return weight.float(), bias.float(), torch.float32
    return weight.to(dtype), bias.to(dtype), dtype
