// The CUDA backend's scratch as one planned workspace (docs/gpu-backend.md, "Workspace"): every
// device buffer a micro-batch uses, sized before the run from its shape (B probes x T positions),
// the model, this rank's shard and whether it records (Workspace::plan), rather than grown kernel
// by kernel. Only the buffers whose size depends on where the router sends tokens grow at routing
// time: the expert exchange's received rows and the expert products over them (marked "routing").
// No kernels here; the sizes of the kernels' own scratch come from their launchers.
#pragma once

#include <cstdint>

#include "cuda/device_buffer.hpp"
#include "sinkscope/config.hpp"
#include "sinkscope/shard_plan.hpp"

namespace sinkscope::cuda {

struct Workspace {
  // Residual stream, embedding and the block inputs.
  DeviceBuffer<float> x;              // [BT, D] the residual stream
  DeviceBuffer<float> xpar;           // [BT, D] a parallel block's layer input (the MLP reads it)
  DeviceBuffer<int32_t> tokens;       // [BT]
  DeviceBuffer<bf16_bits> u;          // [BT, D] a block's normed input
  DeviceBuffer<float> u32;            // [BT, D] the same in fp32 (router, shared-expert gate)
  DeviceBuffer<bf16_bits> u_split;    // [BT, 2D] its lower bf16 parts (the tensor-core router)
  DeviceBuffer<float> inv_rx;         // [BT] 1 / the input norm's scale
  DeviceBuffer<float> rnorms, norms;  // [BT] ||x|| and ||m|| per row
  // Attention.
  DeviceBuffer<float> qkv;                   // [BT, q | k | v] fp32
  DeviceBuffer<bf16_bits> Qa, Ka, Va, Vt;    // attention operands (Vt: the wgmma kernel's V^T)
  DeviceBuffer<bf16_bits> z, zs;             // [BT, Hl d] attention output (zs: post-norm scaled)
  DeviceBuffer<float> a0, a0_mean;           // [B, Hl, T] A[i, 0]; [B, Hl] its mean
  DeviceBuffer<float> sink_mass, sink_mean;  // the same for a learned sink's mass (gpt-oss)
  DeviceBuffer<float> tp_pack;               // [BT D + B H 2 D] o_proj output + head rows
  DeviceBuffer<float> fw_sums, inv_rk_rows, out_scale;  // full-width q/k norm; post-norm scales
  // Latent attention: [q_a | kv_a] [BT, Rq + Rkv + rope], kv_b's output [BT, Hl (nope + dv)] in
  // fp32, the normed latent query and latent in bf16, the latent's 1 / rms per row.
  DeviceBuffer<float> mla_a32, mla_kv, inv_rl;
  DeviceBuffer<bf16_bits> mla_q16, mla_lat16;
  // Recording and the circuit attribution.
  DeviceBuffer<float> delta, p0_sum;  // [B, Ctot, D] component deltas; [B, D] position-0 sum
  DeviceBuffer<float> partial, colmean, qbar, zbar, wp0, wrest, norm_partial;
  DeviceBuffer<float> wkg, G, idrows, kid, k0m, k0s, qk, attr;
  DeviceBuffer<float> median;
  DeviceBuffer<uint8_t> median_scratch;
  // MLP / MoE.
  DeviceBuffer<float> mbuf;  // [BT D + 2 B S D + B S + B E + E]: m and its bookkeeping
  DeviceBuffer<float> router_logits, tw, gap, pos_w, rest_scratch, hf, shared_out;
  DeviceBuffer<int32_t> ids, pos_tok, ipack, cnt_dev, off_dev, sort_scratch, shared_pack;
  DeviceBuffer<bf16_bits> out;  // [n K, D] the expert outputs in source order
  // Routing: sized where the routing is known (grow-only).
  DeviceBuffer<bf16_bits> xg, xr, out2, h, act;
  DeviceBuffer<int32_t> gemm_gu_dev, gemm_dn_dev, tile_base;
  DeviceBuffer<float> rest_tiles;  // recording: the down product's per-tile rest sums (RestTap)
  DeviceBuffer<int32_t> expert_groups;  // experts with biases: the groups' first rows, experts
  DeviceBuffer<float> hf_experts;       // ... and their fp32 products [rows, max(2I, D)]
  // Logits (tests): [BT, V].
  DeviceBuffer<float> logits;

  // Reserves every buffer above except the routing ones for a micro-batch of B x T on this rank
  // (tp_size ranks share its tokens in the MLP); buffers only grow, so planning the largest
  // micro-batch once covers the rest.
  void plan(const ModelConfig& c, const ShardPlan& p, int tp_size, int64_t B, int64_t T,
            bool record, bool logits);
};

}  // namespace sinkscope::cuda
