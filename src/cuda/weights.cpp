#include "cuda/weights.hpp"

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <thread>
#include <tuple>

#include "cpu/weights.hpp"
#include "cuda/check.hpp"
#include "cuda/gemm.hpp"
#include "cuda/kernels.cuh"
#include "sinkscope/checkpoint.hpp"
#include "sinkscope/error.hpp"
#include "sinkscope/family.hpp"

namespace sinkscope::cuda {
namespace {

void upload_f32(std::span<const float> src, DeviceBuffer<float>& dst) {
  dst.reserve(src.size());
  CUDA_CHECK(cudaMemcpy(dst.get(), src.data(), src.size() * sizeof(float), cudaMemcpyHostToDevice));
}

std::vector<float> read_rows(const Checkpoint& ck, const std::string& name, int64_t r0, int64_t r1,
                             int64_t width) {
  std::vector<float> out(static_cast<size_t>((r1 - r0) * width));
  ck.read_rows(name, r0, r1, out.data());
  return out;
}

// fp32 host values rounded to bf16 (to nearest even) at dst on the device.
void upload_as_bf16(std::span<const float> src, bf16_bits* dst) {
  std::vector<bf16_bits> b(src.size());
  std::transform(src.begin(), src.end(), b.begin(), f32_to_bf16);
  CUDA_CHECK(cudaMemcpy(dst, b.data(), b.size() * sizeof(bf16_bits), cudaMemcpyHostToDevice));
}

// The router's [W | W] in bf16 (weights.hpp, router_split) when every weight is a finite bf16
// value.
void upload_router_split(std::span<const float> w, int64_t E, int64_t D,
                         DeviceBuffer<bf16_bits>& dst) {
  std::vector<bf16_bits> b(static_cast<size_t>(E * 2 * D));
  for (int64_t e = 0; e < E; ++e)
    for (int64_t j = 0; j < D; ++j) {
      const float v = w[static_cast<size_t>(e * D + j)];
      const bf16_bits h = f32_to_bf16(v);
      if (!std::isfinite(v) || bf16_to_f32(h) != v) return;  // not bf16: the fp32 product
      b[static_cast<size_t>(e * 2 * D + j)] = h;
      b[static_cast<size_t>(e * 2 * D + D + j)] = h;
    }
  dst.reserve(b.size());
  CUDA_CHECK(cudaMemcpy(dst.get(), b.data(), b.size() * sizeof(bf16_bits), cudaMemcpyHostToDevice));
}

// Rows [r0, r1) of a matrix as bf16 at dst: the stored bytes through the uploader, or, for FP8
// block-scaled tensors (DeepSeek-V3), dequantised on the host by the checkpoint reader.
template <typename Up>
void matrix_rows(const Checkpoint& ck, Up& up, const std::string& name, int64_t r0, int64_t r1,
                 bf16_bits* dst) {
  const TensorInfo* t = ck.find(name);
  if (t && t->dtype == DType::F8E4M3) {
    upload_as_bf16(read_rows(ck, name, r0, r1, t->shape.back()), dst);
    return;
  }
  up.rows(name, r0, r1, dst);
}

// A layer's multi-head latent attention (docs/metrics.md, DeepSeek-V3) on this rank: read on the
// host (FP8 dequantised there), uploaded as bf16.
void load_mla(const Checkpoint& ck, const ShardPlan& plan, int64_t l, DeviceLayer& L) {
  const ModelConfig& c = ck.config();
  const int64_t D = c.hidden_size, dqk = c.head_dim, dv = c.v_head_dim, dkv = c.qk_nope_dim + dv,
                Rq = c.mla_q_rank, Rkv = c.mla_kv_rank, ra = Rkv + c.qk_rope_dim;
  const int64_t h0 = plan.head_begin, h1 = plan.head_end, Hl = h1 - h0;
  auto name = [&](Role role) { return tensor_name(c, role, l, -1, &ck); };
  std::vector<float> a;
  if (Rq > 0) {
    a = read_rows(ck, name(Role::kQA), 0, Rq, D);
    upload_f32(read_rows(ck, name(Role::kQANorm), 0, Rq, 1), L.mla_q_a_norm);
    L.mla_q.reserve(static_cast<size_t>(Hl * dqk * Rq));
    upload_as_bf16(read_rows(ck, name(Role::kQB), h0 * dqk, h1 * dqk, Rq), L.mla_q.get());
  } else {
    L.mla_q.reserve(static_cast<size_t>(Hl * dqk * D));
    upload_as_bf16(read_rows(ck, name(Role::kQ), h0 * dqk, h1 * dqk, D), L.mla_q.get());
  }
  const std::vector<float> kva = read_rows(ck, name(Role::kKvA), 0, ra, D);
  a.insert(a.end(), kva.begin(), kva.end());
  L.mla_a.reserve(a.size());
  upload_as_bf16(a, L.mla_a.get());
  upload_f32(read_rows(ck, name(Role::kKvANorm), 0, Rkv, 1), L.mla_kv_a_norm);
  L.mla_kv_b.reserve(static_cast<size_t>(Hl * dkv * Rkv));
  upload_as_bf16(read_rows(ck, name(Role::kKvB), h0 * dkv, h1 * dkv, Rkv), L.mla_kv_b.get());
  std::vector<float> o(static_cast<size_t>(D * Hl * dv));
  ck.read_block(name(Role::kO), 0, D, h0 * dv, h1 * dv, o.data());
  L.wo.reserve(o.size());
  upload_as_bf16(o, L.wo.get());
}

// The local experts of a gpt-oss layer (docs/families.md: fused, interleaved gate/up columns, bf16
// or MXFP4, with biases), de-interleaved and decoded on the host by the CPU loader, then laid out
// as every other family's: gate rows, then up rows, then down [D, I]; biases [El, 2I] and [El, D].
void load_gpt_oss_experts(const Checkpoint& ck, const ShardPlan& plan, int64_t l, DeviceLayer& L) {
  const ModelConfig& c = ck.config();
  const int64_t D = c.hidden_size, I = c.moe_intermediate_size, El = plan.local_experts();
  std::vector<float> gu_bias, dn_bias;
  for (int64_t e = plan.expert_begin; e < plan.expert_end; ++e) {
    const MlpWeights m = load_gpt_oss_expert(ck, l, e);
    bf16_bits* gu = L.w_gate_up.get() + (e - plan.expert_begin) * 2 * I * D;
    upload_as_bf16(m.gate, gu);
    upload_as_bf16(m.up, gu + I * D);
    upload_as_bf16(m.down, L.w_down.get() + (e - plan.expert_begin) * D * I);
    if (c.expert_bias) {
      gu_bias.insert(gu_bias.end(), m.gate_bias.begin(), m.gate_bias.end());
      gu_bias.insert(gu_bias.end(), m.up_bias.begin(), m.up_bias.end());
      dn_bias.insert(dn_bias.end(), m.down_bias.begin(), m.down_bias.end());
    }
  }
  if (c.expert_bias) {
    if (gu_bias.size() != static_cast<size_t>(El * 2 * I) ||
        dn_bias.size() != static_cast<size_t>(El * D))
      throw RuntimeFailure("gpt-oss expert biases of layer " + std::to_string(l) +
                           " have unexpected sizes");
    upload_f32(gu_bias, L.expert_gate_up_bias);
    upload_f32(dn_bias, L.expert_down_bias);
  }
}

// Stored weights -> device bf16 without a host conversion. `threads` host threads (--threads, at
// most kMaxWorkers) each own two pinned staging buffers of kStage bytes and a stream of their own.
// The loader cuts every slice into pieces of at most kStage bytes and queues them, asking the
// kernel to start reading each piece's file bytes as it is queued (posix_fadvise WILLNEED). A free
// worker reads a piece into one of its buffers with pread (Checkpoint::read_stored: the kernel
// copies from the page cache in large reads, so no page of the mapping is faulted in; strided rows
// shorter than kPreadRowMin are copied from the mapping instead, one pread per short row costing
// more than it saves), and sends the buffer with cudaMemcpyAsync on its stream; it reuses a buffer
// once the event recorded after that buffer's last copy has completed. Disk and page-cache reads
// and DMA of different pieces therefore overlap. bf16 checkpoints land in the weights as they are
// (bit for bit the stored values); f16 and f32 pieces land in the worker's device scratch and are
// rounded to bf16 there by a kernel on the same stream (k::f16_to_bf16, k::f32_to_bf16: the same
// rounding as the host's f32_to_bf16). The values are checked on the device: a kernel after each
// copy looks for inf/NaN in the stored bits (k::find_non_finite) and keeps the first (piece number,
// element) in one device word. finish() waits until every queued piece has been sent, makes the
// backend's stream wait for every worker's stream (events), synchronises it and reads that word
// once: a non-finite value fails the load with the message of Checkpoint::stored_block (tensor name
// and element, the value read back from the file), as the host check did.
class Uploader {
 public:
  static constexpr size_t kStage = size_t{16} << 20;
  static constexpr int kMaxWorkers = 8;
  // Strided rows (column blocks) at least this long are read with one pread each.
  static constexpr size_t kPreadRowMin = size_t{64} << 10;

