// cpu_graph: the ops one forward dispatched, recorded once and replayed from C++ (the CPU's analogue of a
// CUDA graph; hrnet_fast/cpu_graphs.py decides when a recording may be replayed).
//
// Why: an optimized W32 forward at batch 1 is 287 op calls, and each costs Python (the fused modules'
// forward, the OpOverload call turning Python objects into IValues) before its kernel starts: 8-10 ms of
// a 64 ms forward on 2 threads, during which the other thread spins idle (perf: the OpenMP worker spent
// 31% of a forward waiting). Replayed here, a call is one boxed dispatch of a stack built from IValues
// kept since the recording.
//
// Recording: a thread-local RecordFunction callback (the profiler's hook into the dispatcher) sees each
// op the recording thread dispatches, with its boxed inputs and outputs. Only top-level calls become
// steps (ops a kernel calls itself run again inside it). A tensor input is a slot when it is a graph
// input or an earlier step's output (matched by TensorImpl; outputs are pinned by a weak reference so
// no later tensor can take a freed one's address during the recording), else a constant held by the
// step (weights, biases, oneDNN-packed weights: the module's own tensors, not copies). What would make a
// replay differ from running the Python again is refused: an op that returns a value (bool, int, a
// Scalar: Python may branch on it), one that draws random numbers, an argument kind that could hide a
// slot (tuples, dicts, objects).
//
// Replay: slots live in a vector local to the call (so threads may replay one graph at once), and each
// slot is dropped after its last use, so tensors are freed where the Python forward frees them.
// The constants are held by reference: in-place edits of a weight the graph reads reach the replay. A
// tensor passed to watch() (the model's dense weights, from which packed ones are derived) that was
// edited since makes run() return None: the caller records again.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/ivalue.h>
#include <ATen/record_function.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "cpu/cpu_arena.h"

namespace hrnet_fast {
namespace {

// A step's input (or output) that is a slot: argument `arg`, list element `elem` (-1: the argument itself).
struct SlotRef {
  int32_t arg;
  int32_t elem;
  int32_t slot;
  bool operator==(const SlotRef& o) const { return arg == o.arg && elem == o.elem && slot == o.slot; }
};

struct Step {
  c10::OperatorHandle op;
  std::vector<c10::IValue> args;  // the boxed arguments; slot positions hold undefined tensors
  std::vector<SlotRef> ins;       // sorted by (arg, elem)
  std::vector<SlotRef> outs;      // output index and element -> slot
  std::vector<int32_t> frees;     // slots whose last use is this step
};

// Tensors match by identity, everything else by value: two recordings are the same graph only if they
// read the very same weights.
bool same_ivalue(const c10::IValue& a, const c10::IValue& b) {
  if (a.isTensor() || b.isTensor()) {
    return a.isTensor() && b.isTensor() && a.toTensor().unsafeGetTensorImpl() == b.toTensor().unsafeGetTensorImpl();
  }
  if (a.isList() || b.isList()) {
    if (!a.isList() || !b.isList()) return false;
    const auto la = a.toListRef(), lb = b.toListRef();
    if (la.size() != lb.size()) return false;
    for (size_t k = 0; k < la.size(); ++k)
      if (!same_ivalue(la[k], lb[k])) return false;
    return true;
  }
  return a == b;
}

class CpuGraph;
thread_local CpuGraph* t_recorder = nullptr;

class CpuGraph : public torch::CustomClassHolder {
 public:
  // Starts recording the ops this thread dispatches; `inputs` become slots 0..n-1.
  void begin(const std::vector<at::Tensor>& inputs) {
    TORCH_CHECK(t_recorder == nullptr, "hrnet_fast CpuGraph: this thread is already recording a graph");
    TORCH_CHECK(steps_.empty() && n_slots_ == 0, "hrnet_fast CpuGraph: a graph is recorded once");
    for (const auto& t : inputs) slot_of_[t.unsafeGetTensorImpl()] = static_cast<int32_t>(n_slots_++);
    n_inputs_ = n_slots_;
    handle_ = at::addThreadLocalCallback(at::RecordFunctionCallback(&on_start, &on_end)
                                             .needsInputs(true)
                                             .needsOutputs(true)
                                             .scopes({at::RecordScope::FUNCTION}));
    t_recorder = this;
  }

