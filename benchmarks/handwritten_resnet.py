"""Times resnet_fused.fuse() on a hand-written ResNet: a textbook BasicBlock ResNet
with its own attribute names (conv_layer1, batch_norm1, res_connnection), F.relu
and `op += shortcut`, as people write it without torchvision. Fused against
unfused, in one process on the same input, median of repeats after warm-up, the
two timed in blocks of 5 round-robin; each one's error against an fp64 reference.

    python benchmarks/handwritten_resnet.py [--layers 3,4,6,3] [--batch 8] [--size 224]
"""

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

import resnet_fused
from resnet_fused.benchmark import cpu_model, rel_err, time_interleaved
from resnet_fused.testing import realistic_


class SeedBlock(nn.Module):
    """Two 3x3 conv-BN, the second added to the shortcut before the last ReLU."""

    def __init__(self, in_channels, channels, stride=1):
        super().__init__()
        self.conv_layer1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.batch_norm1 = nn.BatchNorm2d(channels)
        self.conv_layer2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.batch_norm2 = nn.BatchNorm2d(channels)
        self.res_connnection = nn.Sequential()
        if stride != 1 or in_channels != channels:
            self.res_connnection = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x):
        op = F.relu(self.batch_norm1(self.conv_layer1(x)))
        op = self.batch_norm2(self.conv_layer2(op))
        op += self.res_connnection(x)
        return F.relu(op)


class SeedResNet(nn.Module):
    """An ImageNet-style ResNet of SeedBlocks; layers=(3, 4, 6, 3) is ResNet-34."""

    def __init__(self, layers=(3, 4, 6, 3), num_classes=1000, width=64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.pool = nn.MaxPool2d(3, 2, 1)
        stages, channels = [], width
        for i, n in enumerate(layers):
            out = width * 2 ** i
            blocks = [SeedBlock(channels, out, 1 if i == 0 else 2)]
            blocks += [SeedBlock(out, out) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            channels = out
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x):
        x = self.pool(F.relu(self.bn1(self.conv1(x))))
        x = self.stages(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", default="3,4,6,3", help="blocks per stage (3,4,6,3: ResNet-34)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args()
    torch.manual_seed(0)
    model = realistic_(SeedResNet(tuple(int(n) for n in args.layers.split(","))), seed=0).eval()
    t = time.perf_counter()
    fused = resnet_fused.fuse(model)
    fuse_ms = (time.perf_counter() - t) * 1e3
    x = torch.randn(args.batch, 3, args.size, args.size,
                    generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        variants = {"unfused": lambda: model(x), "fused": lambda: fused(x)}
        ms = time_interleaved(variants, x.device, args.warmup, args.repeats)
        ref = copy.deepcopy(model).double()(x.double())
        errs = {"unfused": rel_err(model(x), ref), "fused": rel_err(fused(x), ref)}
    print(f"{cpu_model()} ({torch.get_num_threads()} threads), torch {torch.__version__}, "
          f"float32, SeedResNet layers={args.layers}, batch {args.batch}, "
          f"{args.size}x{args.size}, median of {args.repeats} after {args.warmup} warm-up")
    print(f"fused patterns: {fused.fused_patterns} (tracing and rewriting: {fuse_ms:.0f} ms)")
    for name in ms:
        print(f"{name:8} {ms[name]:9.1f} ms   error vs fp64 {errs[name]:.2g}")
    print(f"speed-up: {ms['unfused'] / ms['fused']:.2f}x")


if __name__ == "__main__":
    main()
