"""CapturedForward: a model's eval-mode forward for one input shape, replayed from a
CUDA graph on a GPU and run directly elsewhere, behind one contract.

    run = model.capture((1, 3, 224, 224))       # FusedResNet.capture
    logits = run(x)                             # run.output, overwritten by the next call
    kept = run(x, clone=True)                   # a tensor of its own

The input is copied into a static buffer (`run.input`) and the result written into a
static buffer (`run.output`); both are allocated once, outside the graph's memory
pool, and keep their identity for the object's lifetime (recapture() included). The
CPU path keeps the same buffers and checks, so code written against it behaves the
same on any device.
"""

import contextlib

import torch

from .state_watch import StateWatch


def _batch_shape(batch_shape, channels):
    try:
        shape = torch.Size(batch_shape)
    except (TypeError, ValueError):
        shape = None
    if shape is None or len(shape) != 4 or min(shape) < 1 or shape[1] != channels:
        got = (f"a tensor of shape {tuple(batch_shape.shape)} (pass its .shape)"
               if isinstance(batch_shape, torch.Tensor) else f"{batch_shape!r:.100}")
        raise ValueError(f"capture: expected batch_shape (N, {channels}, H, W) of positive ints, "
                         f"got {got}")
    return shape


class CapturedForward:
    """`model`'s eval-mode forward for inputs of exactly `batch_shape`, `dtype` and
    `device`, without gradients and outside autocast (it computes in `dtype`).

    On CUDA the forward is warmed up `warmup` times on a side stream, then captured
    into a torch.cuda.CUDAGraph; a call copies the input into `input`, replays the
    graph on the current stream and returns `output`. Elsewhere a call copies the
    input into `input`, runs the model and writes `output`: the same buffers,
    checks and return value, without a graph (`graphed` says which).

    `output` is overwritten by the next call: pass clone=True for a tensor of one's
    own. One call at a time: concurrent calls share the buffers.

    A graph holds the weights folded at capture, so a call after the model's
    parameters, buffers or BN eps changed raises; `recapture()` captures again
    (same shape, same buffers). After writes through `param.data`, which cannot be
    seen, call `recapture()` too. A call in train mode raises.
    """

    def __init__(self, model, batch_shape, dtype=None, device=None, warmup=3):
        conv1 = getattr(model, "conv1", None)
        if not isinstance(model, torch.nn.Module) or not isinstance(conv1, torch.nn.Conv2d):
            raise TypeError(f"capture: expected a ResNet (e.g. resnet_fused.resnet50() or "
                            f"fuse(model)), got {type(model).__name__}")
        first = conv1.weight
        self.model = model
        self.batch_shape = _batch_shape(batch_shape, model.conv1.in_channels)
        self.dtype = first.dtype if dtype is None else dtype
        if not isinstance(self.dtype, torch.dtype):
            raise TypeError(f"capture: expected dtype a torch.dtype (e.g. {first.dtype}), got "
                            f"{type(dtype).__name__} {dtype!r}")
        if self.dtype != first.dtype:
            raise TypeError(f"capture: expected dtype {first.dtype} (the model's; convert the "
                            f"model with .to(dtype)), got {dtype}")
        try:
            self.device = first.device if device is None else torch.device(device)
        except (RuntimeError, TypeError):
            raise ValueError(f"capture: expected device a torch.device or a name such as "
                             f"'cpu' or 'cuda:0', got {device!r}") from None
        if self.device.index is None and self.device.type == first.device.type:
            self.device = first.device  # "cuda" means the model's GPU
        if self.device != first.device:
            raise ValueError(f"capture: expected device {first.device} (the model's; move the "
                             f"model with .to(device)), got {device}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            # The first forward folds the weights, which syncs and cannot be captured.
            raise ValueError(f"capture: expected warmup an int >= 1, got {warmup!r}")
        self.warmup = warmup
        self.graphed = self.device.type == "cuda"
        self.input = torch.zeros(self.batch_shape, dtype=self.dtype, device=self.device
                                 ).contiguous(memory_format=self._input_format())
        self.output = None
        self._graph = None
        self._caller_stream = None  # the stream capture was called on (CUDA)
        self._folds = []
        self.recapture()

    def _input_format(self):
        # The fused forward runs channels_last; a static input already in that format
        # saves the graph a copy. torchvision's forward (no kernels here) gets NCHW.
        with self._no_autocast():
            ok, _ = self.model.fused_status(torch.empty(0, dtype=self.dtype, device=self.device))
        return torch.channels_last if ok else torch.contiguous_format

    def _no_autocast(self):
        return torch.autocast(self.device.type, enabled=False)

    def _check_model(self):
        w = self.model.conv1.weight
        if self.model.training:
            raise RuntimeError("CapturedForward: expected the model in eval mode (call "
                               "model.eval()), got train mode")
        if (w.dtype, w.device) != (self.dtype, self.device):
            raise RuntimeError(f"CapturedForward: expected the model in {self.dtype} on "
                               f"{self.device} as captured, got {w.dtype} on {w.device}; "
                               f"capture again")

    def _forward(self):
        """The model on `input`, written into `output`."""
        with torch.inference_mode(), self._no_autocast():
            out = self.model(self.input)
            if self.output is None:
                # Allocated once, on the caller's stream (not the warm-up's side stream,
                # and outside any graph's pool), so it outlives recaptures.
                with torch.inference_mode(False), self._on_caller_stream():
                    self.output = torch.empty_like(out, memory_format=torch.contiguous_format)
            self.output.copy_(out)

    def recapture(self):
        """Warms up and captures again (or, without a graph, re-reads the model's
        state), after the model's parameters changed. Same shape and buffers."""
        self._check_model()
        self._graph = None  # its pool is freed before the next one is made
        if not self.graphed:
            for _ in range(self.warmup):
                self._forward()
        else:
            self._capture_graph()
        self._watch = StateWatch(self.model)

    def _capture_graph(self):
        with torch.cuda.device(self.device):
            self._caller_stream = torch.cuda.current_stream()
            # Warm-up on a side stream, as torch.cuda.graphs asks: cuDNN/cuBLAS
            # workspaces, lazy inits and the weight fold happen outside the capture.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    self._forward()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._forward()
        self._graph = graph
        # The graph reads the folded weights by address; the model drops its fold when
        # asked for another dtype or device, so the ones captured are kept alive here.
        self._folds = list(getattr(self.model, "_fold_cache", {}).values())

    def _on_caller_stream(self):
        if self._caller_stream is None:
            return contextlib.nullcontext()
        return torch.cuda.stream(self._caller_stream)

    def _check_input(self, x):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"CapturedForward: expected x a Tensor, got {type(x).__name__}")
        if x.shape != self.batch_shape:
            raise ValueError(f"CapturedForward: expected x of the captured shape "
                             f"{tuple(self.batch_shape)}, got {tuple(x.shape)}")
        if x.dtype != self.dtype:
            raise TypeError(f"CapturedForward: expected x of the captured dtype {self.dtype}, "
                            f"got {x.dtype}")
        if x.device != self.device:
            raise ValueError(f"CapturedForward: expected x on the captured device "
                             f"{self.device}, got {x.device}")

    def __call__(self, x, clone=False):
        self._check_input(x)
        self._check_model()
        if self._watch.changed():
            raise RuntimeError("CapturedForward: the model's parameters, buffers or BN eps "
                               "changed after capture (the capture holds the weights folded "
                               "then); call .recapture() or capture again")
        if self._graph is None:
            with torch.inference_mode():
                self.input.copy_(x)
            self._forward()
        else:
            with torch.inference_mode():
                self.input.copy_(x)
                self._graph.replay()
        return self.output.clone() if clone else self.output

    def __repr__(self):
        how = "CUDA graph" if self.graphed else "no graph"
        return (f"CapturedForward({type(self.model).__name__}, batch_shape="
                f"{tuple(self.batch_shape)}, dtype={self.dtype}, device={self.device}, {how})")