  // Stops recording; `outputs` are the forward's tensor outputs. Returns why the recording cannot be
  // replayed, or "" when it can.
  std::string end(const std::vector<at::Tensor>& outputs) {
    TORCH_CHECK(t_recorder == this, "hrnet_fast CpuGraph: end() without begin() on this thread");
    at::removeCallback(handle_);
    t_recorder = nullptr;
    if (depth_ != 0 && refused_.empty()) refused_ = "an op was still running when the recording ended";
    for (const auto& t : outputs) {
      auto it = slot_of_.find(t.unsafeGetTensorImpl());
      if (it != slot_of_.end()) {
        out_slots_.push_back(it->second);
        out_consts_.emplace_back();
      } else {  // not made by a recorded op (a weight, an input's alias made outside the dispatcher)
        out_slots_.push_back(-1);
        out_consts_.push_back(t);
      }
    }
    slot_of_.clear();
    pins_.clear();
    plan_frees();
    return refused_;
  }

  // Whether `other` recorded the same ops on the same constants, wired the same way.
  bool same_as(const c10::intrusive_ptr<CpuGraph>& other) const {
    if (steps_.size() != other->steps_.size() || n_inputs_ != other->n_inputs_ || out_slots_ != other->out_slots_)
      return false;
    for (size_t k = 0; k < out_consts_.size(); ++k)
      if (out_consts_[k].unsafeGetTensorImpl() != other->out_consts_[k].unsafeGetTensorImpl()) return false;
    for (size_t s = 0; s < steps_.size(); ++s) {
      const Step &a = steps_[s], &b = other->steps_[s];
      if (!(a.op.operator_name() == b.op.operator_name()) || a.ins != b.ins || a.outs != b.outs ||
          a.args.size() != b.args.size())
        return false;
      for (size_t k = 0; k < a.args.size(); ++k)
        if (!same_ivalue(a.args[k], b.args[k])) return false;
    }
    return true;
  }

  // Tensors whose in-place edit makes this graph stale (run() then returns None).
  void watch(const std::vector<at::Tensor>& tensors) {
    for (const auto& t : tensors) {
      if (t.defined() && !t.is_inference() && t.layout() == at::kStrided) watched_.emplace_back(t, t._version());
    }
  }

  std::optional<std::vector<at::Tensor>> run(const std::vector<at::Tensor>& inputs) const {
    TORCH_CHECK(static_cast<int64_t>(inputs.size()) == n_inputs_, "hrnet_fast CpuGraph: recorded with ", n_inputs_,
                " tensor inputs, replayed with ", inputs.size());
    for (const auto& [t, version] : watched_)
      if (t._version() != version) return std::nullopt;
    // the replay's activations at the offsets its memory plan gives them (csrc/cpu/cpu_arena.h); made
    // before the slots, so that they are all freed before it ends
    const ReplayScope memory(mem_plan_);
    std::vector<at::Tensor> slots(n_slots_);
    for (int64_t k = 0; k < n_inputs_; ++k) slots[k] = inputs[k];
    for (const auto& step : steps_) {
      torch::jit::Stack stack(step.args);
      int32_t copied = -1;  // the list argument already copied for this call (ins are sorted by arg)
      for (const auto& in : step.ins) {
        if (in.elem < 0) {
          stack[in.arg] = slots[in.slot];
          continue;
        }
        if (copied != in.arg) {  // a list is shared by reference: fill a copy, never the recorded one
          stack[in.arg] = c10::IValue(stack[in.arg].toList().copy());
          copied = in.arg;
        }
        stack[in.arg].toList().set(in.elem, slots[in.slot]);
      }
      step.op.callBoxed(stack);
      for (const auto& out : step.outs) {
        slots[out.slot] = out.elem < 0 ? stack[out.arg].toTensor() : stack[out.arg].toListRef()[out.elem].toTensor();
      }
      for (int32_t s : step.frees) slots[s] = at::Tensor();
    }
    std::vector<at::Tensor> out;
    out.reserve(out_slots_.size());
    for (size_t k = 0; k < out_slots_.size(); ++k) out.push_back(out_slots_[k] < 0 ? out_consts_[k] : slots[out_slots_[k]]);
    return out;
  }

