"""Where a fused CPU forward's time goes, op by op: each op call of one forward (the
trunk walked in Python, its recorded plan switched off, so that every call passes a
TorchDispatchMode that times it), median over repeats after warm-up, inference_mode,
seeded weights with realistic BN statistics. Prints every call of at least --min-ms
with its first two operands' shapes, the total per op, and the sum of the medians.

Each op's time is its wall time inside a real forward: its weights and inputs are as
cold or warm as the ops before it leave them, which an op timed alone does not show.
The timer adds a few microseconds per call; the sum is close to the forward's own time.

    python benchmarks/cpu_op_times.py [--arch resnet50] [--batch 1] [--size 224]
                                      [--dtype float32] [--repeats 20] [--min-ms 0.02]
"""

import argparse
import statistics
import time
from collections import defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from resnet_fused import builders, testing
from resnet_fused.benchmark import cpu_model


class OpTimer(TorchDispatchMode):
    """Records (op name, first two tensor shapes, seconds) for each op call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        seconds = time.perf_counter() - start
        shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)][:2]
        self.calls.append((str(func.overloadpacket).replace("resnet_fused.", ""), shapes,
                           seconds))
        return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--size", type=int, default=224, help="input height and width")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--min-ms", type=float, default=0.02, help="list calls at least this long")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)

    model = testing.realistic_(builders.build(args.arch)).eval().to(dtype)
    x = torch.randn(args.batch, 3, args.size, args.size, dtype=dtype)
    runs = []
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        if not model._fold_cache:
            raise SystemExit(f"cpu_op_times: {args.arch} in {args.dtype} does not run fused here "
                             f"({model.fused_status(x)})")
        for fold in model._fold_cache.values():
            fold.plans.update({key: None for key in fold.plans})  # None: walk every call
        model.__dict__.pop("_fast", None)  # and no replay from C (csrc/fast_forward.cpp)
        for _ in range(args.repeats):
            timer = OpTimer()
            with timer:
                model(x)
            runs.append(timer.calls)
    if len({len(calls) for calls in runs}) != 1:
        raise SystemExit("cpu_op_times: the forwards made different numbers of op calls")

    print(f"{cpu_model()}, {torch.get_num_threads()} threads, {args.arch} batch {args.batch} "
          f"at {args.size}x{args.size}, {args.dtype}: median of {args.repeats} forwards, ms")
    per_op = defaultdict(lambda: [0, 0.0])
    total = 0.0
    for i, (name, shapes, _) in enumerate(runs[0]):
        ms = statistics.median(calls[i][2] for calls in runs) * 1e3
        total += ms
        per_op[name][0] += 1
        per_op[name][1] += ms
        if ms >= args.min_ms:
            print(f"{i:4d} {ms:8.3f}  {name:28s} {', '.join(str(list(s)) for s in shapes)}")
    print("\nper op:")
    for name, (count, ms) in sorted(per_op.items(), key=lambda kv: -kv[1][1]):
        print(f"  {name:28s} {count:3d} calls {ms:8.2f}")
    print(f"sum of the medians: {total:.2f} ms over {len(runs[0])} calls")


if __name__ == "__main__":
    main()