  Uploader(const Checkpoint& ck, cudaStream_t s, int threads) : ck_(ck), s_(s) {
    CUDA_CHECK(cudaGetDevice(&device_));
    context_ = error_context();
    const int n = std::clamp(threads, 1, kMaxWorkers);
    try {
      first_bad_.reserve(1);
      CUDA_CHECK(cudaMemsetAsync(first_bad_.get(), 0xff, sizeof(unsigned long long), s_));
      CUDA_CHECK(cudaStreamSynchronize(s_));  // before any worker's stream lowers it
      for (int i = 0; i < n; ++i) {
        auto w = std::make_unique<Worker>();
        CUDA_CHECK(cudaStreamCreateWithFlags(&w->stream, cudaStreamNonBlocking));
        for (cudaEvent_t& e : w->done)
          CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
        CUDA_CHECK(cudaEventCreateWithFlags(&w->joined, cudaEventDisableTiming));
        workers_.push_back(std::move(w));
      }
      for (auto& w : workers_) w->thread = std::thread([this, p = w.get()] { run(*p); });
    } catch (...) {
      shut_down();
      throw;
    }
  }
  Uploader(const Uploader&) = delete;
  Uploader& operator=(const Uploader&) = delete;
  // Drops what is still queued (the load failed) and joins the workers; each Worker then waits for
  // its stream before its buffers are freed.
  ~Uploader() { shut_down(); }

  // Rows [r0, r1) of a tensor's 2-D view into dst.
  void rows(const std::string& name, int64_t r0, int64_t r1, bf16_bits* dst) {
    upload(name, ck_.unchecked_rows(name, r0, r1), dst);
  }
  // The block rows [r0, r1) x columns [c0, c1) into dst (row-major, c1 - c0 wide).
  void block(const std::string& name, int64_t r0, int64_t r1, int64_t c0, int64_t c1,
             bf16_bits* dst) {
    upload(name, ck_.unchecked_block(name, r0, r1, c0, c1), dst);
  }
  // Waits until every piece queued so far is on the device; the backend's stream is ordered after
  // all of them. Rethrows the first error of a worker, then fails on the first non-finite value
  // of the pieces sent since the last finish().
  void finish() {
    {
      std::unique_lock<std::mutex> lock(m_);
      idle_cv_.wait(lock, [&] { return busy_ == 0; });
      if (error_) std::rethrow_exception(error_);
    }
    for (auto& w : workers_) {
      CUDA_CHECK(cudaEventRecord(w->joined, w->stream));
      CUDA_CHECK(cudaStreamWaitEvent(s_, w->joined, 0));
    }
    unsigned long long first_bad = 0;
    CUDA_CHECK(cudaMemcpyAsync(&first_bad, first_bad_.get(), sizeof first_bad,
                               cudaMemcpyDeviceToHost, s_));
    CUDA_CHECK(cudaStreamSynchronize(s_));
    if (first_bad != ~0ull) report_non_finite(first_bad);
    sent_.clear();  // piece numbers start again at 0; the device word is still ~0
  }

