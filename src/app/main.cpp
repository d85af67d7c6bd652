// sinkscope: one binary, CLI11 subcommands (docs/schema.md "Command line").
// Error policy: library code throws; this file catches once, prints one line and exits
// 1 (bad input) or 2 (runtime failure; every MPI rank is taken down so no job hangs).
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <limits>
#include <map>

#include "app/progress.hpp"
#include "sinkscope/analyze.hpp"
#include "sinkscope/build_config.hpp"
#include "sinkscope/checkpoint.hpp"
#include "sinkscope/comm.hpp"
#include "sinkscope/error.hpp"
#include "sinkscope/family.hpp"
#include "sinkscope/io.hpp"
#include "sinkscope/limits.hpp"
#include "sinkscope/model.hpp"
#include "sinkscope/placement.hpp"
#include "sinkscope/plan.hpp"
#include "sinkscope/probes.hpp"
#include "sinkscope/shard_plan.hpp"
#include "sinkscope/sweep.hpp"
#include "sinkscope/synth.hpp"

namespace fs = std::filesystem;
using namespace sinkscope;

namespace {

struct ProbeArgs {
  std::string tokens, probes;
  bool prepend_bos_given = false;
  int64_t prepend_bos = 0;
  bool allow_special_tokens = false;
};

struct CommonArgs {
  int tp = 1, ep = 1, etp = 0;
  std::string ep_placement = "any";  // placement over nodes (include/sinkscope/placement.hpp)
  bool allow_tp_across_nodes = false;
  std::string device = "cpu";
  double eps = 0.3;
  bool per_query = false;
  std::string ablate;
  bool causal_profile = false;
  int64_t batch = 4;
  int threads = 1;
  int64_t rank_timeout = kDefaultRankTimeoutSeconds;
  bool verbose = false, quiet = false;
  // Provenance for the output files: the command as run, every option with its value.
  std::string command_line, options;
};

void add_probe_options(CLI::App* app, ProbeArgs& p) {
  auto* tok = app->add_option(
      "--tokens", p.tokens,
      "probe tokens: .npy int32/int64 [N, T] or .h5 with /tokens (one of --tokens/--probes is "
      "required)");
  auto* pr = app->add_option(
      "--probes", p.probes,
      "generated probes: random:N:T:SEED or repeat:N:T:TOKEN (one of --tokens/--probes is "
      "required)");
  tok->excludes(pr);
  app->add_option_function<int64_t>(
      "--prepend-bos",
      [&p](const int64_t& id) {
        p.prepend_bos = id;
        p.prepend_bos_given = true;
      },
      "put token ID in front of every probe (BOS on/off controls)");
  app->add_flag("--allow-special-tokens", p.allow_special_tokens,
                "random probes may contain the model's bos/eos/pad ids and the --prepend-bos id");
}

void add_common_options(CLI::App* app, CommonArgs& c) {
  app->add_option("--tp", c.tp, "tensor-parallel ranks (attention heads)")
      ->check(CLI::PositiveNumber);
  app->add_option("--ep", c.ep, "expert-parallel ranks (experts)")->check(CLI::PositiveNumber);
  app->add_option("--etp", c.etp,
                  "expert tensor-parallel ranks (slices of each expert; default: tp where it fits)")
      ->check(CLI::PositiveNumber);
  app->add_option("--ep-placement", c.ep_placement,
                  "expert groups inside one node, across nodes, or any (multi-node jobs)")
      ->capture_default_str();
  app->add_flag("--allow-tp-across-nodes", c.allow_tp_across_nodes,
                "run even when a tp group would span nodes (slow: tp all-reduces every layer)");
  app->add_option("--device", c.device, "cpu or cuda");
  app->add_option("--eps", c.eps, "sink threshold on the sink score, in (0, 1)")
      ->check(CLI::Validator(
          [](const std::string& text) {
            const double eps = std::strtod(text.c_str(), nullptr);
            return eps > 0 && eps < 1 ? std::string() : "must lie strictly between 0 and 1";
          },
          "(0,1)"));
  app->add_flag("--per-query", c.per_query, "also write attention/p0_per_query");
  app->add_option("--ablate", c.ablate, "causal ablations: layers=A-B, top=K or search[:K]");
  app->add_option("--batch", c.batch, "probes per forward micro-batch")
      ->check(CLI::Range(int64_t{1}, kMaxBatch));
  app->add_option("--threads", c.threads,
                  "CPU threads per rank for the CPU forward; the checkpoint load on either device "
                  "uses this or OpenMP's thread count (OMP_NUM_THREADS), whichever is more (the "
                  "CUDA load stages on up to 8)")
      ->check(CLI::Range(1, kMaxThreads));
  app->add_option("--rank-timeout", c.rank_timeout,
                  "end the job when a rank is silent this many seconds in a collective (0: never)")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{0}, kMaxRankTimeoutSeconds));
  app->add_flag(
      "--verbose", c.verbose,
      "log the shard plan, bytes read and load time (whole and weights alone) per rank, "
      "the CUDA kernels taken; sweeps: read, compute and read-ahead times per checkpoint");
  app->add_flag("--quiet", c.quiet, "no progress output");
}

