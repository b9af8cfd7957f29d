"""carefl's own per-patient clipping engine: clipped summed gradients without Opacus's hooks.

(One file over 400 lines on purpose: the engine is one mechanism — per-layer norm pieces, one joint
clip, one noise draw — whose parts only make sense together and must stay auditable side by side.)

DP-SGD (Abadi et al. 2016, arXiv:1607.00133) needs, per optimizer step, Σ_i clip_C(∇ℓ_i) + N(0, σ²C²I),
where ∇ℓ_i is patient i's gradient over *all* trainable parameters jointly and
clip_C(v) = v · min(1, C / (‖v‖ + 1e-6)) — Opacus's formula, kept so that both engines compute the same
numbers. Opacus's hooks mode lets autograd compute the ordinary summed gradient, then recomputes every
layer's per-sample gradient in a backward hook (``unfold`` + ``einsum`` for convolutions), clips each
parameter's per-sample tensor, sums, and adds one noise tensor per parameter. This module implements
the same mechanism with less work:

- **No summed gradient.** Autograd computes input gradients only: Linear and norm layers run the
  native op with *detached* weights and keep (input, output gradient) through a tensor hook on their
  output; convolutions (and a Linear layer whose input needs no gradient) run through a small
  ``torch.autograd.Function`` whose backward returns the input gradient and forms the per-sample
  weight gradients instead of the summed one.
- **Linear layers: ghost norms** (Goodfellow 2015, arXiv:1510.01799; Li et al. 2022, arXiv:2110.05679).
  For an input of shape [B, in] patient i's weight gradient is the outer product g_i a_iᵀ, whose norm
  is ‖g_i‖·‖a_i‖: nothing is materialised, and the clipped sum is one matrix product (c ⊙ g)ᵀ a. For
  sequence inputs [B, T, in] — and for a layer called several times in one forward, e.g. a recurrent
  cell once per time step, whose calls are stacked into one sequence — the Gram-matrix form
  Σ_{t,s} (a_t·a_s)(g_t·g_s) or the [B, out, in] per-sample gradient, whichever costs fewer
  multiply-adds.
- **Convolutions: per-sample weight gradients with the backend's own kernels** (Rochette et al.
  2019, arXiv:1912.06015): 1×1 convolutions are a batched matrix product; every other kernel is one
  weight-backward call of a grouped convolution with groups = B (the batch folded into channels, so
  each group's weight gradient is one patient's). Measured per layer of carefl's U-Nets on CPU it
  costs 1–2× the summed weight gradient it replaces; Opacus's ``unfold`` + ``einsum`` and our own
  im2col + ``bmm`` (tried) cost several times more because of the patch copy (docs/BENCHMARKS.md).
- **Affine normalisation** (LayerNorm, GroupNorm, InstanceNorm with ``affine=True``): the
  normalisation stays native; the affine part's per-sample gradients are Σ g·x̂ and Σ g over the
  dimensions the parameters are broadcast along.
- **One flat buffer.** All parameters' noised, clipped gradients live in one flat tensor: one Gaussian
  draw of all P values from the secret generator, then each layer adds Σ_i c_i ∇ℓ_i into its slice
  (``addmm_``/``addmv_``), and every ``p.grad`` is a view of it.

Layers it has no rule for (any other module that owns trainable parameters, parameters tied between
modules, asymmetric 'same' padding) are listed by ``unsupported_layers``; ``privacy/dp_sgd.py`` then
falls back to Opacus (engine ``"auto"``) or refuses (``"fast"``). Exactness against the
one-patient-at-a-time reference is tested in ``tests/test_fast_clipping.py``.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SUPPORTED_LAYERS", "ClippedNoisyOptimizer", "PerSampleClipper", "unsupported_layers"]

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, *_CONVS, *_NORMS)

_conv_backward = torch.ops.aten.convolution_backward.default


# ---------------------------------------------------------------------------------------------------
# autograd Functions: forward as the layer, backward = input gradient + what the per-sample gradient needs


class _LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, layer):
        ctx.save_for_backward(x, weight)
        ctx.layer = layer
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        ctx.layer.records.append((x.detach(), g))
        return (g.matmul(weight) if ctx.needs_input_grad[0] else None), None, None, None


class _ConvFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, layer):
        ctx.save_for_backward(x, weight)
        ctx.layer = layer
        return layer.conv(x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        layer = ctx.layer
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = _conv_backward(g, x, weight, None, layer.stride, layer.padding, layer.dilation, False,
                                    layer.output_padding, layer.groups, [True, False, False])[0]
        layer.records.append(layer.per_sample(x, g))
        return grad_x, None, None, None


# ---------------------------------------------------------------------------------------------------
# one wrapped layer
#
# After backward each layer turns its records into squared per-sample norms ([B], ``prepare``) and
# then, given the clip factors c ([B]), adds Σ_i c_i ∇ℓ_i of its parameters into its views of the
# flat buffer (``accumulate``). The EHR models' whole step is a few hundred microseconds, so these
# paths are written to dispatch as few tensor operations as possible.


class _Layer:
    """A supported module whose forward is routed through the engine while attached."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.weight = module.weight if getattr(module, "weight", None) is not None else None
        self.bias = module.bias if getattr(module, "bias", None) is not None else None
        self.train_w = self.weight is not None and self.weight.requires_grad
        self.train_b = self.bias is not None and self.bias.requires_grad
        self.records: list = []
        self.shape_buffer: torch.Tensor | None = None
        self.views: list[torch.Tensor] = []  # this layer's trainable parameters' slices of the flat buffer
        self.flat_slice: torch.Tensor | None = None  # all of them: one 1-D slice (weight, then bias)
        self._pending: list[torch.Tensor] = []

    def params(self) -> list[torch.Tensor]:
        return [p for p, train in ((self.weight, self.train_w), (self.bias, self.train_b)) if train]

    def install(self) -> None:
        self._old_forward = self.module.__dict__.get("forward")
        plain, routed, owner = self.module.forward, self.forward, self.module

        def forward(module, *args, **kwargs):
            if module is not owner:  # a deep copy made while attached behaves as the plain layer
                return type(module).forward(module, *args, **kwargs)
            return routed(*args, **kwargs) if torch.is_grad_enabled() else plain(*args, **kwargs)

        self.module.forward = types.MethodType(forward, self.module)

    def uninstall(self) -> None:
        if self._old_forward is not None:
            self.module.forward = self._old_forward
        else:
            del self.module.forward
        self.records.clear()
        self._pending = []
        self.shape_buffer = None

    def per_sample_grads(self) -> list[torch.Tensor]:
        """[B, k] per-sample gradients whose columns, concatenated, are the layer's flat slice;
        summed over the layer's calls."""
        if len(self.records) == 1:
            return self._per_sample_of(self.records[0])
        out = None
        for rec in self.records:
            grads = self._per_sample_of(rec)
            out = grads if out is None else [x + y for x, y in zip(out, grads)]
        return out or []

    def _per_sample_of(self, rec) -> list[torch.Tensor]:
        return rec

    def prepare(self, total: torch.Tensor | None) -> torch.Tensor:
        """Materialise and keep for ``accumulate``; add Σ over parameters of ‖per-sample grad‖² to
        ``total`` ([B], in place; a new tensor when ``total`` is None)."""
        for t in self._pending_from(self.per_sample_grads()):
            total = _add_sq(total, t)
        return total

    def _pending_from(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        self._pending = grads
        return grads

    def accumulate(self, factors: torch.Tensor) -> None:
        pending, self._pending = self._pending, []
        if len(pending) == 1:
            self.flat_slice.addmv_(pending[0].t(), factors)
            return
        offset = 0
        for t in pending:  # consecutive parts of the layer's slice of the flat buffer
            n = t.shape[1]
            self.flat_slice[offset:offset + n].addmv_(t.t(), factors)
            offset += n


class _ConvLayer(_Layer):
    def __init__(self, module: nn.Conv1d | nn.Conv2d | nn.Conv3d) -> None:
        super().__init__(module)
        d = module.weight.dim() - 2
        self.d = d
        self.conv = (F.conv1d, F.conv2d, F.conv3d)[d - 1]
        self.kernel = tuple(module.kernel_size)
        self.stride, self.dilation, self.groups = tuple(module.stride), tuple(module.dilation), module.groups
        self.output_padding = (0,) * d
        self.padding = _numeric_padding(module)
        self.pre_pad = module.padding_mode != "zeros"
        if self.pre_pad:  # reflect / replicate / circular: padded first, as nn.ConvNd does
            self.padding = (0,) * d
        self.method = _conv_method(self)  # the shape_buffer it may use: see _conv_grouped

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_pad:
            x = F.pad(x, self.module._reversed_padding_repeated_twice, mode=self.module.padding_mode)
        return _ConvFn.apply(x, self.weight, self.bias, self)

    def per_sample(self, a: torch.Tensor, g: torch.Tensor) -> list[torch.Tensor]:
        b = a.shape[0]
        out = []
        if self.train_w:
            out.append(self.method(self, a, g).view(b, -1) if b else g.new_zeros((0, self.weight.numel())))
        if self.train_b:
            out.append(g.flatten(2).sum(2))
        return out


def _numeric_padding(module: nn.Module) -> tuple[int, ...]:
    d = module.weight.dim() - 2
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return (0,) * d
        total = [dil * (k - 1) for dil, k in zip(module.dilation, module.kernel_size)]
        if any(t % 2 for t in total):
            raise _Unsupported("'same' padding with an even effective kernel (asymmetric)")
        return tuple(t // 2 for t in total)
    return tuple(module.padding)


def _conv_grouped(layer: _ConvLayer, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """One weight-backward call of a grouped convolution with groups = B·groups (one group per patient).

    The call needs a weight argument of the grouped shape [B·out, in/groups, *k]; only its shape is
    read (the weight gradient depends on input and output gradient alone), so a zero buffer kept per
    layer stands in for it instead of a fresh B-fold copy of the weight every step."""
    b, w = a.shape[0], layer.weight
    rows = b * w.shape[0]
    if layer.shape_buffer is None or layer.shape_buffer.shape[0] < rows or layer.shape_buffer.dtype != w.dtype \
            or layer.shape_buffer.device != w.device:
        layer.shape_buffer = w.new_zeros((rows, *w.shape[1:]))
    weight = layer.shape_buffer[:rows]
    return _conv_backward(g.reshape(1, -1, *g.shape[2:]), a.reshape(1, -1, *a.shape[2:]), weight, None,
                          layer.stride, layer.padding, layer.dilation, False, layer.output_padding,
                          b * layer.groups, [False, True, False])[1]


def _conv_pointwise(layer: _ConvLayer, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """1×1, stride 1: [B, out, T] @ [B, T, in]."""
    return torch.bmm(g.flatten(2), a.flatten(2).transpose(1, 2))


def _conv_method(layer: _ConvLayer) -> Callable[[_ConvLayer, torch.Tensor, torch.Tensor], torch.Tensor]:
    pointwise = (all(k == 1 for k in layer.kernel) and all(s == 1 for s in layer.stride)
                 and not any(layer.padding) and layer.groups == 1)
    return _conv_pointwise if pointwise else _conv_grouped


class _NormLayer(_Layer):
    """LayerNorm, GroupNorm, InstanceNorm with affine parameters.

    Forward runs the native normalisation with *detached* weight and bias, so autograd computes the
    input gradient only, and a tensor hook on the output keeps (input, output gradient). At the step
    x̂ is recomputed (the normalisation without affine) and the per-sample gradients are weight
    Σ g·x̂ and bias Σ g over the non-parameter dims, as one [B, n_w + n_b] tensor.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        if isinstance(module, nn.modules.instancenorm._InstanceNorm) and module.track_running_stats:
            raise _Unsupported("InstanceNorm with running statistics mixes patients across batches")
        self.kind = ("layer" if isinstance(module, nn.LayerNorm) else
                     "group" if isinstance(module, nn.GroupNorm) else "instance")
        self.shape = list(module.normalized_shape) if self.kind == "layer" else None
        self.simple = self.kind == "layer" and len(self.shape) == 1 and self.train_w and self.train_b
        self.eps = module.eps

    def _normalise(self, x: torch.Tensor, weight, bias) -> torch.Tensor:
        if self.kind == "layer":
            return F.layer_norm(x, self.shape, weight, bias, self.eps)
        if self.kind == "group":
            return F.group_norm(x, self.module.num_groups, weight, bias, self.eps)
        return F.instance_norm(x, None, None, weight, bias, True, 0.0, self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.requires_grad:  # e.g. the first layer: give the output a gradient to observe
            x = x.detach().requires_grad_()
        if self.kind == "instance":  # affine applied here: torch's affine instance norm fails on B = 0
            shape = (1, -1) + (1,) * (x.dim() - 2)
            out = self._normalise(x, None, None)
            if self.weight is not None:
                out = out * self.weight.detach().view(shape)
            if self.bias is not None:
                out = out + self.bias.detach().view(shape)
        else:
            out = self._normalise(x, _detached(self.weight), _detached(self.bias))
        kept, records = x.detach(), self.records
        out.register_hook(lambda g: records.append((kept, g)))
        return out

    def _per_sample_of(self, rec) -> list[torch.Tensor]:
        x, g = rec
        if self.simple and g.dim() == 2:  # LayerNorm(n) with weight and bias on [B, n]: the MLP's case
            return [torch.cat((g * torch.layer_norm(x, self.shape, None, None, self.eps), g), 1)]
        b = g.shape[0]
        parts = []
        if self.train_w:
            parts.append(g * self._normalise(x, None, None))
        if self.train_b:
            parts.append(g)
        if self.kind == "layer":  # parameter shape = normalised shape: sum over the dims in between
            n = math.prod(self.shape)
            if g.dim() > len(self.shape) + 1:
                parts = [t.reshape(b, -1, n).sum(1) for t in parts]
            else:
                parts = [t.reshape(b, n) for t in parts]
        else:  # per channel: sum over space (none for a [B, C] input)
            parts = [t.reshape(b, t.shape[1], -1).sum(2) for t in parts]
        return [torch.cat(parts, 1) if len(parts) > 1 else parts[0]]


def _detached(p: torch.Tensor | None) -> torch.Tensor | None:
    return None if p is None else p.detach()


class _LinearLayer(_Layer):
    """Forward with detached weight and bias plus a tensor hook on the output that keeps
    (input, output gradient): autograd computes the input gradient only. A first layer, whose input
    needs no gradient, goes through ``_LinearFn`` instead (nothing else would have a gradient)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.requires_grad:
            return _LinearFn.apply(x, self.weight, self.bias, self)
        out = F.linear(x, self.weight.detach(), _detached(self.bias))
        kept, records = x.detach(), self.records
        out.register_hook(lambda g: records.append((kept, g)))
        return out

    def prepare(self, total: torch.Tensor | None) -> torch.Tensor:
        records = self.records
        self._ghost = None
        if len(records) == 1:
            a, g = records[0]
        else:  # called several times (a recurrent cell per time step, shared weights): one patient's
            # gradient is the sum over calls, i.e. one sequence of all the calls' rows
            b = records[0][0].shape[0]
            if any(r[0].shape[0] != b for r in records):
                raise RuntimeError(f"{type(self.module).__name__} saw different batch sizes within one step")
            if all(r[0].dim() == 2 for r in records):  # e.g. one call per time step
                a, g = torch.stack([r[0] for r in records], 1), torch.stack([r[1] for r in records], 1)
            else:
                a = torch.cat([r[0].reshape(b, -1, r[0].shape[-1]) for r in records], 1)
                g = torch.cat([r[1].reshape(b, -1, r[1].shape[-1]) for r in records], 1)
        b = a.shape[0]
        if b == 0:
            return a.new_zeros(0) if total is None else total
        if a.dim() == 2:  # ‖g aᵀ‖² = ‖g‖²‖a‖², bias ‖g‖²: nothing materialised
            self._ghost = (a, g)
            gn = torch.linalg.vecdot(g, g)
            if not self.train_w:
                return gn if total is None else total.add_(gn)
            an = torch.linalg.vecdot(a, a)
            if self.train_b:
                an.add_(1.0)
            return gn.mul_(an) if total is None else total.addcmul_(gn, an)
        a3, g3 = a.reshape(b, -1, a.shape[-1]), g.reshape(b, -1, g.shape[-1])
        t = a3.shape[1]
        parts = []
        if self.train_b:
            parts.append(g3.sum(1))
        # sequences: the Gram-matrix ghost norm ‖Σ_t g_t a_tᵀ‖² = Σ_{t,s} (a_t·a_s)(g_t·g_s) costs
        # B·T²·(in+out) multiply-adds, the [B, out, in] per-sample gradient B·T·in·out: take the cheaper
        if t * (a3.shape[2] + g3.shape[2]) < a3.shape[2] * g3.shape[2]:
            self._ghost = (a3, g3)
            if self.train_w:
                w = (torch.bmm(a3, a3.transpose(1, 2)) * torch.bmm(g3, g3.transpose(1, 2))).sum((1, 2))
                total = w if total is None else total.add_(w)
            if self.train_b:
                total = _add_sq(total, parts[0])
            return total
        if self.train_w:
            parts.insert(0, torch.bmm(g3.transpose(1, 2), a3).view(b, -1))
        self._pending = parts
        for t_ in parts:
            total = _add_sq(total, t_)
        return total

    def accumulate(self, factors: torch.Tensor) -> None:
        if self._ghost is None:
            return super().accumulate(factors)
        a, g = self._ghost
        self._ghost = None
        views = iter(self.views)
        if g.dim() == 2:
            gt = g.t()
            if self.train_w:
                next(views).addmm_(gt.mul(factors), a)
            if self.train_b:
                next(views).addmv_(gt, factors)
            return
        if self.train_w:
            gc = (g * factors.view(-1, 1, 1)).reshape(-1, g.shape[-1])
            next(views).addmm_(gc.t(), a.reshape(-1, a.shape[-1]))
        if self.train_b:
            next(views).addmv_(g.sum(1).t(), factors)


def _add_sq(total: torch.Tensor | None, t: torch.Tensor) -> torch.Tensor:
    n = torch.linalg.vector_norm(t, dim=1).square_() if t.shape[1] > 256 else torch.linalg.vecdot(t, t)
    return n if total is None else total.add_(n)


class _Unsupported(ValueError):
    pass


def _make_layer(module: nn.Module) -> _Layer:
    if isinstance(module, nn.Linear):
        return _LinearLayer(module)
    if isinstance(module, _CONVS):
        return _ConvLayer(module)
    if isinstance(module, _NORMS):
        return _NormLayer(module)
    raise _Unsupported(f"{type(module).__name__} has no per-sample rule in privacy/per_sample.py")


def _owners(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules that hold trainable parameters directly, minus pure aliases: a module whose every
    parameter is also held by one of its own submodules (Opacus's ``RenameParamsMixin`` in
    ``DPGRU``/``DPLSTM`` re-registers its cells' Linear parameters under ``weight_ih_l0`` etc.)."""
    out = []
    for name, module in model.named_modules():
        direct = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not direct:
            continue
        below = {id(p) for child in module.children() for p in child.parameters()}
        if all(id(p) in below for p in direct):
            continue
        out.append((name, module))
    return out


def unsupported_layers(model: nn.Module) -> list[str]:
    """Why this engine cannot train ``model`` (empty: it can), one reason per layer."""
    problems, seen = [], {}
    for name, module in _owners(model):
        label = name or type(model).__name__
        try:
            _make_layer(module)
        except _Unsupported as err:
            problems.append(f"{label}: {err}")
            continue
        extra = [n for n, p in module.named_parameters(recurse=False)
                 if p.requires_grad and n not in ("weight", "bias")]
        if extra:
            problems.append(f"{label}: parameters {extra} besides weight and bias")
        for p in module.parameters(recurse=False):
            if id(p) in seen:
                problems.append(f"{label}: parameter shared with {seen[id(p)]} (tied weights)")
            seen[id(p)] = label
    return problems


# ---------------------------------------------------------------------------------------------------
# the engine: attach, clip, accumulate


class PerSampleClipper:
    """Routes ``model``'s supported layers through per-sample-gradient Functions while attached.

    Use: forward → (summed per-patient loss).backward() → ``clip_and_accumulate(C)`` adds
    Σ_i min(1, C/(‖∇ℓ_i‖+1e-6)) ∇ℓ_i, over all trainable parameters jointly, into ``flat`` (one
    buffer of all P parameters, ``grad_views`` are its slices shaped as the parameters). One
    forward/backward per call: a second forward with gradients before the step would mix two
    batches' patients, and is refused. ``detach()`` gives the model back unchanged.
    """

    def __init__(self, model: nn.Module) -> None:
        problems = unsupported_layers(model)
        if problems:
            raise ValueError("privacy/per_sample.py cannot train this model: " + "; ".join(problems))
        self.model = model
        self.layers = [_make_layer(m) for _, m in _owners(model)]
        self.params: list[torch.Tensor] = [p for layer in self.layers for p in layer.params()]
        self.numel = sum(p.numel() for p in self.params)
        ref = self.params[0] if self.params else torch.empty(0)
        self.flat = torch.zeros(self.numel, device=ref.device, dtype=ref.dtype)
        self.grad_views: list[torch.Tensor] = []
        offset = 0
        for layer in self.layers:
            start = offset
            for p in layer.params():
                view = self.flat[offset:offset + p.numel()].view_as(p)
                layer.views.append(view)
                self.grad_views.append(view)
                offset += p.numel()
            layer.flat_slice = self.flat[start:offset]
        self._passes = 0
        for layer in self.layers:
            layer.install()
        self._hook = model.register_forward_pre_hook(self._count_pass)

    def _count_pass(self, module, args) -> None:
        if torch.is_grad_enabled():
            self._passes += 1

    def clear(self) -> None:
        for layer in self.layers:
            layer.records.clear()
            layer._pending = []
        self._passes = 0

    def per_sample_sq_norms(self) -> torch.Tensor | None:
        """‖∇ℓ_i‖² over all parameters, shape [B] (None: no layer saw a backward pass)."""
        if self._passes > 1:
            self.clear()
            raise RuntimeError("more than one forward pass with gradients before optimizer.step(): "
                               "per-patient clipping needs one batch per step (use max_physical_batch "
                               "to split a large batch, never gradient accumulation)")
        total, size = None, None
        for layer in self.layers:
            if not layer.records:
                continue
            b = layer.records[0][0].shape[0]
            if size is None:
                size = b
            elif b != size:
                self.clear()
                raise RuntimeError("layers saw different batch sizes in one step")
            if b == 0:  # an empty Poisson batch: nothing to clip, the step is noise only
                return self.flat.new_zeros(0)
            total = layer.prepare(total)
        return total

    def clip_and_accumulate(self, max_grad_norm: float) -> torch.Tensor | None:
        """Add the clipped per-patient sum into ``flat``; return the per-patient clip factors."""
        with torch.no_grad():
            sq = self.per_sample_sq_norms()
            if sq is None or sq.shape[0] == 0:
                self.clear()
                return sq
            # min(1, C / (‖∇ℓ_i‖ + 1e-6)), in place on a fresh tensor
            factors = sq.sqrt_().add_(1e-6).reciprocal_().mul_(max_grad_norm).clamp_(max=1.0)
            for layer in self.layers:
                if layer.records:
                    layer.accumulate(factors)
            self.clear()
            return factors

    def detach(self) -> None:
        for layer in self.layers:
            layer.uninstall()
        self._hook.remove()


class ClippedNoisyOptimizer:
    """DP optimizer over a ``PerSampleClipper``: the same protocol as Opacus's ``DPOptimizer``.

    The first physical batch of a logical step fills the clipper's flat buffer with one draw of P
    values from N(0, (σC)²) with ``generator``; each ``step()`` adds its batch's clipped sum. Unless
    Opacus's BatchMemoryManager signalled a skip (a logical batch split into physical batches), every
    ``p.grad`` is then set to its view of the buffer, the step hook (the accountant) runs and the
    wrapped optimizer steps. ``loss_reduction`` is "sum": the division by the public batch size is in
    the learning rate (``privacy/dp_sgd.py``). Empty batches are noise-only steps. ``p.grad`` stays
    valid until the next step overwrites the buffer.
    """

    def __init__(self, clipper: PerSampleClipper, optimizer: torch.optim.Optimizer, noise_multiplier: float,
                 max_grad_norm: float, generator: torch.Generator | None, expected_batch_size: int) -> None:
        held = [p for group in optimizer.param_groups for p in group["params"]]
        if {id(p) for p in held if p.requires_grad} != {id(p) for p in clipper.params}:
            raise ValueError("the optimizer must hold exactly the model's trainable parameters")
        self.clipper, self.original_optimizer = clipper, optimizer
        self.noise_multiplier, self.max_grad_norm = float(noise_multiplier), float(max_grad_norm)
        self.generator, self.expected_batch_size = generator, expected_batch_size
        self.loss_reduction = "sum"
        self.step_hook: Callable | None = None
        self._step_skip_queue: list[bool] = []
        self._is_last_step_skipped = False
        self._open = False  # a logical step has started (noise drawn) and not yet been taken
        self._iterations = 0
        self.last_clip_factors: torch.Tensor | None = None

    # Opacus DPOptimizer protocol (BatchMemoryManager, accountant hooks)
    def signal_skip_step(self, do_skip: bool = True) -> None:
        self._step_skip_queue.append(do_skip)

    def attach_step_hook(self, fn: Callable) -> None:
        self.step_hook = fn

    @property
    def accumulated_iterations(self) -> int:
        return max(self._iterations, 1)

    @property
    def params(self) -> list[torch.Tensor]:
        return self.clipper.params

    @property
    def param_groups(self) -> list[dict]:
        return self.original_optimizer.param_groups

    @property
    def state(self):
        return self.original_optimizer.state

    @property
    def defaults(self) -> dict:
        return self.original_optimizer.defaults

    def state_dict(self) -> dict:
        return self.original_optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.original_optimizer.load_state_dict(state)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.clipper.clear()
        if not self._is_last_step_skipped:
            for p in self.clipper.params:
                p.grad = None

    def step(self, closure: Callable | None = None):
        if closure is not None:
            with torch.enable_grad():
                closure()
        flat = self.clipper.flat
        if not self._open:  # first physical batch of a logical step: the step's one noise draw
            std = self.noise_multiplier * self.max_grad_norm
            if std > 0:
                flat.normal_(0.0, std, generator=self.generator)
            else:
                flat.zero_()
            self._open, self._iterations = True, 0
        self.last_clip_factors = self.clipper.clip_and_accumulate(self.max_grad_norm)
        self._iterations += 1
        if self._step_skip_queue and self._step_skip_queue.pop(0):
            self._is_last_step_skipped = True
            return None
        for p, view in zip(self.clipper.params, self.clipper.grad_views):
            p.grad = view
        if self.step_hook:
            self.step_hook(self)
        self._is_last_step_skipped = self._open = False
        return self.original_optimizer.step()
