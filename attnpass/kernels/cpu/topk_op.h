// attnpass::softmax_topk and attnpass::softmax_topk_backward as C++ kernels for CPU tensors, so that a call
// from an fx graph, a torch.compile'd graph or eager code goes from the dispatcher straight to the row kernels
// of topk.cpp: the op's Python implementation (argument checks, moving the axis last, choosing a kernel) and
// its Python autograd wrapper cost tens of microseconds per call, as much as a router-sized kernel.
//
// The ops stay defined in Python (attnpass/lowering/topk_ops.py: schema, fake implementation for
// torch.compile / torch.export, autograd for other devices); this file only adds the CPU and AutogradCPU
// kernels, which take precedence over the Python ones registered for every device.  They are registered at
// run time (set_dispatch), not by TORCH_LIBRARY_IMPL at load: each CPU capability builds its own library,
// only the machine's one may take the op, and forcing the reference backend (attnpass.kernels.force_backend)
// must hand the op back to the Python implementation.
//
// Behaviour is the Python implementation's, line for line: the same argument errors (TypeError, ValueError,
// IndexError), the same layout moves, the kernels where attnpass/kernels/topk.py picks them and otherwise the
// same ATen calls as attnpass/kernels/reference.py, so results are bit-identical either way.
//
// Not a standalone header: topk.cpp includes it once, after its anonymous namespace (topk_fwd, topk_bwd,
// kMaxK); attnpass/kernels/cpu/__init__.py hashes it with topk.cpp.

#pragma once

#include <ATen/TensorOperators.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/zeros_like.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

namespace {

using Pair = std::tuple<at::Tensor, at::Tensor>;

// attnpass.kernels.topk._kernel_for on a [rows, n] view: what the row kernels take (else the reference runs).
bool kernel_takes(const at::Tensor& rows, int64_t k) {
  const auto t = rows.scalar_type();
  return (t == at::kFloat || t == at::kBFloat16 || t == at::kHalf) && k >= 1 && k <= kMaxK && rows.size(-1) > 0;
}

// Shapes and dtypes spelled as Python prints them, so that an error reads the same from either implementation.
std::string py_shape(at::IntArrayRef sizes) {
  std::string out = "(";
  for (size_t i = 0; i < sizes.size(); ++i) out += (i ? ", " : "") + std::to_string(sizes[i]);
  return out + (sizes.size() == 1 ? ",)" : ")");
}

std::string py_dtype(at::ScalarType t) {
  switch (t) {
    case at::kBool: return "torch.bool";
    case at::kByte: return "torch.uint8";
    case at::kChar: return "torch.int8";
    case at::kShort: return "torch.int16";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    default: return std::string("torch.") + c10::toString(t);
  }
}

// topk_ops._check: the axis as a non-negative int, errors naming the argument that is wrong.
int64_t checked_dim(const at::Tensor& x, int64_t k, int64_t dim) {
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), "attnpass.softmax_topk: x must be floating point; got ",
                   py_dtype(x.scalar_type()));
  TORCH_CHECK_VALUE(x.dim() > 0, "attnpass.softmax_topk: x must have at least one dimension; got a scalar");
  TORCH_CHECK_INDEX(-x.dim() <= dim && dim < x.dim(), "attnpass.softmax_topk: dim ", dim,
                    " is out of range for x of shape ", py_shape(x.sizes()));
  const int64_t d = dim < 0 ? dim + x.dim() : dim;
  TORCH_CHECK_VALUE(0 <= k && k <= x.size(d), "attnpass.softmax_topk: k=", k, " must be in [0, ", x.size(d),
                    "] (the size of dim ", d, " of x", py_shape(x.sizes()), ")");
  return d;
}

// topk_ops._rows / _unrows: [rows, n] contiguous with axis d last, and back to like's shape with m along d.
at::Tensor to_rows(const at::Tensor& t, int64_t d) {
  if (d == t.dim() - 1) return t.reshape({-1, t.size(-1)}).contiguous();
  return t.movedim(d, -1).reshape({-1, t.size(d)}).contiguous();
}

at::Tensor from_rows(const at::Tensor& t, const at::Tensor& like, int64_t d) {
  const bool last = d == like.dim() - 1;
  std::vector<int64_t> shape = last ? like.sizes().vec() : like.movedim(d, -1).sizes().vec();
  shape.back() = t.size(-1);
  return last ? t.reshape(shape).contiguous() : t.reshape(shape).movedim(-1, d).contiguous();
}

// reference.softmax_topk over the last axis, the same ATen calls in the same order.
Pair reference_fwd(const at::Tensor& x, int64_t k, bool renormalize) {
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor xf = x.to(acc);
  const at::Tensor indices = std::get<1>(xf.sort(/*stable=*/true, -1, /*descending=*/true)).narrow(-1, 0, k);
  const at::Tensor picked = xf.gather(-1, indices);
  at::Tensor probs = (picked - xf.logsumexp({-1}, true)).exp();
  if (renormalize) probs = probs / probs.sum({-1}, true);
  return {probs.to(x.scalar_type()), indices};
}