  // [steps, slots, the most slots alive at once during a replay]
  std::vector<int64_t> stats() const { return {static_cast<int64_t>(steps_.size()), n_slots_, peak_live_}; }

  // The recorded ops' names, in order (for tests and for seeing what a forward dispatches).
  std::vector<std::string> ops() const {
    std::vector<std::string> names;
    for (const auto& s : steps_) {
      const auto& n = s.op.operator_name();
      names.push_back(n.overload_name.empty() ? n.name : n.name + "." + n.overload_name);
    }
    return names;
  }

 private:
  static std::unique_ptr<at::ObserverContext> on_start(const at::RecordFunction& fn) {
    if (t_recorder != nullptr) t_recorder->start(fn);
    return nullptr;
  }

  static void on_end(const at::RecordFunction& fn, at::ObserverContext*) {
    if (t_recorder != nullptr) t_recorder->finish(fn);
  }

  void refuse(std::string why) {
    if (refused_.empty()) refused_ = std::move(why);
  }

  // The argument with its slot tensors replaced by undefined ones (the recording's activations must not
  // be kept alive by the graph), and their positions appended to `ins`.
  c10::IValue template_arg(const c10::IValue& v, int32_t arg, std::vector<SlotRef>& ins, const std::string& op) {
    if (v.isTensor()) {
      auto it = slot_of_.find(v.toTensor().unsafeGetTensorImpl());
      if (it == slot_of_.end()) return v;
      ins.push_back({arg, -1, it->second});
      return c10::IValue(at::Tensor());
    }
    if (v.isList()) {
      auto list = v.toList();
      std::optional<c10::List<c10::IValue>> copy;
      for (size_t e = 0; e < list.size(); ++e) {
        const c10::IValue item = list.get(e);
        if (!item.isTensor()) continue;
        auto it = slot_of_.find(item.toTensor().unsafeGetTensorImpl());
        if (it == slot_of_.end()) continue;
        if (!copy) copy = list.copy();
        copy->set(e, at::Tensor());
        ins.push_back({arg, static_cast<int32_t>(e), it->second});
      }
      return copy ? c10::IValue(*copy) : v;
    }
    if (v.isTuple() || v.isGenericDict() || v.isObject() || v.isFuture() || v.isCapsule())
      refuse(op + " takes an argument of a kind the graph cannot see into (" + v.tagKind() + ")");
    return v;
  }

  void start(const at::RecordFunction& fn) {
    if (depth_++ > 0 || !refused_.empty()) return;  // a kernel's own calls run again inside it
    const auto name = fn.operator_name();
    if (!name) return refuse(std::string("a call without an operator (") + fn.name() + ")");
    auto op = c10::Dispatcher::singleton().findOp(*name);
    const std::string op_name = name->name;
    if (!op) return refuse(op_name + " is not a registered operator");
    if (op->hasTag(at::Tag::nondeterministic_seeded)) return refuse(op_name + " draws random numbers");
    Step step{*op, {}, {}, {}, {}};
    const auto inputs = fn.inputs();
    step.args.reserve(inputs.size());
    for (size_t k = 0; k < inputs.size(); ++k)
      step.args.push_back(template_arg(inputs[k], static_cast<int32_t>(k), step.ins, op_name));
    steps_.push_back(std::move(step));
  }

