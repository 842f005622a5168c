// TensorWatch: whether any of a list of tensors was written in place (its version
// counter moved) or given other storage since the watch was made. The models ask on
// every forward whether their folded weights are stale (resnet_fused/state_watch.py);
// for ResNet-50's 320 parameters and buffers this loop costs a fraction of the same
// reads from Python, which touch each tensor's Python object too.
#include <torch/custom_class.h>
#include <torch/library.h>

#include <vector>

namespace resnet_fused {
namespace {

using at::Tensor;

// Inference tensors have no version counter: only their storage can be watched.
int64_t version_of(const Tensor& t) { return t.is_inference() ? -1 : t._version(); }

const void* address_of(const Tensor& t) {
  if (!t.has_storage()) return nullptr;
  return static_cast<const char*>(t.storage().data()) + t.storage_offset() * t.itemsize();
}

class TensorWatch : public torch::CustomClassHolder {
 public:
  // Holds the tensors: an unchanged address then means the same storage.
  explicit TensorWatch(std::vector<Tensor> tensors) : tensors_(std::move(tensors)) {
    for (const auto& t : tensors_) {
      versions_.push_back(version_of(t));
      addresses_.push_back(address_of(t));
    }
  }

  bool changed() const {
    for (size_t i = 0; i < tensors_.size(); ++i) {
      if (version_of(tensors_[i]) != versions_[i] || address_of(tensors_[i]) != addresses_[i]) {
        return true;
      }
    }
    return false;
  }

 private:
  std::vector<Tensor> tensors_;
  std::vector<int64_t> versions_;
  std::vector<const void*> addresses_;
};

TORCH_LIBRARY_FRAGMENT(resnet_fused, m) {
  m.class_<TensorWatch>("TensorWatch")
      .def(torch::init<std::vector<Tensor>>())
      .def("changed", &TensorWatch::changed);
}

}  // namespace
}  // namespace resnet_fused