// The probe matrix every rank agrees on (each rank reads the same file).
IntArray load_probes(const ProbeArgs& p, const std::string& config_json, std::string* source,
                     const std::string& model_dir) {
  IntArray t;
  if (p.tokens.empty() && p.probes.empty())
    throw InputError("give the probes with --tokens FILE or --probes SPEC");
  // config.json only when it is needed here (the checkpoint is checked whole later).
  int64_t vocab_size = 0;
  if (!p.probes.empty() || p.prepend_bos_given) {
    vocab_size = parse_model_config(config_json).vocab_size;
  }
  if (p.prepend_bos_given && (p.prepend_bos < 0 || p.prepend_bos >= vocab_size))
    throw InputError("--prepend-bos " + std::to_string(p.prepend_bos) +
                     ": not a token id of the model (0 to vocab_size - 1 = " +
                     std::to_string(vocab_size - 1) + ")");
  if (!p.tokens.empty()) {
    t = load_tokens(p.tokens);
    *source = p.tokens;
  } else {
    // Contract 1.2: random probes avoid the model's special tokens and the prepended id.
    std::vector<int32_t> excluded;
    if (!p.allow_special_tokens) {
      if (!model_dir.empty()) excluded = special_token_ids(model_dir);
      if (p.prepend_bos_given && p.prepend_bos <= INT32_MAX)
        excluded.push_back(static_cast<int32_t>(p.prepend_bos));
    }
    t = make_probes(p.probes, vocab_size, excluded);
    *source = "--probes " + p.probes;
  }
  if (p.prepend_bos_given) {
    check_token_count(t.shape[0], t.shape[1] + 1, *source + " with --prepend-bos");
    // vocab_size is an int64 of config.json: the id also has to fit the int32 token type.
    if (p.prepend_bos > INT32_MAX)
      throw InputError("--prepend-bos " + std::to_string(p.prepend_bos) + ": does not fit int32");
    t = prepend_bos(t, static_cast<int32_t>(p.prepend_bos));
  }
  return t;
}

AnalyzeOptions analyze_options(const CommonArgs& c) {
  AnalyzeOptions o;
  o.tp = c.tp;
  o.ep = c.ep;
  o.etp = c.etp;
  o.ep_placement = c.ep_placement;
  o.allow_tp_across_nodes = c.allow_tp_across_nodes;
  o.device = c.device;
  o.eps = c.eps;
  o.per_query = c.per_query;
  o.ablate = c.ablate;
  o.causal_profile = c.causal_profile;
  o.batch = c.batch;
  o.threads = c.threads;
  o.verbose = c.verbose;
  o.log_layout = !c.quiet;
  o.command_line = c.command_line;
  o.options = c.options;
  if (!c.quiet) {
    // One forward pass over every probe per component: minutes each on a large model.
    o.ablation_progress = [](int64_t done, int64_t total, const std::string& component) {
      std::cerr << "sinkscope: ablation " << done << "/" << total << ": " << component << "\n";
    };
  }
  return o;
}

// Options checked before any work: the output (check_output_path) and the syntax of --ablate
// (its layer range is checked against config.json later), so a sweep fails at once instead of
// once per checkpoint.
void check_common_options(const CommonArgs& c) {
  parse_ablate(c.ablate, std::numeric_limits<int64_t>::max());
}

int cmd_analyze(const std::string& model, const std::string& model_config, int64_t synthetic_seed,
                const ProbeArgs& pa, const CommonArgs& ca, const std::string& out, int64_t step,
                const Comm& world) {
  IntArray tokens;
  AnalyzeOptions o = analyze_options(ca);
  if (model.empty() && model_config.empty())
    throw InputError("analyze: give --model DIR (or --model-config FILE --synthetic-weights SEED)");
  if (!model_config.empty() && synthetic_seed < 0)
    throw InputError("--model-config needs --synthetic-weights SEED");
  o.model = model;
  o.model_config = model_config;
  o.synthetic_seed = synthetic_seed;
  o.step = step >= 0 ? step : step_from_name(model);
  o.prepend_bos = pa.prepend_bos_given ? pa.prepend_bos : -1;
  run_agreed(world, [&] {
    if (world.rank() == 0) check_output_path(out, "--out ");
    check_common_options(ca);
    tokens =
        load_probes(pa, model.empty() ? model_config : (fs::path(model) / "config.json").string(),
                    &o.tokens_source, model);
  });
  Progress progress("analyze " + fs::path(model).filename().string(),
                    world.rank() == 0 && !ca.quiet);
  o.progress = [&](int64_t done, int64_t total) { progress.update(done, total); };
  Progress loading("load " + fs::path(model).filename().string(), world.rank() == 0 && !ca.quiet);
  if (loading.tty() && world.rank() == 0 && !ca.quiet)
    o.load_progress = [&](uint64_t done, uint64_t total) { loading.update_bytes(done, total); };
  AnalyzeOptions::Timings timings;
  o.timings = &timings;
  Analysis a = analyze_checkpoint(o, tokens, world);
  if (ca.verbose && world.rank() == 0 && !model.empty())
    std::cerr << std::fixed << std::setprecision(3) << "sinkscope: load " << timings.read_seconds
              << " s (" << timings.bytes_read / 1e9 << " GB, "
              << timings.bytes_read / 1e9 / std::max(timings.read_seconds, 1e-9)
              << " GB/s; weights alone " << timings.weight_load_seconds << " s, "
              << timings.bytes_read / 1e9 / std::max(timings.weight_load_seconds, 1e-9)
              << " GB/s), compute " << timings.compute_seconds << " s" << std::defaultfloat
              << std::setprecision(6) << "\n";
  if (world.rank() == 0) {
    write_analysis(out, a);
    if (!ca.quiet) {
      std::cerr << "sinkscope: wrote " << out << " (sink_rate " << std::setprecision(3)
                << a.meta.sink_rate << ", first2_share " << a.first2_share << ", peak layer "
                << a.peak_layer;
      if (a.has_causal_profile())
        std::cerr << "; causal first2_share " << a.causal_first2_share << ", causal peak layer "
                  << a.causal_peak_layer;
      if (!a.search_effect.empty())
        std::cerr << "; search: " << a.search_selected << " components carry "
                  << 100 * a.search_share << "% of the drop";
      std::cerr << ")\n";
    }
  }
  return 0;
}