 private:
  // `rows` rows of `row_bytes` stored bytes (row r at src + r * pitch), packed into dst.
  struct Piece {
    std::string tensor;
    const char* src = nullptr;
    size_t pitch = 0, row_bytes = 0;
    int64_t rows = 0;
    DType dtype = DType::BF16;
    size_t elem_size = 2;
    bf16_bits* dst = nullptr;
    int64_t first_element = 0;  // in the slice, of the piece's first value (for the error)
    uint64_t number = 0;        // in sent_
  };
  struct Worker {
    std::thread thread;
    cudaStream_t stream = nullptr;
    cudaEvent_t done[2] = {nullptr, nullptr};  // after the last copy (and rounding) of each buffer
    cudaEvent_t joined = nullptr;              // recorded by finish()
    PinnedBuffer<char> pinned[2];              // allocated by the worker when it first needs them
    DeviceBuffer<char> scratch[2];             // f16/f32 pieces only
    int next = 0;
    ~Worker() {  // the thread has been joined; no throw from here
      if (stream) {
        cudaStreamSynchronize(stream);
        cudaStreamDestroy(stream);
      }
      for (cudaEvent_t e : {done[0], done[1], joined})
        if (e) cudaEventDestroy(e);
    }
  };

  void upload(const std::string& name, const StoredSlice& sl, bf16_bits* dst) {
    if (sl.bytes() == 0) return;
    const size_t es = sl.elem_size, row_bytes = static_cast<size_t>(sl.cols) * es;
    Piece p;
    p.tensor = name;
    p.dtype = sl.dtype;
    p.elem_size = es;
    if (sl.contiguous() || row_bytes > kStage) {
      // One byte range per row (contiguous: the whole slice), in stage-sized pieces.
      const int64_t ranges = sl.contiguous() ? 1 : sl.rows;
      const size_t range_bytes = sl.contiguous() ? sl.bytes() : row_bytes;
      for (int64_t r = 0; r < ranges; ++r) {
        for (size_t off = 0; off < range_bytes; off += kStage) {
          const size_t n = std::min(kStage, range_bytes - off), at = r * range_bytes + off;
          p.src = sl.data + r * sl.row_pitch + off;
          p.pitch = p.row_bytes = n;
          p.rows = 1;
          p.dst = dst + at / es;
          p.first_element = static_cast<int64_t>(at / es);
          enqueue(p);
        }
      }
      return;
    }
    // Strided rows (a column block): as many whole rows per piece as fit.
    const int64_t per = static_cast<int64_t>(kStage / row_bytes);
    for (int64_t r = 0; r < sl.rows; r += per) {
      p.src = sl.data + r * sl.row_pitch;
      p.pitch = sl.row_pitch;
      p.row_bytes = row_bytes;
      p.rows = std::min(per, sl.rows - r);
      p.dst = dst + r * sl.cols;
      p.first_element = r * sl.cols;
      enqueue(p);
    }
  }

  void enqueue(Piece p) {
    ck_.prefetch_stored(p.src, static_cast<size_t>(p.rows - 1) * p.pitch + p.row_bytes);
    {
      std::lock_guard<std::mutex> lock(m_);
      if (error_) std::rethrow_exception(error_);
      p.number = sent_.size();
      sent_.push_back(p);
      queue_.push_back(std::move(p));
      ++busy_;
    }
    work_cv_.notify_one();
  }

  // The InputError of the non-finite value that k::find_non_finite found: piece number in the high
  // 32 bits, element of the piece in the low 32. The value is read back from the mapped file.
  [[noreturn]] void report_non_finite(unsigned long long first_bad) const {
    const size_t number = static_cast<size_t>(first_bad >> 32);
    const int64_t i = static_cast<int64_t>(first_bad & 0xffffffffull);
    if (number >= sent_.size())
      throw RuntimeFailure("the device finite check reported piece " + std::to_string(number) +
                           " of " + std::to_string(sent_.size()));
    const Piece& p = sent_[number];
    const int64_t cols = static_cast<int64_t>(p.row_bytes / p.elem_size);
    float value;
    convert_to_f32(p.dtype, p.src + (i / cols) * p.pitch + (i % cols) * p.elem_size, 1, &value);
    ck_.throw_non_finite(p.tensor, value, static_cast<size_t>(p.first_element + i));
  }

  // A worker thread: takes pieces until shut_down. After an error it only drains the queue.
  void run(Worker& w) {
    set_error_context(context_);
    bool device_set = false;
    for (;;) {
      Piece p;
      bool skip = false;
      {
        std::unique_lock<std::mutex> lock(m_);
        work_cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
        if (queue_.empty()) return;  // stopping
        p = std::move(queue_.front());
        queue_.pop_front();
        skip = error_ != nullptr;
      }
      try {
        if (!skip) {
          if (!device_set) {
            CUDA_CHECK(cudaSetDevice(device_));  // a new thread starts on device 0
            device_set = true;
          }
          stage(w, p);
        }
      } catch (...) {
        std::lock_guard<std::mutex> lock(m_);
        if (!error_) error_ = std::current_exception();
      }
      std::lock_guard<std::mutex> lock(m_);
      if (--busy_ == 0) idle_cv_.notify_all();
    }
  }

