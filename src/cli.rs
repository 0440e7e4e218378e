//! The `rlhf` command line: clap subcommands over the library.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use std::path::PathBuf;

use crate::bench::{self, BenchSize};
use crate::device::cuda::unavailable_reason;
use crate::device::{kernels, CudaDevice, Device, DeviceChoice};
use crate::error::Result;
use crate::model::generate::GenerateOptions;
use crate::model::tokenizer::{Message, TextTokenizer};
use crate::model::{Batch, Model};
use crate::ops::pref_loss::DpoLoss;
use crate::train::{RunSummary, TrainArgs};
use crate::verify::Outcome;

#[derive(Parser, Debug)]
#[command(
    name = "rlhf",
    version,
    about = "Preference post-training (SFT, reward models, DPO family, KTO, PPO) on one GPU"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Report the build's CUDA toolchain, every embedded kernel's registers and spills, the GPU and cuBLAS.
    Doctor,
    /// The end-to-end demo: SFT, a reward model and DPO on a built-in synthetic task (a tiny model
    /// on the CPU in seconds, no downloads), then a before/after table and a PNG of the curves.
    Demo {
        /// Run the pipeline on this model instead of the built-in tiny one (e.g. the imported SmolLM2).
        #[arg(long)]
        model: Option<PathBuf>,
        #[arg(long, default_value = "demo-run")]
        out: PathBuf,
        #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
        device: DeviceChoice,
        /// Synthetic examples per data file.
        #[arg(long, default_value_t = 800)]
        examples: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Supervised fine-tuning: loss on the completion tokens only.
    Sft {
        #[command(flatten)]
        train: TrainArgs,
    },
    /// Train a reward model (scalar head, Bradley-Terry loss) on prompt/chosen/rejected pairs.
    Rm {
        #[command(flatten)]
        train: TrainArgs,
    },
    /// Score prompt/completion lines (JSON Lines) with a reward model; prints one JSON line each.
    Score {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        data: PathBuf,
        #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
        device: DeviceChoice,
    },
    /// Direct preference optimisation (every loss type of TRL's DPOTrainer).
    Dpo {
        #[command(flatten)]
        train: TrainArgs,
        #[arg(long, value_enum, default_value_t = DpoLoss::Sigmoid)]
        loss_type: DpoLoss,
        #[arg(long, default_value_t = 0.1)]
        beta: f64,
        /// ε of cDPO / rDPO / EXO.
        #[arg(long, default_value_t = 0.0)]
        label_smoothing: f64,
        /// Compute the reference's log-probs in one pass before training instead of keeping a second
        /// model on the device.
        #[arg(long)]
        precompute_ref: bool,
        /// Online (iterative) DPO: this many rounds of labelling the policy's own samples with a
        /// judge, then DPO on them from the current policy. --data then holds `prompt` lines.
        /// `--online` alone runs 3 rounds.
        #[arg(long, visible_alias = "online", default_value_t = 0, num_args = 0..=1, default_missing_value = "3")]
        online_rounds: usize,
        /// The judge for --online-rounds: a reward model ...
        #[arg(long)]
        judge_reward_model: Option<PathBuf>,
        /// ... or an LLM asked which response is better.
        #[arg(long)]
        judge_model: Option<PathBuf>,
    },
    /// RLAIF: sample responses with a policy, have a judge rank them, write preference pairs.
    Label {
        #[command(flatten)]
        args: crate::train::label::LabelArgs,
    },
    /// KTO on prompt/completion/label data.
    Kto {
        #[command(flatten)]
        train: TrainArgs,
        #[arg(long, default_value_t = 0.1)]
        beta: f64,
        #[arg(long, default_value_t = 1.0)]
        desirable_weight: f64,
        #[arg(long, default_value_t = 1.0)]
        undesirable_weight: f64,
    },
    /// ORPO: NLL on the chosen response plus an odds-ratio term; no reference model.
    Orpo {
        #[command(flatten)]
        train: TrainArgs,
        #[arg(long, default_value_t = 0.1)]
        beta: f64,
    },
    /// SimPO: length-normalised margin with a target gap; no reference model.
    Simpo {
        #[command(flatten)]
        train: TrainArgs,
        #[arg(long, default_value_t = 2.0)]
        beta: f64,
        #[arg(long, default_value_t = 0.5)]
        gamma: f64,
        #[arg(long, default_value_t = 0.0)]
        label_smoothing: f64,
    },
    /// PPO against a reward model, with a value model, GAE and a KL penalty to the reference.
    Ppo {
        #[command(flatten)]
        args: crate::train::ppo::PpoArgs,
    },
    /// GRPO: group-relative advantages from a reward model or a rule (verifiable answers).
    Grpo {
        #[command(flatten)]
        args: crate::train::grpo::GrpoArgs,
    },
    /// Evaluate a policy on held-out preference pairs.
    Eval {
        #[arg(long)]
        model: PathBuf,
        /// prompt/chosen/rejected JSON Lines.
        #[arg(long)]
        data: PathBuf,
        /// The reference (usually the SFT model): implicit-reward accuracy, KL, win rate.
        #[arg(long)]
        reference: Option<PathBuf>,
        /// A reward model: its accuracy on the pairs, sample scores, win rate.
        #[arg(long)]
        reward_model: Option<PathBuf>,
        #[arg(long, default_value_t = 0.1)]
        beta: f64,
        #[arg(long, default_value_t = 64)]
        max_new_tokens: usize,
        #[arg(long, default_value_t = 1.0)]
        temperature: f32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
        device: DeviceChoice,
    },
    /// Calibration on questions with reference answers: expected calibration error, a reliability
    /// diagram, and how often the model abstains ("I'm not sure") when it would be wrong vs right.
    Calibration {
        #[arg(long)]
        model: PathBuf,
        /// JSON Lines with `prompt` and `answer`.
        #[arg(long)]
        data: PathBuf,
        /// How a forced answer starts (to judge what the model would have said when it abstains).
        #[arg(long, default_value = " The answer is")]
        answer_prefix: String,
        #[arg(long, default_value_t = 64)]
        max_new_tokens: usize,
        /// Where the reliability diagram goes.
        #[arg(long)]
        plot: Option<PathBuf>,
        #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
        device: DeviceChoice,
    },
    /// Suppression is not unlearning: a behaviour's rate in the base model, in the model trained
    /// against it, and after a few SFT steps on examples of it.
    Suppression {
        /// The model before suppression.
        #[arg(long)]
        base: PathBuf,
        /// The model trained against the behaviour.
        #[arg(long)]
        suppressed: PathBuf,
        /// JSON Lines with `prompt` lines to sample on.
        #[arg(long)]
        prompts: PathBuf,
        /// Text whose presence in a response marks the behaviour (case-insensitive).
        #[arg(long)]
        pattern: String,
        /// SFT data showing the behaviour (prompt/completion).
        #[arg(long)]
        relearn: PathBuf,
        /// Step counts of relearning to measure after.
        #[arg(long, value_delimiter = ',', default_value = "0,5,20")]
        steps: Vec<usize>,
        #[arg(long, default_value_t = 1e-5)]
        lr: f64,
        #[arg(long, default_value_t = 64)]
        max_new_tokens: usize,
        /// Working folder for the relearning runs.
        #[arg(long, default_value = "suppression-run")]
        out: PathBuf,
        #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
        device: DeviceChoice,
    },
    /// Write RUN_DIR/metrics.png from RUN_DIR/metrics.jsonl.
    Plot { run_dir: PathBuf },
    /// Check our kernels against reference-value files (safetensors with inputs, expected outputs and
    /// gradients; family and hyper-parameters in the metadata, as in ../shared/golden). Prints the max
    /// error of every output and gradient and PASS/FAIL; exits non-zero on any FAIL.
    Verify {
        /// Reference files, e.g. ../shared/golden/*.safetensors.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Where to run: the CPU references (f64) or the CUDA kernels.
        #[arg(long, value_enum, default_value_t = DeviceChoice::Cpu)]
        device: DeviceChoice,
    },
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Convert a llama.cpp GGUF file (llama architecture; F32/F16/BF16/Q8_0/Q4_1 tensors) into a
    /// Hugging Face folder: safetensors weights, config.json, tokenizer.json, tokenizer_config.json.
    ImportGguf { file: PathBuf, out_dir: PathBuf },
    /// Generate text from a prompt, streaming tokens as they are sampled.
    Generate {
        /// A Hugging Face model folder.
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        prompt: String,
        /// Wrap the prompt as a user message in the model's chat template.
        #[arg(long)]
        chat: bool,
        #[arg(long, default_value_t = 128)]
        max_new_tokens: usize,
        /// 0 for greedy decoding.
        #[arg(long, default_value_t = 0.7)]
        temperature: f32,
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
        device: DeviceChoice,
    },
    /// Per-token log-probabilities of a text under a model (the first token has none).
    Logprobs {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        text: String,
        /// One JSON object: {"tokens": [...], "logprobs": [null, ...]}.
        #[arg(long)]
        json: bool,
        #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
        device: DeviceChoice,
    },
}

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Time every kernel family at realistic shapes; report GB/s or TFLOP/s and the percentage of this
    /// device's copy bandwidth and GEMM rate, both measured in the same run.
    Kernels {
        #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
        device: DeviceChoice,
        /// Problem sizes [default: full on CUDA, small on the CPU].
        #[arg(long, value_enum)]
        size: Option<BenchSize>,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Causal attention forward and backward TFLOP/s at T = 512 .. 16,384 (batch·T = 16k tokens,
    /// H·D = 2,048, D = 64 and 128), against the device's measured GEMM rate.
    Attention {
        /// Sequence lengths to time.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "512,1024,2048,4096,8192,16384"
        )]
        lens: Vec<usize>,
        /// Tokens per batch (batch = tokens / length).
        #[arg(long, default_value_t = 16_384)]
        tokens: usize,
        #[arg(long, value_delimiter = ',', default_value = "64,128")]
        head_dims: Vec<usize>,
        /// KV-cache lengths for the decode measurement (one new token per sequence, --decode-batch
        /// sequences, a quarter as many KV heads as query heads); empty to skip it.
        #[arg(long, value_delimiter = ',', default_value = "1024,4096,16384")]
        decode_lens: Vec<usize>,
        #[arg(long, default_value_t = 64)]
        decode_batch: usize,
        #[arg(long, default_value_t = 3)]
        reps: usize,
        #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
        device: DeviceChoice,
    },
    /// Tokens/s, MFU and device memory of one training step (random weights).
    Train {
        /// Which trainer's step: dpo (policy forward+backward on chosen and rejected plus the
        /// reference forward and the AdamW step), ppo or grpo (a rollout's generation and its
        /// update, AdamW steps included).
        #[arg(long, default_value = "dpo")]
        trainer: String,
        /// A model folder whose config.json gives the shape [default: SmolLM2-135M's shape].
        #[arg(long)]
        model: Option<PathBuf>,
        #[arg(long, default_value_t = 16)]
        pairs: usize,
        /// Tokens per sequence (half prompt, half completion).
        #[arg(long, default_value_t = 1024)]
        seq_len: usize,
        #[arg(long, default_value_t = 3)]
        reps: usize,
        #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
        device: DeviceChoice,
        /// Then, under the op profiler, one more step (dpo) or a generation of up to 32 tokens and one
        /// more update (ppo, grpo): device time per op (GEMMs by shape).
        #[arg(long)]
        profile: bool,
        /// dpo: time only the step in which chosen and rejected each run their prompt (by default
        /// it is timed after the step that runs each pair's prompt once, for their ratio); grpo:
        /// each response prefills and runs its prompt on its own, no ratio.
        #[arg(long)]
        no_shared_prompts: bool,
    },
    /// Forward and forward+backward tokens/s of a model (random weights) and its MFU against this
    /// device's GEMM rate measured in the same run.
    Model {
        /// A model folder whose config.json gives the shape [default: SmolLM2-135M's shape].
        #[arg(long)]
        model: Option<PathBuf>,
        #[arg(long, default_value_t = 8)]
        batch: usize,
        #[arg(long, default_value_t = 1024)]
        seq_len: usize,
        #[arg(long, default_value_t = 5)]
        reps: usize,
        #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
        device: DeviceChoice,
        /// Then one more forward+backward under the op profiler: device time per op (GEMMs by shape).
        #[arg(long)]
        profile: bool,
    },
}