// Checks, before any checkpoint is analysed, what would otherwise fail once per checkpoint: every
// config.json reads, all checkpoints have one model shape (naming the first two that differ), and
// the parallel layout fits the world.
void check_sweep_up_front(const std::vector<SweepCheckpoint>& cps, const CommonArgs& ca,
                          const Comm& world, const NodeMap& nodes) {
  std::vector<ModelConfig> configs;
  for (const SweepCheckpoint& cp : cps)
    configs.push_back(parse_model_config((fs::path(cp.dir) / "config.json").string()));
  auto shape = [](const ModelConfig& c) {
    return "layers " + std::to_string(c.num_layers) + ", hidden " + std::to_string(c.hidden_size) +
           ", heads " + std::to_string(c.num_heads) + "/" + std::to_string(c.num_kv_heads) +
           ", head_dim " + std::to_string(c.head_dim) + ", experts " +
           std::to_string(c.num_experts) + ", vocab " + std::to_string(c.vocab_size);
  };
  for (size_t i = 1; i < configs.size(); ++i)
    if (shape(configs[i]) != shape(configs[0]))
      throw InputError("checkpoints of different model shapes in one sweep: " + cps[0].dir + " (" +
                       shape(configs[0]) + ") and " + cps[i].dir + " (" + shape(configs[i]) + ")");
  const int etp = ca.etp > 0 ? ca.etp : (ca.device == "cuda" ? 1 : 0);
  PlacementOptions placing;
  placing.ep = parse_ep_placement(ca.ep_placement);
  placing.allow_tp_across_nodes = ca.allow_tp_across_nodes;
  make_placed_plan(nodes, world.rank(), ca.tp, ca.ep, configs.front(), etp, placing);
}

struct SweepArgs {
  bool resume = false, assemble_only = false, no_assemble = false;
  double tau = 0.05;
  int64_t bootstrap = 200, bootstrap_seed = 0;
  std::string convergence_profile = "causal";
  bool no_causal_profile = false;
  std::vector<int64_t> steps;
  std::string failed_list;
  double prefetch_gb = -1;  // < 0: default_prefetch_bytes()
};