  // Reads a piece into the worker's next buffer, sends it on the worker's stream and checks the
  // sent values there.
  void stage(Worker& w, const Piece& p) {
    const int b = w.next;
    w.next ^= 1;
    w.pinned[b].reserve(kStage);
    CUDA_CHECK(cudaEventSynchronize(w.done[b]));  // the buffer's last copy has been read
    char* buf = w.pinned[b].get();
    for (int64_t r = 0; r < p.rows; ++r) {
      const char* src = p.src + r * p.pitch;
      char* out = buf + r * p.row_bytes;
      if (p.rows == 1 || p.row_bytes >= kPreadRowMin)
        ck_.read_stored(src, p.row_bytes, out);
      else
        std::memcpy(out, src, p.row_bytes);
    }
    const size_t bytes = p.row_bytes * static_cast<size_t>(p.rows);
    const int64_t n = static_cast<int64_t>(bytes / p.elem_size);
    const uint64_t tag = static_cast<uint64_t>(p.number) << 32;
    if (p.dtype == DType::BF16) {
      CUDA_CHECK(cudaMemcpyAsync(p.dst, buf, bytes, cudaMemcpyHostToDevice, w.stream));
      k::find_non_finite(p.dst, n, 2, false, tag, first_bad_.get(), w.stream);
    } else {
      w.scratch[b].reserve(kStage);
      CUDA_CHECK(cudaMemcpyAsync(w.scratch[b].get(), buf, bytes, cudaMemcpyHostToDevice, w.stream));
      k::find_non_finite(w.scratch[b].get(), n, static_cast<int>(p.elem_size),
                         p.dtype == DType::F16, tag, first_bad_.get(), w.stream);
      if (p.dtype == DType::F16)
        k::f16_to_bf16(reinterpret_cast<const uint16_t*>(w.scratch[b].get()),
                       static_cast<int64_t>(bytes / 2), p.dst, w.stream);
      else
        k::f32_to_bf16(reinterpret_cast<const float*>(w.scratch[b].get()),
                       static_cast<int64_t>(bytes / 4), p.dst, w.stream);
    }
    CUDA_CHECK(cudaEventRecord(w.done[b], w.stream));
  }

  void shut_down() noexcept {
    {
      std::lock_guard<std::mutex> lock(m_);
      busy_ -= static_cast<int64_t>(queue_.size());
      queue_.clear();
      stop_ = true;
    }
    work_cv_.notify_all();
    for (auto& w : workers_)
      if (w->thread.joinable()) w->thread.join();
  }

