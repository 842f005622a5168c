"""Where a fused CPU forward's time goes besides the kernels. Three timings, round-robin,
median of repeats after warm-up, inference_mode, seeded weights with realistic BN
statistics:
- the forward;
- its op calls (recorded from one forward: same tensors and arguments) replayed back to
  back (the convolutions and the max-pool), without the model walk or the head;
- the forward with every op stubbed to return its recorded output: the Python walk,
  head and input checks alone, i.e. what a C++ model walk could save at most.
The forward minus the other two is the ops running slower inside the model than back to
back on recorded tensors (their outputs land in memory that is not in cache).

    python benchmarks/op_replay.py [--arch resnet50] [--batch 1] [--repeats 30]
"""

import argparse
import statistics
import time

import torch

from resnet_fused import builders, testing
from resnet_fused.benchmark import cpu_model

OPS = ("conv_bias_act", "conv_bias_add_relu_", "winograd_conv3x3", "conv1x1", "conv1x1_add_relu_",
       "grouped_conv3x3", "max_pool2d")


def _swap_ops(replacement):
    """Replaces the ops on torch.ops.resnet_fused (where resnet_fused.ops looks them up
    at each call) by replacement(name, op); returns a function that restores them."""
    namespace = torch.ops.resnet_fused
    originals = {name: getattr(namespace, name) for name in OPS}
    for name, op in originals.items():
        setattr(namespace, name, replacement(name, op))

    def restore():
        for name, op in originals.items():
            setattr(namespace, name, op)
    return restore


def record_calls(model, x):
    """[(op, args, kwargs, output)] of the resnet_fused op calls of one forward."""
    calls = []

    def recorder(name, op):
        def call(*args, **kwargs):
            out = op(*args, **kwargs)
            calls.append((op, args, kwargs, out))
            return out
        return call

    restore = _swap_ops(recorder)
    try:
        model(x)
    finally:
        restore()
    return calls


def stubbed(model, calls):
    """A forward of `model` whose ops return the recorded outputs, in call order."""
    def forward(x):
        outputs = iter(out for _, _, _, out in calls)
        restore = _swap_ops(lambda name, op: lambda *args, **kwargs: next(outputs))
        try:
            return model(x)
        finally:
            restore()
    return forward


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
            # The in-place residual ops sum into their recorded residual again on each
            # replay: its values grow, its timing does not change.
            for op, a, kw, _ in calls:
                op(*a, **kw)

        walk = stubbed(model, calls)
        times = {"forward": [], "replay": [], "walk": []}
        for _ in range(args.repeats):
            for key, fn in (("forward", lambda: model(x)), ("replay", replay),
                            ("walk", lambda: walk(x))):
                t = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t)
    f, r, w = (statistics.median(times[k]) * 1e3 for k in ("forward", "replay", "walk"))
    print(f"{cpu_model()}, {torch.get_num_threads()} threads, {args.arch} batch {args.batch}")
    print(f"forward {f:.2f} ms = its {len(calls)} op calls replayed back to back {r:.2f} ms"
          f" + walk, head and checks (ops stubbed) {w:.2f} ms"
          f" + ops slower in the model than replayed {f - r - w:.2f} ms")

if __name__ == "__main__":
    main()