int cmd_sweep(const std::vector<std::string>& models, const std::string& glob, const ProbeArgs& pa,
              const CommonArgs& ca, const std::string& outdir, const SweepArgs& sa,
              const Comm& world) {
  const bool resume = sa.resume, assemble_only = sa.assemble_only;
  const double tau = sa.tau;
  const std::vector<int64_t>& steps = sa.steps;
  std::vector<SweepCheckpoint> cps;
  IntArray tokens;
  std::string source;
  // The job's nodes, once for every checkpoint (collective: before the checks).
  const NodeMap nodes = discover_nodes(world);
  run_agreed(world, [&] {
    cps = list_checkpoints(models, glob, steps);
    if (!assemble_only) check_sweep_up_front(cps, ca, world, nodes);
    if (world.rank() == 0) {
      std::error_code ec;
      fs::create_directories(fs::path(outdir) / "checkpoints", ec);
      if (ec) throw InputError("--out " + outdir + ": cannot create folder (" + ec.message() + ")");
      if (!sa.no_assemble) check_output_path((fs::path(outdir) / "sweep.h5").string(), "--out ");
      if (!assemble_only)
        for (const auto& cp : cps)
          check_output_path((fs::path(outdir) / "checkpoints" / (cp.name + ".h5")).string(),
                            "--out ");
      if (!sa.failed_list.empty()) check_output_path(sa.failed_list, "--failed-list ");
    }
    check_common_options(ca);
    if (!assemble_only)
      tokens = load_probes(pa, (fs::path(cps.front().dir) / "config.json").string(), &source,
                           cps.front().dir);
  });
  std::vector<std::string> failed;
  if (!assemble_only) {
    const std::string sha = tokens_sha256(tokens);
    // While checkpoint i is analysed, checkpoint i + 1's files are read into the page cache.
    const uint64_t prefetch_bytes =
        sa.prefetch_gb < 0 ? default_prefetch_bytes()
                           : static_cast<uint64_t>(sa.prefetch_gb * double(uint64_t{1} << 30));
    Prefetcher prefetcher(prefetch_bytes);
    const auto sweep_start = std::chrono::steady_clock::now();
    double read_total = 0, compute_total = 0, prefetch_total = 0, overlap_total = 0;
    uint64_t prefetched_bytes = 0;
    for (size_t i = 0; i < cps.size(); ++i) {
      const auto& cp = cps[i];
      const std::string path = (fs::path(outdir) / "checkpoints" / (cp.name + ".h5")).string();
      // --resume: rank 0 decides whether this checkpoint is done, everyone follows.
      std::string skip = "0";
      if (resume && world.rank() == 0) {
        std::string why;
        try {
          const ModelConfig c = parse_model_config((fs::path(cp.dir) / "config.json").string());
          if (analysis_file_matches(path, sha, c, &why))
            skip = "1";
          else if (why != "missing" && !ca.quiet)
            std::cerr << "sinkscope: redoing " << cp.name << ": " << why << "\n";
        } catch (const InputError&) {
        }
      }
      world.broadcast_bytes(&skip, 0);
      if (skip == "1") {
        if (world.rank() == 0 && !ca.quiet)
          std::cerr << "sinkscope: [" << i + 1 << "/" << cps.size() << "] " << cp.name
                    << ": done already, skipped\n";
        continue;
      }
      AnalyzeOptions o = analyze_options(ca);
      o.nodes = &nodes;
      o.causal_profile = !sa.no_causal_profile;  // on in sweeps (contract 1.2)
      o.model = cp.dir;
      o.step = cp.step;
      o.tokens_source = source;
      o.prepend_bos = pa.prepend_bos_given ? pa.prepend_bos : -1;
      Progress progress(
          "[" + std::to_string(i + 1) + "/" + std::to_string(cps.size()) + "] " + cp.name,
          world.rank() == 0 && !ca.quiet);
      o.progress = [&](int64_t done, int64_t total) { progress.update(done, total); };
      Progress loading(
          "[" + std::to_string(i + 1) + "/" + std::to_string(cps.size()) + "] load " + cp.name,
          world.rank() == 0 && !ca.quiet);
      if (loading.tty() && world.rank() == 0 && !ca.quiet)
        o.load_progress = [&](uint64_t done, uint64_t total) { loading.update_bytes(done, total); };
      AnalyzeOptions::Timings timings;
      o.timings = &timings;
      const bool prefetch_next = prefetch_bytes > 0 && i + 1 < cps.size();
      if (prefetch_next) o.on_loaded = [&] { prefetcher.start(cps[i + 1].dir); };
      const auto cp_start = std::chrono::steady_clock::now();
      bool analysed = false;
      double analysis_end = 0;
      auto report_timing = [&] {
        const double wall =
            analysis_end - std::chrono::duration<double>(cp_start.time_since_epoch()).count();
        read_total += timings.read_seconds;
        compute_total += timings.compute_seconds;
        if (!ca.verbose || world.rank() != 0) return;
        std::cerr << std::fixed << std::setprecision(2) << "sinkscope: [" << i + 1 << "/"
                  << cps.size() << "] " << cp.name << ": wall " << wall << " s, read "
                  << timings.read_seconds << " s (" << timings.bytes_read / 1e9 << " GB, "
                  << timings.bytes_read / 1e9 / std::max(timings.read_seconds, 1e-9)
                  << " GB/s), compute " << timings.compute_seconds << " s";
        if (prefetch_next) {
          // The next checkpoint's reading so far, and how much of it ran during this one.
          const Prefetcher::Stats st = prefetcher.last();
          std::cerr << "; next checkpoint read ahead: " << st.bytes / 1e9 << " GB in " << st.seconds
                    << " s, overlap "
                    << std::max(0.0, std::min(st.ended, analysis_end) - st.started) << " s";
        }
        std::cerr << std::defaultfloat << std::setprecision(6) << "\n";
      };
      try {
        struct End {
          double& t;
          ~End() {
            t = std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
                    .count();
          }
        } end{analysis_end};
        Analysis a = analyze_checkpoint(o, tokens, world);
        if (world.rank() == 0) write_analysis(path, a);
        analysed = true;
      } catch (const InputError& e) {
        if (!e.agreed) throw;
        // A bad checkpoint does not stop the sweep; it is listed and the exit status says so.
        if (world.rank() == 0) std::cerr << "sinkscope: error: " << e.what() << "\n";
        failed.push_back(cp.name);
      }
      if (prefetch_next) {
        // Overlap: the part of the next checkpoint's read-ahead that ran while this one was being
        // analysed (it keeps running into the next load otherwise).
        prefetcher.wait();
        const Prefetcher::Stats st = prefetcher.last();
        prefetch_total += st.seconds;
        prefetched_bytes += st.bytes;
        overlap_total += std::max(0.0, std::min(st.ended, analysis_end) - st.started);
      }
      if (analysed) report_timing();
    }
    if (ca.verbose && world.rank() == 0) {
      const double wall =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - sweep_start).count();
      std::cerr << std::fixed << std::setprecision(2) << "sinkscope: sweep timing: wall " << wall
                << " s, read " << read_total << " s, compute " << compute_total << " s, read ahead "
                << prefetch_total << " s (" << prefetched_bytes / 1e9 << " GB, budget "
                << prefetch_bytes / 1e9 << " GB), overlap " << overlap_total << " s"
                << std::defaultfloat << std::setprecision(6) << "\n";
    }
  }
  // Array tasks of a Slurm sweep analyse one checkpoint each and leave sweep.h5 to the assemble
  // step (--no-assemble), so tasks never write the shared file concurrently.
  int status = failed.empty() ? 0 : 1;
  if (world.rank() == 0 && !sa.no_assemble) {
    try {
      SweepOptions so;
      so.tau = tau;
      so.bootstrap = sa.bootstrap;
      so.bootstrap_seed = sa.bootstrap_seed;
      so.convergence_profile = sa.convergence_profile;
      Sweep s = assemble_sweep(cps, outdir, so);
      s.command_line = ca.command_line;
      s.options = ca.options;
      write_sweep((fs::path(outdir) / "sweep.h5").string(), s);
      if (!ca.quiet) {
        std::cerr << "sinkscope: wrote " << (fs::path(outdir) / "sweep.h5").string() << " ("
                  << s.names.size() << " checkpoints; " << s.convergence_outcome << " ("
                  << s.convergence_profile << " profile, tau " << tau << ", "
                  << s.bootstrap_replicates << " bootstrap replicates))\n";
        if (!s.failed.empty()) {
          std::cerr << "sinkscope: checkpoints without a valid analysis:";
          for (const auto& f : s.failed) std::cerr << " " << f;
          std::cerr << "\n";
        }
      }
      for (const auto& f : s.failed)
        if (std::find(failed.begin(), failed.end(), f) == failed.end()) failed.push_back(f);
    } catch (const InputError& e) {
      // Rank 0 alone assembles: report like any bad input, without taking the other ranks down.
      std::cerr << "sinkscope: error: " << e.what() << "\n";
      for (const auto& c : cps)
        if (std::find(failed.begin(), failed.end(), c.name) == failed.end())
          failed.push_back(c.name);
    }
    if (!failed.empty()) status = 1;
  }
  if (world.rank() == 0 && !sa.failed_list.empty()) {
    commit_atomically(sa.failed_list, [&](const std::string& tmp) {
      std::ofstream out(tmp);
      for (const auto& f : failed) out << f << "\n";
      if (!out.flush()) throw RuntimeFailure("cannot write " + tmp);
    });
  }
  return status;
}

