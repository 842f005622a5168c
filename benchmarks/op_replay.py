"""How much of a fused CPU forward is the ops themselves: times the model's forward
against a replay of the same op calls (recorded from one forward, same tensors and
arguments) back to back, without the Python model walk, the max-pool or the head.
The difference is what a C++ model walk could save at most. Round-robin, median of
repeats after warm-up, inference_mode, seeded weights with realistic BN statistics.

    python benchmarks/op_replay.py [--arch resnet50] [--batch 1] [--repeats 30]
"""

import argparse
import statistics
import time

import torch

from resnet_fused import builders, testing
from resnet_fused.benchmark import cpu_model

OPS = ("conv_bias_act", "conv_bias_add_relu_", "winograd_conv3x3")


def record_calls(model, x):
    """[(op, args, kwargs)] of the resnet_fused ops one forward of `model` makes.
    resnet_fused.ops looks the ops up on torch.ops.resnet_fused at each call, so
    wrapping them there sees every call."""
    calls = []
    namespace = torch.ops.resnet_fused
    originals = {name: getattr(namespace, name) for name in OPS}

    def recorder(op):
        def call(*args, **kwargs):
            calls.append((op, args, kwargs))
            return op(*args, **kwargs)
        return call

    try:
        for name, op in originals.items():
            setattr(namespace, name, recorder(op))
        model(x)
    finally:
        for name, op in originals.items():
            setattr(namespace, name, op)
    return calls


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args()

    model = testing.realistic_(builders.build(args.arch)).eval()
    x = torch.randn(args.batch, 3, 224, 224)
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        calls = record_calls(model, x)

        def replay():
            for op, a, kw in calls:
                op(*a, **kw)

        forward, replayed = [], []
        for _ in range(args.repeats):
            for fn, times in ((lambda: model(x), forward), (replay, replayed)):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
    f, r = statistics.median(forward) * 1e3, statistics.median(replayed) * 1e3
    print(f"{cpu_model()}, {torch.get_num_threads()} threads, {args.arch} batch {args.batch}")
    print(f"forward {f:.2f} ms; its {len(calls)} op calls replayed {r:.2f} ms; "
          f"the rest {f - r:.2f} ms ({(f - r) / f:.1%})")


if __name__ == "__main__":
    main()