  const Checkpoint& ck_;
  cudaStream_t s_;
  int device_ = 0;
  std::string context_;
  // (piece number << 32) + element of the first non-finite value, or ~0 (see finish()). Before the
  // workers: freed after their streams have finished.
  DeviceBuffer<unsigned long long> first_bad_;
  std::vector<std::unique_ptr<Worker>> workers_;
  std::mutex m_;
  std::condition_variable work_cv_, idle_cv_;
  std::deque<Piece> queue_;
  std::vector<Piece> sent_;  // every piece queued since the last finish(), by number
  int64_t busy_ = 0;         // pieces queued or being staged
  bool stop_ = false;
  std::exception_ptr error_;
};

// The stored bytes load_device_model reads for this plan (the total of its progress): every matrix
// of the shard (norm gains and biases are too small to count).
uint64_t planned_bytes(const Checkpoint& ck, const ShardPlan& plan, bool with_lm_head) {
  const ModelConfig& c = ck.config();
  const int64_t D = c.hidden_size, d = c.head_dim;
  uint64_t total = 0;
  auto add = [&](const std::string& name, int64_t elems) {
    const TensorInfo* t = ck.find(name);
    total += static_cast<uint64_t>(elems) * (t ? t->elem_size : 2);
  };
  const int64_t qkv_rows = (plan.local_heads() + 2 * plan.local_kv_heads()) * d;
  for (int64_t l = 0; l < c.num_layers; ++l) {
    auto name = [&](Role role) { return tensor_name(c, role, l, -1, &ck); };
    add(name(has_role(c, Role::kQkv) ? Role::kQkv : Role::kQ), qkv_rows * D);
    add(name(Role::kO), D * plan.local_heads() * d);
    if (c.is_moe_layer(l)) {
      const int64_t I = c.moe_intermediate_size;
      add(name(Role::kRouter), c.num_experts * D);
      for (int64_t e = plan.expert_begin; e < plan.expert_end; ++e) {
        if (c.family->gpt_oss_layout) {  // MXFP4: 16 bytes of blocks and 1 of scales per 32
          for (Role role : {Role::kExpertsGateUp, Role::kExpertsDown}) {
            const std::string t = tensor_name(c, role, l, -1, &ck);
            const int64_t n = (role == Role::kExpertsGateUp ? 2 : 1) * I * D;
            if (is_mxfp4_blocks(t))
              total += static_cast<uint64_t>(n / 32 * 17);
            else
              add(t, n);
          }
          continue;
        }
        const ExpertLocation loc = expert_location(ck, l, e);
        add(loc.gate.tensor, I * D);
        add(loc.up.tensor, I * D);
        add(loc.down.tensor, D * I);
      }
      if (c.has_shared_expert())
        add(name(Role::kSharedUp), 3 * c.shared_expert_intermediate_size * D);
    } else {
      add(name(Role::kMlpUp), (c.gated_mlp ? 3 : 2) * c.intermediate_size * D);
    }
  }
  if (with_lm_head)
    add(tensor_name(c, c.tie_word_embeddings ? Role::kEmbed : Role::kLmHead), c.vocab_size * D);
  return total;
}

// Per local head: M_h = W_O,h^T W_O,h in fp32 (bf16 products, fp32 sums), made exactly symmetric
// and split into hi + lo bf16 (the head write norm kernel reads rows of M as its columns).
void make_gram(DeviceLayer& L, const bf16_bits* wo, int64_t D, int64_t Hl, int64_t d, Blas& blas,
               cudaStream_t s) {
  const int64_t qw = Hl * d;
  // cudaMemcpy from pageable memory may return before its DMA lands, and the backend's stream does
  // not wait for the legacy stream: finish every upload before the Gram product reads W_O.
  CUDA_CHECK(cudaDeviceSynchronize());
  DeviceBuffer<float> m(static_cast<size_t>(Hl * d * d));
  L.gram_hi.reserve(static_cast<size_t>(Hl * d * d));
  L.gram_lo.reserve(static_cast<size_t>(Hl * d * d));
  blas.tn(d, d, D, {wo, Dt::kBF16, qw, d}, {wo, Dt::kBF16, qw, d}, {m.get(), Dt::kF32, d, d * d},
          1.f, 0.f, static_cast<int>(Hl));
  k::gram_split(m.get(), Hl, static_cast<int>(d), L.gram_hi.get(), L.gram_lo.get(), s);
  CUDA_CHECK(cudaStreamSynchronize(s));  // m is freed on return
}

}  // namespace

DeviceModel load_device_model(const Checkpoint& ck, const ShardPlan& plan, bool with_lm_head,
                              Blas& blas, cudaStream_t s, int threads,
                              const std::function<void(uint64_t, uint64_t)>& progress) {
  const ModelConfig& c = ck.config();
  const int64_t D = c.hidden_size, d = c.head_dim, Hl = plan.local_heads(),
                KVl = plan.local_kv_heads();
  const int64_t qw = Hl * d, kw = KVl * d;
  const uint64_t before = ck.weight_bytes_read();
  if (progress) {
    const uint64_t total = planned_bytes(ck, plan, with_lm_head);
    ck.set_read_observer(
        [&progress, before, total](uint64_t done) { progress(done - before, total); });
  }
  struct Reset {
    const Checkpoint& ck;
    ~Reset() { ck.set_read_observer({}); }
  } reset{ck};
  ck.set_read_threads(threads);  // the fp32 reads (norms, biases, routers)
  // The model before the uploader: an error unwinds the uploader first, which stops its threads
  // before the buffers they copy into are freed.
  DeviceModel w;
  Uploader up(ck, s, threads);
  w.layers.resize(static_cast<size_t>(c.num_layers));
  // A 1-D tensor's elements [b, e) as fp32 on the device, or nothing where the family or config has
  // no such tensor.
  auto vec = [&](Role role, int64_t l, int64_t b, int64_t e, DeviceBuffer<float>& dst,
                 bool present = true) {
    if (present && has_role(c, role))
      upload_f32(read_rows(ck, tensor_name(c, role, l, -1, &ck), b, e, 1), dst);
  };
  const bool layer_norm = c.norm == NormKind::kLayer;
  for (int64_t l = 0; l < c.num_layers; ++l) {
    DeviceLayer& L = w.layers[static_cast<size_t>(l)];
    // The family table names every tensor (check_cuda_supports refuses what the kernels do not
    // run).
    auto name = [&](Role role) { return tensor_name(c, role, l, -1, &ck); };
    vec(Role::kAttnNorm, l, 0, D, L.input_norm);
    vec(Role::kAttnNormBias, l, 0, D, L.input_norm_bias, layer_norm);
    vec(Role::kMlpNorm, l, 0, D, L.post_norm);
    vec(Role::kMlpNormBias, l, 0, D, L.post_norm_bias, layer_norm);
    vec(Role::kAttnOutNorm, l, 0, D, L.attn_out_norm);
    vec(Role::kMlpOutNorm, l, 0, D, L.mlp_out_norm);
    if (c.qk_norm == QkNormKind::kPerHead) {
      vec(Role::kQNorm, l, 0, d, L.q_norm);
      vec(Role::kKNorm, l, 0, d, L.k_norm);
    } else if (c.qk_norm == QkNormKind::kFullWidth) {
      vec(Role::kQNorm, l, plan.head_begin * d, plan.head_end * d, L.q_norm);
      vec(Role::kKNorm, l, plan.kv_begin * d, plan.kv_end * d, L.k_norm);
    }
    std::vector<float> qkv_bias;
    if (c.mla()) {
      load_mla(ck, plan, l, L);
    } else if (has_role(c, Role::kQkv)) {
      L.wqkv.reserve(static_cast<size_t>((qw + 2 * kw) * D));
      // GPT-NeoX: rows of query_key_value are [H, 3, d] (per head: q, k, v); no GQA.
      const std::string fused = name(Role::kQkv);
      for (int64_t h = plan.head_begin; h < plan.head_end; ++h)
        for (int64_t which = 0; which < 3; ++which)
          up.rows(fused, (3 * h + which) * d, (3 * h + which + 1) * d,
                  L.wqkv.get() + (which * qw + (h - plan.head_begin) * d) * D);
      if (c.qkv_bias) {
        const std::vector<float> all =
            read_rows(ck, name(Role::kQkvBias), 0, 3 * c.num_heads * d, 1);
        qkv_bias.resize(static_cast<size_t>(qw + 2 * kw));
        for (int64_t h = plan.head_begin; h < plan.head_end; ++h)
          for (int64_t which = 0; which < 3; ++which)
            std::copy_n(all.begin() + (3 * h + which) * d, d,
                        qkv_bias.begin() + which * qw + (h - plan.head_begin) * d);
      }
    } else {
      L.wqkv.reserve(static_cast<size_t>((qw + 2 * kw) * D));
      up.rows(name(Role::kQ), plan.head_begin * d, plan.head_end * d, L.wqkv.get());
      up.rows(name(Role::kK), plan.kv_begin * d, plan.kv_end * d, L.wqkv.get() + qw * D);
      up.rows(name(Role::kV), plan.kv_begin * d, plan.kv_end * d, L.wqkv.get() + (qw + kw) * D);
      if (c.qkv_bias) {
        for (auto [role, b, e] : {std::tuple{Role::kQBias, plan.head_begin, plan.head_end},
                                  std::tuple{Role::kKBias, plan.kv_begin, plan.kv_end},
                                  std::tuple{Role::kVBias, plan.kv_begin, plan.kv_end}}) {
          const std::vector<float> part = read_rows(ck, name(role), b * d, e * d, 1);
          qkv_bias.insert(qkv_bias.end(), part.begin(), part.end());
        }
      }
    }
    if (!qkv_bias.empty()) upload_f32(qkv_bias, L.qkv_bias);
    if (!c.mla()) {
      L.wo.reserve(static_cast<size_t>(D * qw));
      up.block(name(Role::kO), 0, D, plan.head_begin * d, plan.head_end * d, L.wo.get());
    }
    vec(Role::kOBias, l, 0, D, L.o_bias, c.o_bias);
    vec(Role::kSinks, l, plan.head_begin, plan.head_end, L.sinks, c.learned_sinks);
    up.finish();  // the products below read W_K and W_O
    // kconst = W_K beta_in + b_K: the part of the key at position 0 that no component writes.
    if (L.input_norm_bias.get() || !qkv_bias.empty()) {
      std::vector<float> kc(static_cast<size_t>(kw), 0.f);
      if (!qkv_bias.empty()) std::copy_n(qkv_bias.begin() + qw, kw, kc.begin());
      upload_f32(kc, L.kconst);
      if (L.input_norm_bias.get()) {
        DeviceBuffer<float> kb(static_cast<size_t>(kw));
        k::rows_times_wt(L.input_norm_bias.get(), 1, static_cast<int>(D), L.wqkv.get() + qw * D,
                         static_cast<int>(kw), D, kb.get(), s);
        k::add_inplace(L.kconst.get(), kb.get(), kw, s);
        CUDA_CHECK(cudaStreamSynchronize(s));  // kb is freed on return
      }
    }
    if (L.attn_out_norm.get()) {
      // Post-norm: the head writes as the block adds them are diag(gain) W_O z (times 1 / rms).
      L.wo_scaled.reserve(static_cast<size_t>(D * qw));
      k::scale_rows_bf16(L.wo.get(), D, static_cast<int>(qw), L.attn_out_norm.get(),
                         L.wo_scaled.get(), s);
      make_gram(L, L.wo_scaled.get(), D, Hl, d, blas, s);
    } else {
      make_gram(L, L.wo.get(), D, Hl, c.value_dim(), blas, s);
    }
    L.moe = c.is_moe_layer(l);
    if (L.moe) {
      const int64_t I = c.moe_intermediate_size, El = plan.local_experts();
      L.inter = I;
      const std::vector<float> wr = read_rows(ck, name(Role::kRouter), 0, c.num_experts, D);
      upload_f32(wr, L.router);
      upload_router_split(wr, c.num_experts, D, L.router_split);
      vec(Role::kRouterBias, l, 0, c.num_experts, L.router_bias, c.router_bias);
      if (c.router == RouterKind::kSigmoidGroupTopK)
        vec(Role::kRouterScoreBias, l, 0, c.num_experts, L.router_score_bias);
      L.w_gate_up.reserve(static_cast<size_t>(El * 2 * I * D));
      L.w_down.reserve(static_cast<size_t>(El * D * I));
      if (c.family->gpt_oss_layout) load_gpt_oss_experts(ck, plan, l, L);
      for (int64_t e = plan.expert_begin; e < plan.expert_end && !c.family->gpt_oss_layout; ++e) {
        const ExpertLocation loc = expert_location(ck, l, e);
        bf16_bits* gu = L.w_gate_up.get() + (e - plan.expert_begin) * 2 * I * D;
        matrix_rows(ck, up, loc.gate.tensor, loc.gate.row_begin, loc.gate.row_end, gu);
        matrix_rows(ck, up, loc.up.tensor, loc.up.row_begin, loc.up.row_end, gu + I * D);
        matrix_rows(ck, up, loc.down.tensor, loc.down.row_begin, loc.down.row_end,
                    L.w_down.get() + (e - plan.expert_begin) * D * I);
      }
      if (c.has_shared_expert()) {
        const int64_t S = c.shared_expert_intermediate_size;
        L.shared_inter = S;
        L.shared_gate_up.reserve(static_cast<size_t>(2 * S * D));
        L.shared_down.reserve(static_cast<size_t>(D * S));
        matrix_rows(ck, up, name(Role::kSharedGate), 0, S, L.shared_gate_up.get());
        matrix_rows(ck, up, name(Role::kSharedUp), 0, S, L.shared_gate_up.get() + S * D);
        matrix_rows(ck, up, name(Role::kSharedDown), 0, D, L.shared_down.get());
        if (has_role(c, Role::kSharedExpertGate))  // DeepSeek's shared experts have no gate
          upload_f32(read_rows(ck, name(Role::kSharedExpertGate), 0, 1, D), L.shared_gate);
      }
    } else {
      const int64_t I = c.intermediate_size;
      L.inter = I;
      const int64_t gates = c.gated_mlp ? 1 : 0;
      L.w_gate_up.reserve(static_cast<size_t>((1 + gates) * I * D));
      L.w_down.reserve(static_cast<size_t>(D * I));
      if (gates) matrix_rows(ck, up, name(Role::kMlpGate), 0, I, L.w_gate_up.get());
      matrix_rows(ck, up, name(Role::kMlpUp), 0, I, L.w_gate_up.get() + gates * I * D);
      matrix_rows(ck, up, name(Role::kMlpDown), 0, D, L.w_down.get());
      if (c.mlp_bias) {
        std::vector<float> b;
        if (gates) b = read_rows(ck, name(Role::kMlpGateBias), 0, I, 1);
        const std::vector<float> ub = read_rows(ck, name(Role::kMlpUpBias), 0, I, 1);
        b.insert(b.end(), ub.begin(), ub.end());
        upload_f32(b, L.mlp_bias);
        vec(Role::kMlpDownBias, l, 0, D, L.down_bias);
      }
    }
  }
  vec(Role::kFinalNorm, -1, 0, D, w.final_norm);
  vec(Role::kFinalNormBias, -1, 0, D, w.final_norm_bias, layer_norm);
  if (with_lm_head) {
    w.lm_head.reserve(static_cast<size_t>(c.vocab_size * D));
    up.rows(tensor_name(c, c.tie_word_embeddings ? Role::kEmbed : Role::kLmHead), 0, c.vocab_size,
            w.lm_head.get());
  }
  up.finish();
  w.bytes_loaded = ck.weight_bytes_read() - before;
  CUDA_CHECK(cudaDeviceSynchronize());  // every upload has landed before the stream reads it
  return w;
}

DeviceModel synthesize_device_model(const ModelConfig& c, const ShardPlan& plan, bool with_lm_head,
                                    uint64_t seed, Blas& blas, cudaStream_t s) {
  // Benchmarks only: the pre-norm RMSNorm SwiGLU block of Qwen3-MoE, Qwen3, Llama, Mixtral, OLMoE,
  // Qwen2-MoE, gpt-oss and DeepSeek-V3 (unit norm gains; attention, router and expert biases and
  // DeepSeek's selection bias zero; learned sinks ~ N(0, 1)).
  if (c.block != BlockKind::kPreNorm || c.norm != NormKind::kRms || c.mlp_bias || !c.gated_mlp ||
      (!c.mla() && c.rope.rotated(c.head_dim) != c.head_dim))
    throw InputError(
        "--synthetic-weights: " + c.model_type +
        " blocks are not synthesised on the device; write a checkpoint with `sinkscope "
        "synth` and analyze that");
  const int64_t D = c.hidden_size, d = c.head_dim, H = c.num_heads;
  const int64_t Hl = plan.local_heads(), KVl = plan.local_kv_heads(), qw = Hl * d, kw = KVl * d;
  DeviceModel w;
  uint64_t bytes = 0;
  auto tensor_id = [](int64_t layer, int64_t kind, int64_t expert) {
    return static_cast<uint64_t>(((layer + 1) * 16 + kind) * 1000003 + expert);
  };
  // rows x cols block at (row0, col0) of a [*, global_cols] tensor, std 1/sqrt(fan_in).
  auto random_bf16 = [&](bf16_bits* dst, int64_t rows, int64_t cols, int64_t row0, int64_t col0,
                         int64_t global_cols, uint64_t id, int64_t fan_in) {
    k::fill_random_bf16(dst, rows, cols, row0, col0, global_cols, seed, id,
                        1.f / std::sqrt(static_cast<float>(fan_in)), s);
    bytes += static_cast<uint64_t>(rows * cols) * 2;
  };
  auto ones = [&](DeviceBuffer<float>& b, int64_t n) {
    b.reserve(static_cast<size_t>(n));
    k::fill(b.get(), n, 1.f, s);
  };
  auto zeros = [&](DeviceBuffer<float>& b, int64_t n) {
    b.reserve(static_cast<size_t>(n));
    k::fill(b.get(), n, 0.f, s);
  };
  // One replicated SwiGLU MLP of width I: gate | up [2I, D], down [D, I].
  auto random_mlp = [&](DeviceBuffer<bf16_bits>& gate_up, DeviceBuffer<bf16_bits>& down, int64_t I,
                        uint64_t id_gate_up, uint64_t id_down) {
    gate_up.reserve(static_cast<size_t>(2 * I * D));
    down.reserve(static_cast<size_t>(D * I));
    random_bf16(gate_up.get(), 2 * I, D, 0, 0, D, id_gate_up, D);
    random_bf16(down.get(), D, I, 0, 0, I, id_down, I);
  };
  w.layers.resize(static_cast<size_t>(c.num_layers));
  for (int64_t l = 0; l < c.num_layers; ++l) {
    DeviceLayer& L = w.layers[static_cast<size_t>(l)];
    ones(L.input_norm, D);
    ones(L.post_norm, D);
    const bool full_width = c.qk_norm == QkNormKind::kFullWidth;
    if (c.mla()) {  // latent attention: [q_a ; kv_a], q_b (or q_proj), kv_b, the latent norms
      const int64_t Rq = c.mla_q_rank, Rkv = c.mla_kv_rank, ra = Rkv + c.qk_rope_dim,
                    dkv = c.qk_nope_dim + c.v_head_dim, dv = c.v_head_dim;
      L.mla_a.reserve(static_cast<size_t>((Rq + ra) * D));
      random_bf16(L.mla_a.get(), Rq + ra, D, 0, 0, D, tensor_id(l, 12, 0), D);
      if (Rq > 0) ones(L.mla_q_a_norm, Rq);
      ones(L.mla_kv_a_norm, Rkv);
      const int64_t qin = Rq > 0 ? Rq : D;
      L.mla_q.reserve(static_cast<size_t>(qw * qin));
      random_bf16(L.mla_q.get(), qw, qin, plan.head_begin * d, 0, qin, tensor_id(l, 13, 0), qin);
      L.mla_kv_b.reserve(static_cast<size_t>(Hl * dkv * Rkv));
      random_bf16(L.mla_kv_b.get(), Hl * dkv, Rkv, plan.head_begin * dkv, 0, Rkv,
                  tensor_id(l, 14, 0), Rkv);
      L.wo.reserve(static_cast<size_t>(D * Hl * dv));
      random_bf16(L.wo.get(), D, Hl * dv, 0, plan.head_begin * dv, H * dv, tensor_id(l, 3, 0),
                  H * dv);
      make_gram(L, L.wo.get(), D, Hl, dv, blas, s);
    } else {
      ones(L.q_norm, full_width ? qw : d);
      ones(L.k_norm, full_width ? kw : d);
      L.wqkv.reserve(static_cast<size_t>((qw + 2 * kw) * D));
      random_bf16(L.wqkv.get(), qw, D, plan.head_begin * d, 0, D, tensor_id(l, 0, 0), D);
      random_bf16(L.wqkv.get() + qw * D, kw, D, plan.kv_begin * d, 0, D, tensor_id(l, 1, 0), D);
      random_bf16(L.wqkv.get() + (qw + kw) * D, kw, D, plan.kv_begin * d, 0, D, tensor_id(l, 2, 0),
                  D);
      L.wo.reserve(static_cast<size_t>(D * qw));
      random_bf16(L.wo.get(), D, qw, 0, plan.head_begin * d, H * d, tensor_id(l, 3, 0), H * d);
      make_gram(L, L.wo.get(), D, Hl, d, blas, s);
    }
    if (c.qkv_bias) zeros(L.qkv_bias, qw + 2 * kw);
    if (c.o_bias) zeros(L.o_bias, D);
    if (c.learned_sinks) {
      L.sinks.reserve(static_cast<size_t>(Hl));
      k::fill_random_f32(L.sinks.get(), 1, Hl, 0, plan.head_begin, H, seed, tensor_id(l, 11, 0),
                         1.f, s);
    }
    L.moe = c.is_moe_layer(l);
    if (L.moe) {
      const int64_t I = c.moe_intermediate_size, E = c.num_experts, El = plan.local_experts();
      L.inter = I;
      // bf16 values, as checkpoints store routers: the product takes the tensor-core route.
      DeviceBuffer<bf16_bits> wr(static_cast<size_t>(E * D));
      k::fill_random_bf16(wr.get(), E, D, 0, 0, D, seed, tensor_id(l, 4, 0),
                          1.f / std::sqrt(static_cast<float>(D)), s);
      L.router.reserve(static_cast<size_t>(E * D));
      k::bf16_to_f32(wr.get(), E * D, L.router.get(), s);
      L.router_split.reserve(static_cast<size_t>(E * 2 * D));
      for (int64_t half = 0; half < 2; ++half)
        CUDA_CHECK(cudaMemcpy2DAsync(L.router_split.get() + half * D, 2 * D * sizeof(bf16_bits),
                                     wr.get(), D * sizeof(bf16_bits), D * sizeof(bf16_bits), E,
                                     cudaMemcpyDeviceToDevice, s));
      CUDA_CHECK(cudaStreamSynchronize(s));  // wr is freed here
      if (c.router_bias) zeros(L.router_bias, E);
      if (c.router == RouterKind::kSigmoidGroupTopK) zeros(L.router_score_bias, E);
      if (c.has_shared_expert()) {
        L.shared_inter = c.shared_expert_intermediate_size;
        random_mlp(L.shared_gate_up, L.shared_down, L.shared_inter, tensor_id(l, 15, 0),
                   tensor_id(l, 15, 1));
        if (has_role(c, Role::kSharedExpertGate)) {
          L.shared_gate.reserve(static_cast<size_t>(D));
          k::fill_random_f32(L.shared_gate.get(), 1, D, 0, 0, D, seed, tensor_id(l, 15, 2),
                             1.f / std::sqrt(static_cast<float>(D)), s);
        }
      }
      if (c.expert_bias) {
        zeros(L.expert_gate_up_bias, El * 2 * I);
        zeros(L.expert_down_bias, El * D);
      }
      L.w_gate_up.reserve(static_cast<size_t>(El * 2 * I * D));
      L.w_down.reserve(static_cast<size_t>(El * D * I));
      for (int64_t e = 0; e < El; ++e) {
        const int64_t ge = plan.expert_begin + e;
        random_bf16(L.w_gate_up.get() + e * 2 * I * D, 2 * I, D, 0, 0, D, tensor_id(l, 5, ge), D);
        random_bf16(L.w_down.get() + e * D * I, D, I, 0, 0, I, tensor_id(l, 6, ge), I);
      }
    } else {
      L.inter = c.intermediate_size;
      random_mlp(L.w_gate_up, L.w_down, L.inter, tensor_id(l, 7, 0), tensor_id(l, 8, 0));
    }
  }
  ones(w.final_norm, D);
  w.embed.reserve(static_cast<size_t>(c.vocab_size * D));
  k::fill_random_bf16(w.embed.get(), c.vocab_size, D, 0, 0, D, seed, tensor_id(-1, 9, 0), 1.f, s);
  bytes += static_cast<uint64_t>(c.vocab_size * D) * 2;
  if (with_lm_head) {
    w.lm_head.reserve(static_cast<size_t>(c.vocab_size * D));
    random_bf16(w.lm_head.get(), c.vocab_size, D, 0, 0, D, tensor_id(-1, 10, 0), D);
  }
  CUDA_CHECK(cudaDeviceSynchronize());
  w.bytes_loaded = bytes;
  return w;
}

}  // namespace sinkscope::cuda