int cmd_inspect(const std::string& model, bool list_tensors) {
  Checkpoint ck = Checkpoint::open(model);
  const ModelConfig& c = ck.config();
  std::cout << "model: " << model << "\n"
            << "  model_type " << c.model_type << ", layers " << c.num_layers << ", hidden "
            << c.hidden_size << ", heads " << c.num_heads << " (kv " << c.num_kv_heads
            << ", head_dim " << c.head_dim << "), experts " << c.num_experts << " top-" << c.top_k
            << (c.norm_topk_prob ? " (renormalised)" : "") << ", moe_intermediate "
            << c.moe_intermediate_size << ", vocab " << c.vocab_size << ", rope_theta "
            << c.rope.theta << "\n  family: " << c.family->description << "\n  layers:";
  for (int64_t l = 0; l < c.num_layers; ++l)
    std::cout << " " << l << (c.is_moe_layer(l) ? ":moe" : ":dense")
              << (c.window(l) > 0 ? "/window" + std::to_string(c.window(l)) : "");
  if (c.learned_sinks) std::cout << "\n  attention: learned sinks (attention/learned_sink_mass)";
  std::cout << "\n  files:";
  for (const auto& f : ck.files()) std::cout << " " << f;
  // A 30B MoE has tens of thousands of tensors: a summary by default, the list with --tensors.
  std::map<std::string, size_t> per_dtype;
  uint64_t bytes = 0;
  for (const auto& t : ck.tensors()) {
    ++per_dtype[t.dtype_str];
    bytes += t.end - t.begin;
  }
  std::cout << "\n  tensors: " << ck.tensors().size() << " (";
  for (auto it = per_dtype.begin(); it != per_dtype.end(); ++it)
    std::cout << (it == per_dtype.begin() ? "" : ", ") << it->first << " " << it->second;
  std::cout << ")" << (list_tensors ? ":" : "; --tensors lists them") << "\n";
  if (list_tensors) {
    for (const auto& t : ck.tensors()) {
      std::cout << "    " << t.name << "  " << t.dtype_str << " [";
      for (size_t i = 0; i < t.shape.size(); ++i) std::cout << (i ? ", " : "") << t.shape[i];
      std::cout << "]\n";
    }
  }
  std::cout << "  total " << std::fixed << std::setprecision(1) << static_cast<double>(bytes) / 1e6
            << " MB\n";
  validate_checkpoint(ck);
  const ShardPlan plan = ShardPlan::make(1, 0, 1, 1, c);
  std::cout << "  shard plan (one rank): " << plan.describe()
            << "\n  validation: ok (every tensor present with the shape config.json implies)\n";
  return 0;
}

int cmd_report(const std::string& input, const std::string& out) {
  std::string script =
      std::getenv("SINKSCOPE_REPORT_SCRIPT") ? std::getenv("SINKSCOPE_REPORT_SCRIPT") : "";
  if (script.empty()) {
    const fs::path exe = fs::canonical("/proc/self/exe");
    for (const fs::path& cand :
         {exe.parent_path().parent_path() / "share/sinkscope/sinkscope_report.py",
          fs::path(SINKSCOPE_REPORT_SCRIPT)})
      if (fs::exists(cand)) {
        script = cand.string();
        break;
      }
  }
  if (script.empty())
    throw RuntimeFailure("report: cannot find sinkscope_report.py (set SINKSCOPE_REPORT_SCRIPT)");
  const char* py =
      std::getenv("SINKSCOPE_PYTHON") ? std::getenv("SINKSCOPE_PYTHON") : "/usr/bin/python3";
  std::cout.flush();
  std::vector<std::string> args = {py, script, input, "--out", out};
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  execv(py, argv.data());
  throw RuntimeFailure(std::string("report: cannot run ") + py +
                       " (install python3-matplotlib python3-h5py)");
}

