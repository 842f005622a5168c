"""Where a fused CPU forward's time goes besides the kernels. Three timings, round-robin,
median of repeats after warm-up, inference_mode, seeded weights with realistic BN
statistics:
- the forward, which replays its recorded op plan from C++ (resnet_fused/op_plan.py), in
  one C call with its checks (csrc/fast_forward.cpp);
- that plan alone, on the same channels_last input: the ops of the trunk and (where
  ops.mean_linear computes it) the head, back to back;
- the forward of a second model with the same weights that walks the trunk in Python on
  every call (its plan switched off): what the plan saves.
The forward minus its plan is the rest: the per-forward checks (parameters unchanged,
input finite) and the input's layout change.

    python benchmarks/op_replay.py [--arch resnet50] [--batch 1] [--repeats 30]
"""

import argparse
import statistics
import time

import torch

from resnet_fused import builders, testing
from resnet_fused.benchmark import cpu_model


def only_plan(model):
    """The fold's one recorded plan (the model has run one input shape three times)."""
    (fold,) = model._fold_cache.values()
    (plan,) = fold.plans.values()
    if not callable(plan):
        raise SystemExit("op_replay: the forward was not recorded into a plan")
    return plan


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args()

    model = testing.realistic_(builders.build(args.arch)).eval()
    walking = builders.build(args.arch)
    walking.load_state_dict(model.state_dict())
    walking.eval()
    x = torch.randn(args.batch, 3, 224, 224)
    xcl = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        for _ in range(3):
            model(x)
            walking(x)
        plan = only_plan(model)
        (fold,) = walking._fold_cache.values()
        fold.plans.update({key: None for key in fold.plans})  # None: walk every call
        del walking._fast  # its replay from C (csrc/fast_forward.cpp) too

        times = {"forward": [], "plan": [], "walk": []}
        for _ in range(args.repeats):
            for key, fn in (("forward", lambda: model(x)), ("plan", lambda: plan(xcl)),
                            ("walk", lambda: walking(x))):
                t = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t)
    f, r, w = (statistics.median(times[k]) * 1e3 for k in ("forward", "plan", "walk"))
    print(f"{cpu_model()}, {torch.get_num_threads()} threads, {args.arch} batch {args.batch}")
    print(f"forward {f:.2f} ms = its op plan {r:.2f} ms + checks and layout {f - r:.2f} ms; "
          f"walking the trunk in Python instead: {w:.2f} ms")


if __name__ == "__main__":
    main()