// reference.softmax_topk_backward over the last axis.
at::Tensor reference_bwd(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& indices, bool renormalize) {
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor xf = x.to(acc), gf = grad.to(acc);
  const at::Tensor picked = xf.gather(-1, indices);
  if (renormalize) {
    const at::Tensor w = picked.softmax(-1);
    return at::zeros_like(xf).scatter(-1, indices, w * (gf - (gf * w).sum({-1}, true))).to(x.scalar_type());
  }
  const at::Tensor lse = xf.logsumexp({-1}, true);
  const at::Tensor p = (picked - lse).exp();
  const at::Tensor dx = -(xf - lse).exp() * (gf * p).sum({-1}, true);
  return dx.scatter_add(-1, indices, gf * p).to(x.scalar_type());
}

// topk_ops._softmax_topk_impl.
Pair softmax_topk_cpu(const at::Tensor& x, int64_t k, int64_t dim, bool renormalize) {
  const int64_t d = checked_dim(x, k, dim);
  if (k == 0 || x.numel() == 0) {
    std::vector<int64_t> shape = x.sizes().vec();
    shape[d] = k;
    return {at::empty(shape, x.options()), at::empty(shape, x.options().dtype(at::kLong))};
  }
  const at::Tensor rows = to_rows(x, d);
  auto [probs, indices] = kernel_takes(rows, k) ? topk_fwd(rows, k, renormalize) : reference_fwd(rows, k, renormalize);
  return {from_rows(probs, x, d), from_rows(indices, x, d)};
}

// topk_ops._softmax_topk_backward.
at::Tensor softmax_topk_backward_cpu(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& indices, int64_t dim,
                                     bool renormalize) {
  TORCH_CHECK_VALUE(x.dim() > 0, "attnpass.softmax_topk_backward: x must have at least one dimension");
  const int64_t d = ((dim % x.dim()) + x.dim()) % x.dim();
  if (indices.size(d) == 0 || x.numel() == 0) return at::zeros_like(x);
  const at::Tensor xr = to_rows(x, d), ir = to_rows(indices, d), gr = to_rows(grad, d);
  const at::Tensor dx = kernel_takes(xr, ir.size(1)) ? topk_bwd(gr.to(xr.scalar_type()).contiguous(), xr, ir, renormalize)
                                                     : reference_bwd(gr, xr, ir, renormalize);
  return from_rows(dx, x, d);
}

const c10::TypedOperatorHandle<Pair(const at::Tensor&, int64_t, int64_t, bool)>& forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("attnpass::softmax_topk", "")
                             .typed<Pair(const at::Tensor&, int64_t, int64_t, bool)>();
  return op;
}

const c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, bool)>&
backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("attnpass::softmax_topk_backward", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, bool)>();
  return op;
}

// topk_ops._setup_context / _backward: x and the indices saved (the backward recomputes the probabilities
// from the logits), the backward through the dispatcher so that AOTAutograd traces attnpass::softmax_topk_backward.
struct SoftmaxTopkFunction : public torch::autograd::Function<SoftmaxTopkFunction> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, int64_t k,
                                                int64_t dim, bool renormalize) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [probs, indices] = forward_op().call(x, k, dim, renormalize);
    ctx->mark_non_differentiable({indices});
    ctx->save_for_backward({x, indices});
    ctx->saved_data["dim"] = dim;
    ctx->saved_data["renormalize"] = renormalize;
    return {probs, indices};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    at::Tensor dx;
    if (grads[0].defined())
      dx = backward_op().call(grads[0].contiguous(), saved[0], saved[1], ctx->saved_data["dim"].toInt(),
                              ctx->saved_data["renormalize"].toBool());
    return {dx, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

Pair softmax_topk_autograd(const at::Tensor& x, int64_t k, int64_t dim, bool renormalize) {
  if (!(at::GradMode::is_enabled() && x.requires_grad())) {  // inference: no graph node, straight to the kernel
    at::AutoDispatchBelowADInplaceOrView below;
    return forward_op().call(x, k, dim, renormalize);
  }
  auto out = SoftmaxTopkFunction::apply(x, k, dim, renormalize);
  return {out[0], out[1]};
}

// Owned for the life of the process once registered (never destroyed at exit, when the dispatcher may be gone).
torch::Library* g_cpu_impl = nullptr;
torch::Library* g_autograd_impl = nullptr;

// Registers (on) or removes (off) the kernels above for attnpass's ops; returns whether they are registered.
// Called from Python under the GIL (attnpass/kernels/cpu/topk.py), after the ops have been defined.
bool set_dispatch(const at::Tensor& /*unused*/, bool on) {
  if (on && g_cpu_impl == nullptr) {
    g_cpu_impl = new torch::Library(torch::Library::IMPL, "attnpass", c10::DispatchKey::CPU, __FILE__, __LINE__);
    g_cpu_impl->impl("softmax_topk", TORCH_FN(softmax_topk_cpu));
    g_cpu_impl->impl("softmax_topk_backward", TORCH_FN(softmax_topk_backward_cpu));
    g_autograd_impl =
        new torch::Library(torch::Library::IMPL, "attnpass", c10::DispatchKey::AutogradCPU, __FILE__, __LINE__);
    g_autograd_impl->impl("softmax_topk", TORCH_FN(softmax_topk_autograd));
  } else if (!on && g_cpu_impl != nullptr) {
    delete g_autograd_impl;
    delete g_cpu_impl;
    g_autograd_impl = g_cpu_impl = nullptr;
  }
  return g_cpu_impl != nullptr;
}

}  // namespace