int cmd_synth(const std::string& config, const std::string& out, bool plant, uint64_t seed) {
  const ModelConfig c = parse_model_config(config);
  const PlantedCircuit pc = synthesize(c, out, plant, seed);
  std::cerr << "sinkscope: wrote " << out << "/config.json and model.safetensors";
  if (plant)
    std::cerr << " with a planted circuit: head " << pc.head_layer << "." << pc.head
              << " -> expert " << pc.expert_layer << "." << pc.expert << " -> sink head "
              << pc.sink_layer << "." << pc.sink_head << " (probes must start with token "
              << pc.bos_token_id << ")";
  std::cerr << "\n";
  return 0;
}

struct PlanArgs {
  std::string model, model_config, probes, tokens, cluster, calibrate_dir;
  PlanRequest req;
  bool calibrate = false, no_causal_profile = false, shell = false;
  double margin = 2.0;
};

// `sinkscope plan`: reads the shape and the probes' size, prints the plan (docs/planner.md).
int cmd_plan(PlanArgs& pa, const Comm& world) {
  std::map<std::string, std::string> site;
  if (!pa.cluster.empty()) site = read_site_file(pa.cluster);
  PlanCoefficients k = coefficients_from(site, pa.req.device);
  if (pa.calibrate) {
    const BackendEntry& backend = find_backend(pa.req.device);
    if (!backend.calibrate)
      throw InputError("plan --calibrate: the " + backend.name + " backend has no calibration");
    k = backend.calibrate(pa.req.threads, pa.calibrate_dir, world);
    if (world.rank() == 0) {
      for (const auto& [key, value] : coefficient_keys(k, pa.req.device))
        std::cout << key << "=" << value << "\n";
      if (!pa.cluster.empty()) write_coefficients(pa.cluster, k, pa.req.device);
      std::cerr << "sinkscope: " << k.source
                << (pa.cluster.empty() ? "" : "; written to " + pa.cluster) << "\n";
    }
    if (pa.model.empty() && pa.model_config.empty()) return 0;
  }
  if (world.rank() != 0) return 0;
  if (pa.model.empty() == pa.model_config.empty())
    throw InputError("plan: give --model DIR or --model-config FILE");
  pa.req.cfg = parse_model_config(pa.model.empty() ? pa.model_config
                                                   : (fs::path(pa.model) / "config.json").string());
  if (!pa.tokens.empty()) {
    const IntArray t = load_tokens(pa.tokens);
    pa.req.probes = static_cast<int64_t>(t.shape.at(0));
    pa.req.seq_len = static_cast<int64_t>(t.shape.at(1));
  } else {
    long long n = 0, len = 0;
    char kind[16] = {};
    if (std::sscanf(pa.probes.c_str(), "%15[a-z]:%lld:%lld:", kind, &n, &len) != 3)
      throw InputError("--probes " + pa.probes + ": expected random:N:T:SEED or repeat:N:T:TOKEN");
    pa.req.probes = n;
    pa.req.seq_len = len;
  }
  if (pa.no_causal_profile && pa.req.ablation_passes < 0) pa.req.ablation_passes = 0;
  apply_site_defaults(site, &pa.req);
  if (k.cores <= 0) k.cores = this_machine_cores();
  const Plan plan = make_plan(pa.req, k);
  std::cout << (pa.shell ? format_plan_shell(plan, pa.margin) : format_plan(plan));
  // A layout asked for that does not fit is an error before submission.
  return plan.recommended >= 0 ? 0 : 3;
}

bool has_subcommand(const CLI::App& app, const std::string& name) {
  for (const CLI::App* sub : app.get_subcommands({}))
    if (sub->get_name() == name) return true;
  return false;
}

// The subcommand nearest to a misspelt one (at most 2 edits away), or "".
std::string closest_subcommand(const CLI::App& app, const std::string& typed) {
  std::string best;
  size_t best_distance = 3;
  for (const CLI::App* sub : app.get_subcommands({})) {
    const std::string& name = sub->get_name();
    std::vector<size_t> row(name.size() + 1);
    for (size_t j = 0; j <= name.size(); ++j) row[j] = j;
    for (size_t i = 1; i <= typed.size(); ++i) {
      size_t diagonal = row[0];
      row[0] = i;
      for (size_t j = 1; j <= name.size(); ++j) {
        const size_t above = row[j];
        row[j] = std::min({row[j] + 1, row[j - 1] + 1, diagonal + (typed[i - 1] != name[j - 1])});
        diagonal = above;
      }
    }
    if (row[name.size()] < best_distance) {
      best_distance = row[name.size()];
      best = name;
    }
  }
  return best;
}

// An error message as the one line the CLI promises: line breaks (from a library, or quoted from
// a file) become spaces, and a message longer than 2000 characters is cut.
std::string one_line(std::string text) {
  std::replace(text.begin(), text.end(), '\n', ' ');
  std::replace(text.begin(), text.end(), '\r', ' ');
  constexpr size_t kMaxChars = 2000;
  if (text.size() > kMaxChars)
    text = text.substr(0, kMaxChars) + "... (" + std::to_string(text.size()) + " characters)";
  return text;
}

}  // namespace