  void finish(const at::RecordFunction& fn) {
    if (--depth_ > 0 || !refused_.empty()) return;
    Step& step = steps_.back();
    const std::string& op_name = step.op.operator_name().name;
    const auto& outputs = fn.outputs();
    for (size_t k = 0; k < outputs.size(); ++k) {
      const auto& v = outputs[k];
      if (v.isTensor()) {
        add_output(step, v.toTensor(), static_cast<int32_t>(k), -1);
      } else if (v.isTensorList()) {
        const auto list = v.toListRef();
        for (size_t e = 0; e < list.size(); ++e) add_output(step, list[e].toTensor(), static_cast<int32_t>(k), static_cast<int32_t>(e));
      } else if (!v.isNone()) {
        return refuse(op_name + " returns a " + v.tagKind() + " (the Python that called it may branch on it)");
      }
    }
  }

  void add_output(Step& step, const at::Tensor& t, int32_t arg, int32_t elem) {
    if (!t.defined()) return;
    pins_.emplace_back(t.getIntrusivePtr());
    slot_of_[t.unsafeGetTensorImpl()] = n_slots_;
    step.outs.push_back({arg, elem, static_cast<int32_t>(n_slots_++)});
  }

  // Each slot is dropped after the last step that reads it (an output nobody reads, right after its
  // step); graph outputs are kept to the end.
  void plan_frees() {
    std::vector<int64_t> last(n_slots_, -1);
    for (size_t s = 0; s < steps_.size(); ++s) {
      for (const auto& out : steps_[s].outs) last[out.slot] = static_cast<int64_t>(s);
      for (const auto& in : steps_[s].ins) last[in.slot] = static_cast<int64_t>(s);
    }
    for (int32_t slot : out_slots_)
      if (slot >= 0) last[slot] = static_cast<int64_t>(steps_.size());
    for (int32_t slot = 0; slot < n_slots_; ++slot)
      if (last[slot] >= 0 && last[slot] < static_cast<int64_t>(steps_.size())) steps_[last[slot]].frees.push_back(slot);
    int64_t live = n_inputs_;
    peak_live_ = live;
    for (const auto& step : steps_) {
      live += static_cast<int64_t>(step.outs.size());
      peak_live_ = std::max(peak_live_, live);
      for (int32_t slot : step.frees) live -= slot >= n_inputs_;
    }
  }

  std::vector<Step> steps_;
  int64_t n_slots_ = 0, n_inputs_ = 0, peak_live_ = 0;
  std::vector<int32_t> out_slots_;
  std::vector<at::Tensor> out_consts_;
  std::vector<std::pair<at::Tensor, int64_t>> watched_;
  std::shared_ptr<ReplayPlan> mem_plan_ = make_replay_plan();
  std::string refused_;
  // recording only
  std::unordered_map<const c10::TensorImpl*, int32_t> slot_of_;
  std::vector<c10::weak_intrusive_ptr<c10::TensorImpl>> pins_;
  at::CallbackHandle handle_ = 0;
  int depth_ = 0;
};

}  // namespace
}  // namespace hrnet_fast

TORCH_LIBRARY_FRAGMENT(hrnet_fast, m) {
  m.class_<hrnet_fast::CpuGraph>("CpuGraph")
      .def(torch::init<>())
      .def("begin", &hrnet_fast::CpuGraph::begin)
      .def("end", &hrnet_fast::CpuGraph::end)
      .def("same_as", &hrnet_fast::CpuGraph::same_as)
      .def("watch", &hrnet_fast::CpuGraph::watch)
      .def("run", &hrnet_fast::CpuGraph::run)
      .def("stats", &hrnet_fast::CpuGraph::stats)
      .def("ops", &hrnet_fast::CpuGraph::ops);
}