/// The offline loop's options, which ppo and grpo size differently (iterations of rollouts): given
/// on their command line at all, even at the default value, they are errors rather than ignored.
const OFFLINE_ONLY: [(&str, &str); 5] = [
    ("max_steps", "--max-steps"),
    ("epochs", "--epochs"),
    ("batch_size", "--batch-size"),
    ("grad_accum", "--grad-accum"),
    ("eval_fraction", "--eval-fraction"),
];

/// Parses the process's command line and runs it (usage errors exit as clap prints them).
pub fn parse_and_run() -> Result<ExitCode> {
    use clap::{CommandFactory, FromArgMatches};
    let matches = Cli::command().get_matches();
    for trainer in ["ppo", "grpo"] {
        let Some(m) = matches.subcommand_matches(trainer) else {
            continue;
        };
        for (id, flag) in OFFLINE_ONLY {
            if m.value_source(id) == Some(clap::parser::ValueSource::CommandLine) {
                return Err(crate::train::offline_option_error(flag, trainer));
            }
        }
    }
    run(Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit()))
}

pub fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Doctor => {
            print!("{}", doctor_report());
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify { files, device } => verify(&files, device),
        Command::Bench(BenchCommand::Kernels { device, size, json }) => {
            bench_kernels_cmd(device, size, json)
        }
        Command::Bench(BenchCommand::Model {
            model,
            batch,
            seq_len,
            reps,
            device,
            profile,
        }) => {
            let device = Device::from_choice(device)?;
            let cfg = match model {
                Some(dir) => crate::model::LlamaConfig::load(&dir.join("config.json"))?,
                None => crate::model::LlamaConfig::smollm2_135m(),
            };
            eprintln!("measuring the GEMM ceiling ...");
            let ceil = bench::measure_ceilings(&device, ceiling_size(&device))?;
            let r = bench::bench_model(&device, &cfg, batch, seq_len, reps, profile)?;
            println!(
                "{:.1}M parameters, {batch} x {seq_len} tokens on {device:?}",
                cfg.parameter_count() as f64 / 1e6
            );
            println!(
                "forward           {:>9.1} ms  {:>10.0} tokens/s",
                r.forward_ms,
                r.tokens as f64 / (r.forward_ms * 1e-3)
            );
            println!(
                "forward+backward  {:>9.1} ms  {:>10.0} tokens/s  {:.2} TFLOP/s  MFU {:.1}% of the measured {:.1} TFLOP/s GEMM",
                r.forward_backward_ms,
                r.tokens as f64 / (r.forward_backward_ms * 1e-3),
                r.tflops,
                100.0 * r.tflops / ceil.gemm_tflops,
                ceil.gemm_tflops
            );
            if let Some(p) = &r.profile {
                println!(
                    "\none forward+backward under the profiler: {:.1} ms (device time per op)",
                    p.ms
                );
                print!("{}", p.table());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo {
            model,
            out,
            device,
            examples,
            seed,
        } => {
            let report = crate::train::demo::run(&crate::train::demo::DemoOptions {
                out,
                model,
                device,
                examples,
                seed,
                quiet: false,
            })?;
            print!("{}", crate::train::demo::render(&report));
            Ok(ExitCode::SUCCESS)
        }
        Command::Sft { train } => {
            let (run, eval) = crate::train::sft::train(&train)?;
            finish(&run, &train, "step");
            if let Some(l) = eval {
                println!("held-out loss per completion token: {l:.4}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Rm { train } => {
            let (run, held) = crate::train::reward::train(&train)?;
            finish(&run, &train, "step");
            if let Some((acc, margin)) = held {
                println!(
                    "held-out accuracy {:.1}%, mean margin {margin:.4}",
                    100.0 * acc
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Score {
            model,
            data,
            device,
        } => score_cmd(&model, &data, device),
        Command::Dpo {
            train,
            loss_type,
            beta,
            label_smoothing,
            precompute_ref,
            online_rounds,
            judge_reward_model,
            judge_model,
        } => {
            let which = crate::train::dpo::PrefTrainer::Dpo {
                loss: loss_type,
                beta,
                label_smoothing,
                precompute_ref,
            };
            if online_rounds == 0 {
                if judge_reward_model.is_some() || judge_model.is_some() {
                    return Err(crate::Error::Unsupported {
                        op: "dpo",
                        detail: "a judge is only used with --online-rounds".into(),
                    });
                }
                return pref_cmd(&train, which);
            }
            let device = Device::from_choice(train.device)?;
            let judge = crate::train::label::Judge::load(
                judge_reward_model.as_deref(),
                judge_model.as_deref(),
                &device,
            )?;
            let final_dir = crate::train::label::online_dpo(&train, which, &judge, online_rounds)?;
            println!(
                "online DPO, {online_rounds} rounds: {}",
                final_dir.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Orpo { train, beta } => {
            pref_cmd(&train, crate::train::dpo::PrefTrainer::Orpo { beta })
        }
        Command::Simpo {
            train,
            beta,
            gamma,
            label_smoothing,
        } => pref_cmd(
            &train,
            crate::train::dpo::PrefTrainer::Simpo {
                beta,
                gamma,
                label_smoothing,
            },
        ),
        Command::Kto {
            train,
            beta,
            desirable_weight,
            undesirable_weight,
        } => {
            let (run, held) =
                crate::train::kto::train(&train, beta, desirable_weight, undesirable_weight)?;
            finish(&run, &train, "step");
            if let Some((d, u)) = held {
                println!("held-out implicit reward: desirable {d:.4}, undesirable {u:.4}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Eval {
            model,
            data,
            reference,
            reward_model,
            beta,
            max_new_tokens,
            temperature,
            seed,
            device,
        } => eval_cmd(
            &model,
            &data,
            reference.as_deref(),
            reward_model.as_deref(),
            beta,
            max_new_tokens,
            temperature,
            seed,
            device,
        ),
        Command::Plot { run_dir } => {
            println!("{}", crate::train::plot::plot_run(&run_dir)?.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(BenchCommand::Train {
            trainer,
            model,
            pairs,
            seq_len,
            reps,
            device,
            profile,
            no_shared_prompts,
        }) => {
            if trainer == "ppo" || trainer == "grpo" {
                let device = Device::from_choice(device)?;
                let cfg = match model {
                    Some(dir) => crate::model::LlamaConfig::load(&dir.join("config.json"))?,
                    None => crate::model::LlamaConfig::smollm2_135m(),
                };
                if trainer == "ppo" && no_shared_prompts {
                    return Err(crate::Error::Unsupported {
                        op: "bench train",
                        detail:
                            "--no-shared-prompts does not apply to ppo: its rollout samples one \
                                 response a prompt"
                                .into(),
                    });
                }
                // A rollout of `pairs` × 4 responses (GRPO: groups of 8 on one prompt; PPO: a
                // prompt each), half of --seq-len prompt and half sampled.
                let r = bench::bench_online(
                    &device,
                    &cfg,
                    trainer == "ppo",
                    pairs * 4,
                    seq_len / 2,
                    seq_len / 2,
                    !no_shared_prompts,
                    profile,
                )?;
                let sampler = if device.is_cuda() && crate::ops::sample::device_sampling() {
                    "the sample kernel"
                } else {
                    "the host"
                };
                println!(
                    "{trainer} iteration, {} responses of {} + {} tokens on {device:?}, sampled by {sampler}",
                    pairs * 4,
                    seq_len / 2,
                    seq_len / 2
                );
                println!(
                    "generation: {} tokens, {:.0} tokens/s",
                    r.generated_tokens, r.generation_tokens_per_s
                );
                if let Some(eager) = r.generation_eager_tokens_per_s {
                    println!(
                        "            {eager:.0} tokens/s with each decode step's kernels launched one by one \
                         (same tokens); graphs {:.2}x",
                        r.generation_tokens_per_s / eager
                    );
                }
                println!(
                    "training:   {} tokens, {:.0} tokens/s",
                    r.training_tokens, r.training_tokens_per_s
                );
                if let Some(whole) = r.training_whole_tokens_per_s {
                    println!(
                        "            groups of {} responses to one prompt, each prompt run once: the layers run {} rows",
                        bench::GRPO_BENCH_GROUP, r.training_rows
                    );
                    println!(
                        "            {whole:.0} tokens/s with every prompt run on its own; sharing {:.2}x",
                        r.training_tokens_per_s / whole
                    );
                }
                if let Some((generation, update)) = r.tensor_bytes_peak {
                    let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
                    println!(
                        "tensor memory, most alive at once (PyTorch's max_memory_allocated counts the same): {:.2} GiB \
                         (generation {:.2}, update {:.2})",
                        gib(generation.max(update)),
                        gib(generation),
                        gib(update)
                    );
                }
                if let Some((generation, update)) = &r.profile {
                    println!(
                        "\na generation of up to 32 tokens under the profiler: {:.1} ms (device time per op)",
                        generation.ms
                    );
                    print!("{}", generation.table());
                    println!(
                        "\none update under the profiler: {:.1} ms (device time per op)",
                        update.ms
                    );
                    print!("{}", update.table());
                }
                return Ok(ExitCode::SUCCESS);
            }
            if trainer != "dpo" {
                return Err(crate::Error::Unsupported {
                    op: "bench train",
                    detail: format!("--trainer {trainer}: dpo, ppo and grpo are benchmarked"),
                });
            }
            let device = Device::from_choice(device)?;
            let cfg = match model {
                Some(dir) => crate::model::LlamaConfig::load(&dir.join("config.json"))?,
                None => crate::model::LlamaConfig::smollm2_135m(),
            };
            eprintln!("measuring the GEMM ceiling ...");
            let ceil = bench::measure_ceilings(&device, ceiling_size(&device))?;
            let share = !no_shared_prompts;
            let r = bench::bench_dpo_step(&device, &cfg, pairs, seq_len, reps, share, profile)?;
            println!(
                "DPO step, {pairs} pairs x {seq_len} tokens, {:.1}M parameters on {device:?}",
                cfg.parameter_count() as f64 / 1e6
            );
            if share {
                println!(
                    "each pair's prompt run once for chosen and rejected: the layers run {} rows for {} tokens",
                    r.rows, r.tokens
                );
            }
            println!(
                "{:.1} ms/step  {:.0} tokens/s  {:.2} TFLOP/s  MFU {:.1}% of the measured {:.1} TFLOP/s GEMM",
                r.step_ms,
                r.tokens as f64 / (r.step_ms * 1e-3),
                r.tflops,
                100.0 * r.tflops / ceil.gemm_tflops,
                ceil.gemm_tflops
            );
            if share {
                // The same step with every sequence whole, for the sharing's gain on this device.
                let u = bench::bench_dpo_step(&device, &cfg, pairs, seq_len, reps, false, false)?;
                println!(
                    "{:.1} ms/step  {:.0} tokens/s with each prompt run on both sides (--no-shared-prompts); sharing {:.2}x",
                    u.step_ms,
                    u.tokens as f64 / (u.step_ms * 1e-3),
                    u.step_ms / r.step_ms
                );
            }
            match r.device_memory_peak {
                Some(b) => println!(
                    "device memory in use, most seen (after the policy forward or the backward): {:.2} GiB",
                    b as f64 / (1u64 << 30) as f64
                ),
                None => println!("device memory: not measured on the CPU"),
            }
            if let Some(b) = r.tensor_bytes_peak {
                println!(
                    "tensor memory, most alive at once (PyTorch's max_memory_allocated counts the same): {:.2} GiB",
                    b as f64 / (1u64 << 30) as f64
                );
            }
            println!(
                "activations the policy's forward keeps for its backward: {:.2} GiB (tensor sizes)",
                r.saved_activation_bytes as f64 / (1u64 << 30) as f64
            );
            if let Some(p) = &r.profile {
                println!(
                    "\none DPO step under the profiler: {:.1} ms (device time per op)",
                    p.ms
                );
                print!("{}", p.table());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Label { args } => {
            let (n, skipped, conf) = crate::train::label::run(&args)?;
            println!("{n} pairs written to {} (mean judge confidence {conf:.3}); {skipped} prompts gave identical samples", args.out.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Ppo { args } => {
            let run = crate::train::ppo::train(&args)?;
            finish(&run, &args.train, "iteration");
            Ok(ExitCode::SUCCESS)
        }
        Command::Grpo { args } => {
            let run = crate::train::grpo::train(&args)?;
            finish(&run, &args.train, "iteration");
            Ok(ExitCode::SUCCESS)
        }
        Command::Calibration {
            model,
            data,
            answer_prefix,
            max_new_tokens,
            plot,
            device,
        } => {
            let device = Device::from_choice(device)?;
            let m = Model::load(&model, &device)?;
            let tok = TextTokenizer::load(&model)?;
            let eos = crate::train::eos_id(&m, &tok)?;
            let enc = crate::train::data::Encoder {
                tok: &tok,
                limits: Default::default(),
                eos,
            };
            let (prompts, report) = crate::train::data::load_prompts(&data, &enc, false)?;
            eprintln!("{}", report.summary(&data));
            let qa = prompts
                .into_iter()
                .enumerate()
                .map(|(i, p)| {
                    p.answer.map(|a| (p.tokens, a)).ok_or_else(|| {
                        crate::Error::file(&data, format!("example {}: no `answer`", i + 1))
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let r = crate::train::honesty::calibration(
                &m,
                &tok,
                &qa,
                &answer_prefix,
                max_new_tokens,
                &[eos],
            )?;
            use crate::train::honesty::percent;
            println!(
                "questions {}, answered {}, accuracy when answering {}",
                r.questions,
                r.answered,
                percent(r.accuracy)
            );
            println!("expected calibration error {:.4}", r.ece);
            println!(
                "abstains when it would be wrong {}, when it would be right {}",
                percent(r.abstain_when_wrong),
                percent(r.abstain_when_right)
            );
            for b in &r.bins {
                println!("  confidence [{:.1}, {:.1}): {:>4} answers, mean confidence {:.3}, accuracy {:.3}", b.lo, b.hi, b.count, b.mean_confidence, b.accuracy);
            }
            if let Some(path) = plot {
                crate::train::honesty::reliability_png(&r, "reliability", &path)?;
                println!("reliability diagram: {}", path.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Suppression {
            base,
            suppressed,
            prompts,
            pattern,
            relearn,
            steps,
            lr,
            max_new_tokens,
            out,
            device,
        } => {
            if pattern.trim().is_empty() {
                return Err(crate::Error::Unsupported {
                    op: "suppression",
                    detail: "--pattern is empty: every response would contain it".into(),
                });
            }
            let dev = Device::from_choice(device)?;
            let tok = TextTokenizer::load(&suppressed)?;
            let m = Model::load(&suppressed, &dev)?;
            let eos = crate::train::eos_id(&m, &tok)?;
            drop(m);
            let enc = crate::train::data::Encoder {
                tok: &tok,
                limits: Default::default(),
                eos,
            };
            let (ps, _) = crate::train::data::load_prompts(&prompts, &enc, false)?;
            let ps: Vec<Vec<i32>> = ps.into_iter().map(|p| p.tokens).collect();
            let mut train = TrainArgs::new(&suppressed, &relearn, &out);
            train.device = device;
            train.lr = lr;
            let opts = GenerateOptions {
                max_new_tokens,
                temperature: 1.0,
                eos: vec![eos],
                ..Default::default()
            };
            let r = crate::train::honesty::suppression(
                &base,
                &suppressed,
                &relearn,
                &steps,
                &ps,
                &pattern,
                &out,
                &train,
                &opts,
            )?;
            println!(
                "rate of {pattern:?}: base {:.1}%, suppressed {:.1}%",
                100.0 * r.base,
                100.0 * r.suppressed
            );
            for (k, v) in &r.after_relearning {
                println!("  after {k:>4} relearning steps: {:.1}%", 100.0 * v);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(BenchCommand::Attention {
            lens,
            tokens,
            head_dims,
            decode_lens,
            decode_batch,
            reps,
            device,
        }) => {
            bench::check_attention_flags(
                &lens,
                tokens,
                &head_dims,
                &decode_lens,
                decode_batch,
                reps,
            )?;
            let device = Device::from_choice(device)?;
            eprintln!("measuring the copy and GEMM ceilings ...");
            let ceil = bench::measure_ceilings(&device, ceiling_size(&device))?;
            println!(
                "GEMM ceiling {:.1} TFLOP/s, copy {:.0} GB/s on {device:?}",
                ceil.gemm_tflops, ceil.copy_gbs
            );
            println!(
                "fwd: the default forward (wgmma on Hopper); mma: the mma.sync forward; bwd: dQ by \
                 atomics (the default); nfwd, nbwd: fwd and bwd on Hopper blocks of one warpgroup \
                 instead of two (RLHF_ATTENTION=narrow); det: the deterministic backward \
                 (--deterministic)"
            );
            println!(
                "{:>6} {:>6} {:>5} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>12} {:>12} {:>12} {:>12} {:>12} {:>12}",
                "T",
                "batch",
                "D",
                "fwd ms",
                "mma ms",
                "nfwd ms",
                "bwd ms",
                "nbwd ms",
                "det ms",
                "fwd TFLOP/s",
                "mma TFLOP/s",
                "nfwd TFLOP/s",
                "bwd TFLOP/s",
                "nbwd TFLOP/s",
                "det TFLOP/s"
            );
            for &d in &head_dims {
                for &t in &lens {
                    let seqs = (tokens / t).max(1);
                    let r = bench::bench_attention(&device, seqs, t, 2048 / d, 2048 / d, d, reps)?;
                    println!(
                        "{:>6} {:>6} {:>5} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>12.2} {:>12.2} {:>12.2} {:>12.2} {:>12.2} {:>12.2}",
                        t,
                        seqs,
                        d,
                        r.forward_ms,
                        r.forward_mma_ms,
                        r.forward_narrow_ms,
                        r.backward_ms,
                        r.backward_narrow_ms,
                        r.backward_deterministic_ms,
                        r.forward_tflops,
                        r.forward_mma_tflops,
                        r.forward_narrow_tflops,
                        r.backward_tflops,
                        r.backward_narrow_tflops,
                        r.backward_deterministic_tflops
                    );
                }
            }
            if !decode_lens.is_empty() {
                println!(
                    "\ndecode: one new token per sequence, {decode_batch} sequences, H x D = 2,048, KV heads = H / 4"
                );
                println!(
                    "{:>6} {:>5} {:>11} {:>15} {:>10}",
                    "cache", "D", "ms", "cache GB/s", "% of copy"
                );
                for &d in &head_dims {
                    let heads = 2048 / d;
                    let hd = crate::ops::attention::Heads {
                        heads,
                        kv_heads: (heads / 4).max(1),
                        head_dim: d,
                    };
                    for &t in &decode_lens {
                        let r = bench::bench_decode(&device, decode_batch, t, hd, reps)?;
                        println!(
                            "{:>6} {:>5} {:>11.4} {:>15.0} {:>9.1}%",
                            t,
                            d,
                            r.ms,
                            r.cache_gbs,
                            100.0 * r.cache_gbs / ceil.copy_gbs
                        );
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::ImportGguf { file, out_dir } => {
            let cfg = crate::model::gguf::import_gguf(&file, &out_dir)?;
            println!(
                "imported {} ({} layers, hidden {}, {} heads / {} kv heads, vocab {}, {:.1}M parameters) into {}",
                file.display(),
                cfg.num_layers,
                cfg.hidden_size,
                cfg.num_heads,
                cfg.num_kv_heads,
                cfg.vocab_size,
                cfg.parameter_count() as f64 / 1e6,
                out_dir.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Generate {
            model,
            prompt,
            chat,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            seed,
            device,
        } => {
            let opts = GenerateOptions {
                max_new_tokens,
                temperature,
                top_k,
                top_p,
                seed,
                eos: Vec::new(),
            };
            generate_cmd(&model, &prompt, chat, opts, device)
        }
        Command::Logprobs {
            model,
            text,
            json,
            device,
        } => logprobs_cmd(&model, &text, json, device),
    }
}

/// Full-size ceilings on a GPU; small ones on the CPU and on the emulated GPU, where a full-size
/// GEMM would take the emulator hours and its timing would mean nothing anyway.
fn ceiling_size(device: &Device) -> BenchSize {
    match device {
        Device::Cuda(d) if !d.is_emulated() => BenchSize::Full,
        _ => BenchSize::Small,
    }
}

fn bench_kernels_cmd(
    choice: DeviceChoice,
    size: Option<BenchSize>,
    json: bool,
) -> Result<ExitCode> {
    let device = Device::from_choice(choice)?;
    let size = size.unwrap_or(ceiling_size(&device));
    let name = match &device {
        Device::Cpu => "cpu".to_owned(),
        Device::Cuda(d) => d.info()?.name,
    };
    eprintln!("measuring ceilings on {name} ...");
    let ceil = bench::measure_ceilings(&device, size)?;
    if json {
        println!(
            "{}",
            serde_json::json!({"device": name, "copy_gbs": ceil.copy_gbs, "gemm_tflops": ceil.gemm_tflops})
        );
    } else {
        println!("device: {name}");
        println!(
            "ceilings: copy {:.0} GB/s (read + write), GEMM {:.1} TFLOP/s",
            ceil.copy_gbs, ceil.gemm_tflops
        );
        println!(
            "{:<26} {:<52} {:>10} {:>14} {:>9}",
            "kernel", "shape", "median ms", "rate", "% ceiling"
        );
    }
    bench::bench_kernels(&device, size, &ceil, |r| {
        let unit = if r.bound == bench::Bound::Memory {
            "GB/s"
        } else {
            "TFLOP/s"
        };
        if json {
            println!(
                "{}",
                serde_json::json!({"kernel": r.kernel, "shape": r.shape, "median_ms": r.median_ms, "rate": r.rate, "unit": unit, "percent_of_ceiling": r.percent_of_ceiling})
            );
        } else {
            println!(
                "{:<26} {:<52} {:>10.3} {:>9.2} {:<7} {:>6.1}%",
                r.kernel, r.shape, r.median_ms, r.rate, unit, r.percent_of_ceiling
            );
        }
    })?;
    Ok(ExitCode::SUCCESS)
}

fn verify(files: &[PathBuf], choice: DeviceChoice) -> Result<ExitCode> {
    let device = Device::from_choice(choice)?;
    println!("verify on {device:?}");
    let (mut failed, mut passed, mut skipped) = (0usize, 0usize, 0usize);
    for path in files {
        let report = crate::verify::verify_file(path, &device)?;
        let name = path.file_name().map_or_else(
            || path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        match &report.outcome {
            Outcome::Skipped(why) => {
                skipped += 1;
                println!("SKIP {name} ({}): {why}", report.family);
            }
            Outcome::Checked(checks) => {
                for c in checks {
                    println!(
                        "{} {name} {:<26} max abs err {:.3e}  max rel err {:.3e}",
                        if c.pass { "PASS" } else { "FAIL" },
                        c.name,
                        c.max_abs_err,
                        c.max_rel_err
                    );
                    if c.pass {
                        passed += 1;
                    } else {
                        failed += 1;
                    }
                }
            }
        }
    }
    println!("verify: {passed} passed, {failed} failed, {skipped} files skipped");
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Everything `rlhf doctor` prints, as one string.
pub fn doctor_report() -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "rlhf {}", env!("CARGO_PKG_VERSION"));
    let _ = writeln!(s, "CUDA toolchain at build: {}", kernels::TOOLCHAIN);
    if kernels::compiled() {
        let families: Vec<&str> = kernels::KERNEL_IMAGES.iter().map(|(f, _)| *f).collect();
        let _ = writeln!(
            s,
            "kernel families embedded: {} ({})",
            families.len(),
            families.join(", ")
        );
        let _ = writeln!(
            s,
            "{:<12} {:<36} {:<7} {:>5} {:>8} {:>7} {:>7}",
            "family", "kernel", "arch", "regs", "smem B", "stack B", "spill B"
        );
        for r in kernels::KERNEL_RESOURCES {
            let _ = writeln!(
                s,
                "{:<12} {:<36} {:<7} {:>5} {:>8} {:>7} {:>7}{}",
                r.family,
                r.kernel,
                r.arch,
                r.registers,
                r.shared_bytes,
                r.stack_bytes,
                r.spill_stores + r.spill_loads,
                match (r.spill_stores + r.spill_loads > 0, r.wgmma_serialized) {
                    (true, true) => "  SPILLS, WGMMA SERIALISED",
                    (true, false) => "  SPILLS",
                    (false, true) => "  WGMMA SERIALISED",
                    (false, false) => "",
                }
            );
        }
    } else {
        let _ = writeln!(
            s,
            "kernels: none embedded; this is a CPU-only build (run scripts/setup, then rebuild)"
        );
    }
    match unavailable_reason() {
        Some(why) => {
            let _ = writeln!(s, "GPU: none ({why}); ops run on the CPU reference path");
        }
        None => match CudaDevice::shared(0).and_then(|d| d.info().map(|i| (d, i))) {
            Ok((dev, info)) => {
                let _ = writeln!(
                    s,
                    "GPU 0: {} (compute capability {}.{}, {} SMs, {:.1} GiB, driver {}.{})",
                    info.name,
                    info.compute_capability.0,
                    info.compute_capability.1,
                    info.multiprocessors,
                    info.total_memory as f64 / (1u64 << 30) as f64,
                    info.driver_version / 1000,
                    (info.driver_version % 1000) / 10
                );
                match dev.blas() {
                    Ok(_) => {
                        let _ = writeln!(s, "cuBLAS: loaded");
                    }
                    Err(e) => {
                        let _ = writeln!(s, "cuBLAS: unavailable ({e})");
                    }
                }
            }
            Err(e) => {
                let _ = writeln!(s, "GPU: present but unusable ({e})");
            }
        },
    }
    s
}

/// Token ids of a prompt: raw, or as one user turn of the chat template with the assistant's turn
/// opened.
pub fn prompt_tokens(tok: &TextTokenizer, prompt: &str, chat: bool) -> Result<Vec<i32>> {
    if chat {
        let text = tok.apply_chat_template(
            &[Message {
                role: "user".into(),
                content: prompt.into(),
            }],
            true,
        )?;
        tok.encode(&text, false)
    } else {
        tok.encode(prompt, true)
    }
}

/// The ids that end generation: the config's EOS ids and the tokenizer's EOS token.
pub fn eos_ids(model: &Model, tok: &TextTokenizer) -> Vec<i32> {
    let mut eos: Vec<i32> = model.cfg.eos_token_ids.iter().map(|&e| e as i32).collect();
    if let Some(id) = tok.eos_token().and_then(|t| tok.token_id(t)) {
        if !eos.contains(&id) {
            eos.push(id);
        }
    }
    eos
}

/// A model that generates or is evaluated as a policy: a reward model (scalar head) is refused.
fn load_causal_lm(dir: &std::path::Path, device: &Device) -> Result<Model> {
    let model = Model::load(dir, device)?;
    crate::train::refuse_reward_model(&model, dir)?;
    Ok(model)
}

fn generate_cmd(
    dir: &std::path::Path,
    prompt: &str,
    chat: bool,
    mut opts: GenerateOptions,
    choice: DeviceChoice,
) -> Result<ExitCode> {
    use std::io::Write;
    let device = Device::from_choice(choice)?;
    let model = load_causal_lm(dir, &device)?;
    let tok = TextTokenizer::load(dir)?;
    opts.eos = eos_ids(&model, &tok);
    let ids = prompt_tokens(&tok, prompt, chat)?;
    let mut shown = String::new();
    let mut sampled = Vec::new();
    let stdout = std::io::stdout();
    let start = std::time::Instant::now();
    let eos = opts.eos.clone();
    let out = model.generate(&[ids], &opts, |_, t| {
        if eos.contains(&t) {
            return;
        }
        sampled.push(t);
        // Decode the whole continuation each time: a token can be half of a UTF-8 character.
        if let Ok(text) = tok.decode(&sampled, true) {
            if text.len() > shown.len() && text.starts_with(&shown) {
                let mut lock = stdout.lock();
                let _ = write!(lock, "{}", &text[shown.len()..]);
                let _ = lock.flush();
                shown = text;
            }
        }
    })?;
    let n = out[0].tokens.len();
    let secs = start.elapsed().as_secs_f64();
    println!();
    eprintln!(
        "[{n} tokens in {secs:.2}s, {:.1} tokens/s, {}]",
        n as f64 / secs,
        if out[0].finished {
            "stopped at EOS"
        } else {
            "length limit"
        }
    );
    Ok(ExitCode::SUCCESS)
}

/// log p(token[t] | tokens[..t]) for t ≥ 1 under the model.
pub fn sequence_logprobs(model: &Model, ids: &[i32]) -> Result<Vec<f32>> {
    use crate::ops::logprob::linear_logprob_fwd;
    if ids.len() < 2 {
        return Ok(Vec::new());
    }
    let hidden = model.forward_frozen(&Batch::new(&[ids.to_vec()]))?;
    let mut targets: Vec<i32> = ids[1..].to_vec();
    targets.push(-100);
    let t = crate::Tensor::from_i32(&[ids.len()], targets, &model.device)?;
    let out = linear_logprob_fwd(&hidden, model.lm_head(), &t, 1.0)?;
    let mut lp = out.logp.to_f32_vec()?;
    lp.pop();
    Ok(lp)
}

fn logprobs_cmd(
    dir: &std::path::Path,
    text: &str,
    json: bool,
    choice: DeviceChoice,
) -> Result<ExitCode> {
    let device = Device::from_choice(choice)?;
    let model = Model::load(dir, &device)?;
    let tok = TextTokenizer::load(dir)?;
    let ids = tok.encode(text, true)?;
    if ids.is_empty() {
        return Err(crate::Error::Unsupported {
            op: "logprobs",
            detail: "--text encodes to no tokens".into(),
        });
    }
    let lp = sequence_logprobs(&model, &ids)?;
    if json {
        let lps: Vec<serde_json::Value> = std::iter::once(serde_json::Value::Null)
            .chain(lp.iter().map(|&v| serde_json::json!(v)))
            .collect();
        println!("{}", serde_json::json!({"tokens": ids, "logprobs": lps}));
    } else {
        for (i, &id) in ids.iter().enumerate() {
            let piece = tok.decode(&[id], false)?;
            match i.checked_sub(1).map(|j| lp[j]) {
                Some(v) => println!("{id:>8} {:<20} {v:>10.4}", format!("{piece:?}")),
                None => println!("{id:>8} {:<20} {:>10}", format!("{piece:?}"), "-"),
            }
        }
        println!(
            "total log-prob {:.4} over {} predicted tokens",
            lp.iter().map(|&v| v as f64).sum::<f64>(),
            lp.len()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Four decimals, or four significant digits where that would print a small value as 0.0000
/// (learning rates of 5e-6) or a large one at length.
fn metric_text(v: f64) -> String {
    if v != 0.0 && !(1e-3..1e6).contains(&v.abs()) {
        format!("{v:.3e}")
    } else {
        format!("{v:.4}")
    }
}

/// Prints a run's outcome; `unit` is what its steps are called ("step", or "iteration" for the
/// online trainers).
fn finish(run: &RunSummary, args: &TrainArgs, unit: &str) {
    let shown: Vec<String> = run
        .last
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "step" | "epoch" | "iteration"))
        .map(|(k, v)| format!("{k} {}", metric_text(*v)))
        .collect();
    if run.interrupted {
        println!(
            "interrupted at {unit} {}; checkpoint saved (continue with --resume)",
            run.steps
        );
    }
    println!("{} {unit}s; last: {}", run.steps, shown.join(", "));
    println!(
        "model: {}   metrics: {}",
        run.final_dir.display(),
        args.out.join("metrics.jsonl").display()
    );
}

fn pref_cmd(args: &TrainArgs, which: crate::train::dpo::PrefTrainer) -> Result<ExitCode> {
    let (run, held) = crate::train::dpo::train(args, which)?;
    finish(&run, args, "step");
    if let Some((acc, margin)) = held {
        println!(
            "held-out implicit reward accuracy {:.1}%, mean margin {margin:.4}",
            100.0 * acc
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn score_cmd(
    dir: &std::path::Path,
    data: &std::path::Path,
    choice: DeviceChoice,
) -> Result<ExitCode> {
    let device = Device::from_choice(choice)?;
    let model = Model::load(dir, &device)?;
    if !model.cfg.scalar_head {
        return Err(crate::Error::file(
            dir.join("config.json"),
            "not a reward model (no ForSequenceClassification head)",
        ));
    }
    let tok = TextTokenizer::load(dir)?;
    let enc = crate::train::data::Encoder {
        tok: &tok,
        limits: Default::default(),
        eos: crate::train::eos_id(&model, &tok)?,
    };
    let (examples, report) = crate::train::data::load_sft(data, &enc, false)?;
    eprintln!("{}", report.summary(data));
    for chunk in examples.chunks(16) {
        let seqs: Vec<Vec<i32>> = chunk.iter().map(|e| e.tokens()).collect();
        for r in crate::train::reward::sequence_rewards(&model, &seqs)? {
            println!("{}", serde_json::json!({ "score": r }));
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[allow(clippy::too_many_arguments)]
fn eval_cmd(
    dir: &std::path::Path,
    data: &std::path::Path,
    reference: Option<&std::path::Path>,
    reward_model: Option<&std::path::Path>,
    beta: f64,
    max_new_tokens: usize,
    temperature: f32,
    seed: u64,
    choice: DeviceChoice,
) -> Result<ExitCode> {
    let device = Device::from_choice(choice)?;
    let policy = load_causal_lm(dir, &device)?;
    let tok = TextTokenizer::load(dir)?;
    let eos = crate::train::eos_id(&policy, &tok)?;
    let enc = crate::train::data::Encoder {
        tok: &tok,
        limits: Default::default(),
        eos,
    };
    let (pairs, report) = crate::train::data::load_pairs(data, &enc, false)?;
    eprintln!("{}", report.summary(data));
    let reference = reference.map(|d| Model::load(d, &device)).transpose()?;
    let rm = reward_model.map(|d| Model::load(d, &device)).transpose()?;
    let opts = GenerateOptions {
        max_new_tokens,
        temperature,
        seed,
        eos: vec![eos],
        ..Default::default()
    };
    let r = crate::train::eval::evaluate(
        &policy,
        reference.as_ref(),
        rm.as_ref(),
        &pairs,
        beta,
        &opts,
        16,
    )?;
    let show = |name: &str, v: Option<f64>| {
        if let Some(v) = v {
            println!("{name:<40} {v:.4}");
        }
    };
    show("implicit reward accuracy", r.implicit_accuracy);
    show("implicit reward margin", r.implicit_margin);
    show("reward model accuracy", r.reward_model_accuracy);
    show("KL to reference on samples (nats)", r.kl_to_reference);
    show("mean reward of samples", r.mean_sample_reward);
    show("win rate over reference samples", r.win_rate);
    if reference.is_none() && rm.is_none() {
        println!("nothing to measure: give --reference and/or --reward-model");
    }
    Ok(ExitCode::SUCCESS)
}