int main(int argc, char** argv) {
  // Past a file size limit (RLIMIT_FSIZE) a write fails with EFBIG and is reported like a full
  // disk, instead of SIGXFSZ killing the process with the temporary left behind.
  std::signal(SIGXFSZ, SIG_IGN);
  std::unique_ptr<Comm> world;
  try {
    world = launched_under_mpi() && SINKSCOPE_HAVE_MPI ? make_mpi_world(&argc, &argv)
                                                       : make_single_comm();
  } catch (const std::exception& e) {
    std::cerr << "sinkscope: error: " << e.what() << "\n";
    return 2;
  }
  const int rank = world->rank();

  CLI::App app{"sinkscope: finds the position-zero attention sink circuit in MoE language models"};
  app.set_version_flag("--version", std::string("sinkscope ") + SINKSCOPE_VERSION);
  app.require_subcommand(1);
  // Every option's default appears in --help and in the `options` attribute of the outputs.
  app.option_defaults()->always_capture_default();

  std::string model, out, config, glob, input;
  std::vector<std::string> models;
  ProbeArgs pa;
  CommonArgs ca;
  int64_t step = -1;
  bool plant = false;
  SweepArgs sa;
  uint64_t seed = 0;

  auto* analyze = app.add_subcommand("analyze", "analyse one checkpoint into an HDF5 file");
  std::string model_config;
  int64_t synthetic_seed = -1;
  auto* model_opt = analyze->add_option("--model", model, "Hugging Face checkpoint folder");
  auto* config_opt =
      analyze->add_option("--model-config", model_config,
                          "config.json of a model to build with random weights (benchmarks only)");
  analyze
      ->add_option("--synthetic-weights", synthetic_seed,
                   "seed of the random weights (with --model-config, --device cuda)")
      ->needs(config_opt);
  config_opt->excludes(model_opt);
  analyze->add_option("--out", out, "analysis file to write (.h5)")->required();
  analyze->add_option("--step", step, "training step (default: from the folder name)");
  add_probe_options(analyze, pa);
  add_common_options(analyze, ca);
  analyze->add_flag("--causal-profile", ca.causal_profile,
                    "also the causal layer profile (mean-ablates each layer at position 0)");

  auto* sweep = app.add_subcommand("sweep", "analyse many checkpoints and the convergence signal");
  auto* mo = sweep->add_option("--models", models, "checkpoint folders");
  sweep->add_option("--models-glob", glob, "checkpoint folders by pattern, e.g. 'run/step*'")
      ->excludes(mo);
  sweep->add_option("--out", out, "output folder")->required();
  sweep->add_flag("--resume", sa.resume,
                  "skip checkpoints whose analysis file exists and validates");
  auto* only = sweep->add_flag("--assemble-only", sa.assemble_only,
                               "only build sweep.h5 from existing analysis files");
  sweep
      ->add_flag("--no-assemble", sa.no_assemble,
                 "analyse only; leave sweep.h5 to a later --assemble-only")
      ->excludes(only);
  sweep->add_option("--tau", sa.tau,
                    "convergence threshold: total-variation distance per doubling of the step");
  sweep
      ->add_option("--bootstrap", sa.bootstrap,
                   "bootstrap replicates over probes (standard errors, 95% intervals, noise "
                   "floor; 0 = none)")
      ->check(CLI::NonNegativeNumber);
  sweep->add_option("--bootstrap-seed", sa.bootstrap_seed, "seed of the bootstrap draws");
  sweep
      ->add_option("--convergence-profile", sa.convergence_profile,
                   "profile the convergence signal reads: causal (default) or attribution")
      ->check(CLI::IsMember({"causal", "attribution"}));
  sweep->add_flag("--no-causal-profile", sa.no_causal_profile,
                  "skip the causal layer profile (one forward per layer and part)");
  sweep->add_option("--steps", sa.steps,
                    "training steps, one per checkpoint (default: from folder names)");
  sweep
      ->add_option("--prefetch-gb", sa.prefetch_gb,
                   "GB of the next checkpoint read ahead while one is analysed (default: min(16, a "
                   "quarter of MemAvailable); 0 = off)")
      ->check(CLI::Validator(
          [](const std::string& text) {
            const double gb = std::strtod(text.c_str(), nullptr);
            return gb >= 0 ? std::string() : "must not be negative";
          },
          ">=0"));
  sweep->add_option("--failed-list", sa.failed_list,
                    "write the names of checkpoints that failed, one per line");
  add_probe_options(sweep, pa);
  add_common_options(sweep, ca);

  auto* report =
      app.add_subcommand("report", "PNG plots and a summary page from a sweep or analysis file");
  report->add_option("input", input, "sweep folder, sweep.h5 or analysis .h5")->required();
  report->add_option("--out", out, "report folder")->required();

  auto* inspect = app.add_subcommand("inspect", "print config, tensors and shard plan; validate");
  inspect->add_option("--model", model, "checkpoint folder")->required();
  bool list_tensors = false;
  inspect->add_flag("--tensors", list_tensors, "list every tensor (name, dtype, shape)");

  auto* synth =
      app.add_subcommand("synth", "write a random (optionally circuit-planted) checkpoint");
  synth->add_option("--config", config, "config.json of the shape")->required();
  synth->add_option("--out", out, "output folder")->required();
  synth->add_flag("--plant-circuit", plant, "plant a known P0 sink circuit");
  synth->add_option("--seed", seed, "random seed");

  auto* plan = app.add_subcommand(
      "plan", "memory, time and layout of a sweep before it is submitted (docs/planner.md)");
  PlanArgs pl;
  auto* pl_model = plan->add_option("--model", pl.model, "checkpoint folder (its config.json)");
  plan->add_option("--model-config", pl.model_config, "config.json of the model")
      ->excludes(pl_model);
  auto* pl_probes = plan->add_option("--probes", pl.probes, "random:N:T:SEED or repeat:N:T:TOKEN");
  plan->add_option("--tokens", pl.tokens, "probe file (.npy or .h5): its N x T")
      ->excludes(pl_probes);
  plan->add_option("--checkpoints", pl.req.checkpoints, "checkpoints in the sweep (array size)")
      ->check(CLI::PositiveNumber);
  plan->add_option("--max-parallel", pl.req.max_parallel, "array tasks at once (default: all)");
  plan->add_option("--cluster", pl.cluster, "site file cluster/<site>.env (coefficients, sizes)");
  plan->add_option("--gpus-per-node", pl.req.ranks_per_node, "GPUs (cuda) or ranks (cpu) per node");
  plan->add_option("--nodes", pl.req.nodes, "nodes per checkpoint");
  plan->add_option("--gpu-mem-gib", pl.req.device_mem_gib, "memory per GPU (default 139, H200)");
  plan->add_option("--node-mem-gib", pl.req.node_mem_gib, "host memory per node (default: here)");
  plan->add_option("--device", pl.req.device, "cpu or cuda")->check(CLI::IsMember({"cpu", "cuda"}));
  plan->add_option("--batch", pl.req.batch, "probes per micro-batch")->check(CLI::PositiveNumber);
  plan->add_option("--threads", pl.req.threads, "CPU threads per rank")->check(CLI::PositiveNumber);
  plan->add_option("--tp", pl.req.tp, "only layouts with this tp")->check(CLI::PositiveNumber);
  plan->add_option("--ep", pl.req.ep, "only layouts with this ep")->check(CLI::PositiveNumber);
  plan->add_option("--ablation-passes", pl.req.ablation_passes,
                   "ablated forward passes per checkpoint (default: the causal profile's 1 + 3 L)");
  plan->add_flag("--no-causal-profile", pl.no_causal_profile, "no ablated passes (plain analyze)");
  plan->add_flag("--calibrate", pl.calibrate,
                 "measure the coefficients with --device's kernels here (written to --cluster FILE "
                 "when given)");
  plan->add_option("--calibrate-dir", pl.calibrate_dir,
                   "folder for the calibration's scratch files (a file read, a small model)")
      ->default_val(fs::temp_directory_path().string());
  plan->add_flag("--shell", pl.shell,
                 "KEY=VALUE lines of the recommendation (jobs/submit_sweep.sh)");
  plan->add_option("--time-margin", pl.margin, "--shell: time limit = margin x predicted + 5 min");

  int status = 0;
  try {
    try {
      if (argc > 1 && argv[1][0] != '-' && !has_subcommand(app, argv[1])) {
        std::string closest = closest_subcommand(app, argv[1]);
        throw CLI::ExtrasError("unknown subcommand '" + std::string(argv[1]) + "'" +
                                   (closest.empty() ? "" : " (did you mean '" + closest + "'?)"),
                               CLI::ExitCodes::ExtrasError);
      }
      app.parse(argc, argv);
    } catch (const CLI::ParseError& e) {
      // --help and --version print through CLI11; a usage error is one line and exit 1.
      if (e.get_exit_code() == 0) {
        if (rank == 0) app.exit(e);
      } else if (rank == 0) {
        std::cerr << "sinkscope: error: " << one_line(e.what()) << " (see sinkscope --help)\n";
      }
      finalize_mpi();
      return e.get_exit_code() == 0 ? 0 : 1;
    }
    for (const CLI::App* command : {analyze, sweep}) {
      if (!*command) continue;
      for (int i = 0; i < argc; ++i) ca.command_line += (i ? " " : "") + std::string(argv[i]);
      ca.options = command->config_to_str(true, false);
    }
    // The calibration's collectives wait as the forward's do (sinkscope/comm.hpp).
    if (*analyze || *sweep || (*plan && pl.calibrate))
      world->set_wait_limit(static_cast<double>(ca.rank_timeout));
    if (*analyze)
      status = cmd_analyze(model, model_config, synthetic_seed, pa, ca, out, step, *world);
    else if (*sweep)
      status = cmd_sweep(models, glob, pa, ca, out, sa, *world);
    else if (*report)
      status = cmd_report(input, out);
    else if (*inspect)
      status = cmd_inspect(model, list_tensors);
    else if (*synth)
      status = cmd_synth(config, out, plant, seed);
    else if (*plan)
      status = cmd_plan(pl, *world);
  } catch (const InputError& e) {
    if (e.agreed || world->size() == 1) {
      if (rank == 0) std::cerr << "sinkscope: error: " << one_line(e.what()) << "\n";
      finalize_mpi();
      return 1;
    }
    std::cerr << "sinkscope: error on rank " << rank << " (" << host_name()
              << "): " << one_line(e.what()) << "\n";
    world->abort(1);
  } catch (const std::exception& e) {
    std::cerr << "sinkscope: failure on rank " << rank << " (" << host_name()
              << "): " << one_line(e.what()) << "\n";
    if (world->size() > 1) world->abort(2);
    return 2;
  }
  world.reset();
  finalize_mpi();
  return status;
}
