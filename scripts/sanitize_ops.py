"""Small launches of every CUDA conv path, add_relu and max_pool2d, to run under
compute-sanitizer (memcheck, racecheck, initcheck) from scripts/gpu_check.sh. Checks results
loosely against an fp64 CPU reference too (so the sanitizer instruments only our
kernels, not cuDNN), and a silent wrong answer is also reported. Exit status 1 on
a mismatch.

  compute-sanitizer --tool memcheck python3 scripts/sanitize_ops.py [--wgmma]

--wgmma runs the Hopper wgmma kernel's cases instead (RESNET_FUSED_CUDA_TILE=H; an
sm_90 GPU and a 9.0a build): apart, as that kernel is not yet verified.
"""

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load():
    import resnet_fused  # the ops need only torch
    if not resnet_fused.available():
        sys.exit(f"sanitize_ops: {resnet_fused.load_error()}")


def set_tf32(enabled):
    cudnn = torch.backends.cudnn
    if hasattr(cudnn, "conv") and hasattr(cudnn.conv, "fp32_precision"):
        cudnn.conv.fp32_precision = "tf32" if enabled else "ieee"
    else:
        cudnn.allow_tf32 = enabled


# (label, dtype, tf32, N, C, K, H, R, stride, pad, groups, residual, nchw). Each
# tile config runs more k-tiles than its pipeline has stages (4), so stage slots
# are reused while other warps may still read them (what racecheck is for).
CASES = [
    ("fp16 128x128 tiles, 8 k-tiles", torch.float16, False, 7, 256, 128, 56, 1, 1, 0, 1, True, False),
    ("fp16 128x64 tiles", torch.float16, False, 7, 64, 64, 56, 3, 1, 1, 1, True, False),
    ("fp16 64x64 tiles", torch.float16, False, 2, 64, 72, 9, 3, 2, 1, 1, True, False),
    ("fp16 scalar loads (stem)", torch.float16, False, 2, 3, 64, 30, 7, 2, 3, 1, False, False),
    ("fp16 odd K, NCHW", torch.float16, False, 1, 16, 17, 11, 3, 1, 1, 1, True, True),
    ("fp16 grouped, tensor cores", torch.float16, False, 2, 64, 64, 10, 3, 1, 1, 2, False, False),
    ("fp16 direct (4 per group)", torch.float16, False, 2, 128, 128, 9, 3, 2, 1, 32, True, False),
    ("bf16 64x64 tiles", torch.bfloat16, False, 2, 128, 128, 12, 3, 1, 1, 1, True, False),
    ("tf32 vector loads", torch.float32, True, 2, 32, 64, 13, 3, 1, 1, 1, True, False),
    ("tf32 scalar loads", torch.float32, True, 2, 3, 64, 20, 7, 2, 3, 1, False, False),
    ("fp32 exact (SIMT)", torch.float32, False, 2, 40, 72, 11, 3, 1, 1, 1, True, False),
]
# The Hopper wgmma kernel (RESNET_FUSED_CUDA_TILE=H, 5 stages): more k-tiles than
# stages, partial M and N tiles.
WGMMA_CASES = [
    ("fp16 wgmma, 8 k-tiles", torch.float16, False, 7, 256, 128, 56, 1, 1, 0, 1, True, False),
    ("bf16 wgmma 3x3, partial tiles", torch.bfloat16, False, 2, 96, 200, 13, 3, 1, 1, 1, True,
     False),
]


def wgmma_runs():
    from resnet_fused import _extension
    return torch.cuda.get_device_capability() == (9, 0) and bool(_extension._C.cuda_wgmma)


def main():
    load()
    ops = torch.ops.resnet_fused
    torch.manual_seed(0)
    bad = 0
    saved_tile = os.environ.get("RESNET_FUSED_CUDA_TILE")

    def restore_tile():
        if saved_tile is None:
            os.environ.pop("RESNET_FUSED_CUDA_TILE", None)
        else:
            os.environ["RESNET_FUSED_CUDA_TILE"] = saved_tile

    if "--wgmma" not in sys.argv[1:]:
        cases = [(c, None) for c in CASES]
    elif wgmma_runs():
        cases = [(c, "H") for c in WGMMA_CASES]
    else:
        print("sanitize_ops: skipped: the wgmma cases need an sm_90 GPU and a 9.0a build")
        return 0
    for (label, dtype, tf32, N, C, K, H, R, st, pad, groups, use_res, nchw), tile in cases:
        if tile is not None:
            os.environ["RESNET_FUSED_CUDA_TILE"] = tile  # read by the op at each launch
        set_tf32(tf32)
        fmt = torch.contiguous_format if nchw else torch.channels_last
        x = torch.randn(N, C, H, H, device="cuda").to(dtype).contiguous(memory_format=fmt)
        w = (torch.randn(K, C // groups, R, R, device="cuda") / (C // groups * R * R) ** 0.5).to(dtype)
        b = torch.randn(K, device="cuda").to(dtype)
        P = (H + 2 * pad - R) // st + 1
        res = torch.randn(N, K, P, P, device="cuda").to(dtype).contiguous(memory_format=fmt) if use_res else None
        wp = ops.pack_weight(w, [st, st], [pad, pad], [1, 1], groups, list(x.shape))
        y = ops.conv_bias_act(x, wp, b, res, [st, st], [pad, pad], [1, 1], groups, relu=True)
        set_tf32(False)
        # References in fp64 on the CPU: the sanitizer then sees only our kernels (no cuDNN).
        cpu = lambda t: t.detach().to("cpu", torch.float64)  # noqa: E731
        ref = F.conv2d(cpu(x), cpu(w), cpu(b), st, pad, 1, groups)
        if use_res:
            ref = ref + cpu(res)
            inplace = res.clone().contiguous(memory_format=torch.channels_last)
            ops.conv_bias_add_relu_(inplace, x, wp, b, [st, st], [pad, pad], [1, 1], groups)
        ref = torch.relu(ref)
        err = ((cpu(y) - ref).abs().max() / ref.abs().max().clamp_min(1e-3)).item()
        if use_res:
            err = max(err, ((cpu(inplace) - ref).abs().max() / ref.abs().max().clamp_min(1e-3)).item())
        ok = err < 2e-2
        bad += not ok
        if tile is not None:
            restore_tile()
        print(f"{'ok ' if ok else 'BAD'} {label:30s} rel err {err:.2e}")
    a = torch.randn(4097, device="cuda", dtype=torch.float16)[1:]
    ops.add_relu_(a, ops.add_relu(a, a))
    # max_pool2d: 16-byte channel vectors (64 channels) and per element (3), edges padded.
    for c in (64, 3):
        x = torch.randn(2, c, 15, 15, device="cuda", dtype=torch.float16).contiguous(
            memory_format=torch.channels_last)
        y = ops.max_pool2d(x, [3, 3], [2, 2], [1, 1])
        ref = F.max_pool2d(x.detach().to("cpu", torch.float32), 3, 2, 1)
        same = torch.equal(y.to("cpu", torch.float32), ref)
        bad += not same
        print(f"{'ok ' if same else 'BAD'} max_pool2d, {c} channels")
    torch.cuda.synchronize()
    print(f"sanitize_ops: {len(cases)} cases, {bad} mismatches")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
