//! RLAIF: a model labels preference pairs. The policy samples several responses per prompt; a judge
//! ranks them and the best and worst become a TRL-format pair with the judge's confidence.
//!
//! Judges: a reward model (confidence σ(r_best − r_worst)), or an LLM asked "which response is
//! better, A or B?" whose next-token log-probs of A and B are compared, asked in both orders so the
//! position bias cancels: P(x ≻ y) = ½·(P(A | x first) + P(B | y first)).

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::data::{self, Encoder, Limits, Prompt};
use super::reward::response_rewards;
use crate::error::{Error, Result};
use crate::model::generate::GenerateOptions;
use crate::model::tokenizer::{Message, TextTokenizer};
use crate::model::weights::write_file_atomic;
use crate::model::{Batch, Model};
use crate::ops::stable::sigmoid;
use crate::rng::Rng;

pub enum Judge {
    RewardModel(Box<Model>),
    Llm {
        model: Box<Model>,
        tok: Box<TextTokenizer>,
    },
}

impl Judge {
    pub fn load(
        reward_model: Option<&Path>,
        judge_model: Option<&Path>,
        device: &crate::Device,
    ) -> Result<Judge> {
        match (reward_model, judge_model) {
            (Some(d), None) => {
                let m = Model::load(d, device)?;
                if !m.cfg.scalar_head {
                    return Err(Error::file(
                        d.join("config.json"),
                        "--judge-reward-model needs a reward model (a scalar head)",
                    ));
                }
                Ok(Judge::RewardModel(Box::new(m)))
            }
            (None, Some(d)) => Ok(Judge::Llm {
                model: Box::new(Model::load(d, device)?),
                tok: Box::new(TextTokenizer::load(d)?),
            }),
            _ => Err(Error::Unsupported {
                op: "label",
                detail: "give exactly one of --judge-reward-model and --judge-model".into(),
            }),
        }
    }
}

/// The judge's probability that the first option answers `question` better, in one order.
fn llm_prefers_first(
    model: &Model,
    tok: &TextTokenizer,
    question: &str,
    first: &str,
    second: &str,
) -> Result<f64> {
    let ask = format!(
        "Which response answers the question better?\n\nQuestion: {question}\n\nResponse A: {first}\n\nResponse B: {second}\n\nAnswer with a single letter, A or B."
    );
    let (text, space) = if tok.has_chat_template() {
        (
            tok.apply_chat_template(
                &[Message {
                    role: "user".into(),
                    content: ask,
                }],
                true,
            )?,
            "",
        )
    } else {
        (format!("{ask}\nBetter response:"), " ")
    };
    let ids = tok.encode(&text, false)?;
    let letter = |l: &str| -> Result<i32> {
        let t = tok.encode(&format!("{space}{l}"), false)?;
        t.first().copied().ok_or_else(|| Error::Unsupported {
            op: "label",
            detail: format!("the judge's tokenizer has no token for {l:?}"),
        })
    };
    let (a, b) = (letter("A")?, letter("B")?);
    if a == b {
        // A tokenizer that splits " A" into a space and the letter would compare the space with
        // itself and call every pair a tie.
        return Err(Error::Unsupported {
            op: "label",
            detail: format!(
                "the judge's tokenizer starts {:?} and {:?} with the same token; it cannot answer by letter",
                format!("{space}A"),
                format!("{space}B")
            ),
        });
    }
    let hidden = model.forward_frozen(&Batch::new(std::slice::from_ref(&ids)))?;
    let logits = model.logits_rows(&hidden, &[ids.len() - 1])?;
    Ok(sigmoid((logits[a as usize] - logits[b as usize]) as f64))
}

/// P(x ≻ y) with both presentation orders averaged.
pub fn llm_preference(
    model: &Model,
    tok: &TextTokenizer,
    question: &str,
    x: &str,
    y: &str,
) -> Result<f64> {
    let p1 = llm_prefers_first(model, tok, question, x, y)?;
    let p2 = llm_prefers_first(model, tok, question, y, x)?;
    Ok(0.5 * (p1 + (1.0 - p2)))
}

/// One labelled pair.
#[derive(Debug, Clone)]
pub struct Labelled {
    pub prompt: Value,
    pub chosen: String,
    pub rejected: String,
    pub confidence: f64,
}

/// Samples `n` responses per prompt with `policy` and ranks them with `judge`. Prompts without two
/// distinct non-empty samples give no pair and are skipped (their count is returned).
pub fn label(
    policy: &Model,
    tok: &TextTokenizer,
    judge: &Judge,
    prompts: &[Prompt],
    n: usize,
    opts: &GenerateOptions,
) -> Result<(Vec<Labelled>, usize)> {
    if n < 2 {
        return Err(Error::Unsupported {
            op: "label",
            detail: "--responses must be at least 2".into(),
        });
    }
    let batch: Vec<Vec<i32>> = prompts
        .iter()
        .flat_map(|p| std::iter::repeat_n(p.tokens.clone(), n))
        .collect();
    let gens = policy.generate(&batch, opts, |_, _| {})?;
    let mut out = Vec::new();
    let mut skipped = 0;
    for (k, p) in prompts.iter().enumerate() {
        let group = &gens[k * n..(k + 1) * n];
        let texts: Vec<String> = group
            .iter()
            .map(|g| tok.decode(&g.tokens, true))
            .collect::<Result<_>>()?;
        // Empty responses (EOS at once) make no usable pair: a trainer rejects an empty completion.
        let distinct: Vec<usize> = (0..n)
            .filter(|&i| !texts[i].trim().is_empty() && !texts[..i].contains(&texts[i]))
            .collect();
        if distinct.len() < 2 {
            skipped += 1;
            continue;
        }
        let (best, worst, confidence) = match judge {
            Judge::RewardModel(rm) => {
                let seqs: Vec<(&[i32], &[i32])> = distinct
                    .iter()
                    .map(|&i| (p.tokens.as_slice(), group[i].tokens.as_slice()))
                    .collect();
                let r = response_rewards(rm, &seqs)?;
                let order = |f: fn(f32, f32) -> bool| {
                    (0..r.len())
                        .reduce(|a, b| if f(r[b], r[a]) { b } else { a })
                        .unwrap()
                };
                let (hi, lo) = (order(|x, y| x > y), order(|x, y| x < y));
                (distinct[hi], distinct[lo], sigmoid((r[hi] - r[lo]) as f64))
            }
            Judge::Llm { model, tok: jtok } => {
                // The judge reads the question as text: a chat prompt's last turn.
                let question = match &p.raw {
                    Value::String(s) => s.clone(),
                    Value::Array(turns) => turns
                        .last()
                        .and_then(|t| t["content"].as_str())
                        .map_or_else(|| p.raw.to_string(), str::to_owned),
                    other => other.to_string(),
                };
                // Round robin: each response's total preference over the others.
                let mut wins = vec![0.0f64; distinct.len()];
                let mut pref = vec![vec![0.5f64; distinct.len()]; distinct.len()];
                for i in 0..distinct.len() {
                    for j in i + 1..distinct.len() {
                        let q = llm_preference(
                            model,
                            jtok,
                            &question,
                            &texts[distinct[i]],
                            &texts[distinct[j]],
                        )?;
                        pref[i][j] = q;
                        pref[j][i] = 1.0 - q;
                        wins[i] += q;
                        wins[j] += 1.0 - q;
                    }
                }
                let hi = (0..wins.len())
                    .max_by(|&a, &b| wins[a].total_cmp(&wins[b]))
                    .unwrap();
                let lo = (0..wins.len())
                    .min_by(|&a, &b| wins[a].total_cmp(&wins[b]))
                    .unwrap();
                (distinct[hi], distinct[lo], pref[hi][lo])
            }
        };
        out.push(Labelled {
            prompt: p.raw.clone(),
            chosen: texts[best].clone(),
            rejected: texts[worst].clone(),
            confidence,
        });
    }
    Ok((out, skipped))
}

/// TRL's preference format: for a chat prompt (a list of messages) the responses are assistant
/// turns too, so the file loads as conversational data.
pub fn write_jsonl(path: &Path, pairs: &[Labelled]) -> Result<()> {
    let text: String = pairs
        .iter()
        .map(|p| {
            let response = |text: &str| {
                if p.prompt.is_array() {
                    json!([{"role": "assistant", "content": text}])
                } else {
                    json!(text)
                }
            };
            format!(
                "{}\n",
                json!({"prompt": p.prompt, "chosen": response(&p.chosen), "rejected": response(&p.rejected), "confidence": p.confidence})
            )
        })
        .collect();
    write_file_atomic(path, text.as_bytes())
}

#[derive(Debug, Clone, clap::Args)]
pub struct LabelArgs {
    /// The policy that samples the responses.
    #[arg(long)]
    pub model: PathBuf,
    /// JSON Lines with a `prompt` field.
    #[arg(long)]
    pub prompts: PathBuf,
    /// Where the preference pairs go (JSON Lines: prompt, chosen, rejected, confidence).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long)]
    pub judge_reward_model: Option<PathBuf>,
    /// An instruction-following model asked which response is better.
    #[arg(long)]
    pub judge_model: Option<PathBuf>,
    /// Responses sampled per prompt.
    #[arg(long, default_value_t = 2)]
    pub responses: usize,
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, value_enum, default_value_t = crate::DeviceChoice::Auto)]
    pub device: crate::DeviceChoice,
}

/// `rlhf label`: returns (pairs written, prompts skipped, mean confidence).
pub fn run(a: &LabelArgs) -> Result<(usize, usize, f64)> {
    if a.max_new_tokens == 0 {
        return Err(Error::Unsupported {
            op: "label",
            detail: "--max-new-tokens must be at least 1".into(),
        });
    }
    // Pairs need distinct samples: greedy decoding would give every prompt one response.
    super::check_positive("label", "--temperature", a.temperature as f64)?;
    let device = crate::Device::from_choice(a.device)?;
    let policy = Model::load(&a.model, &device)?;
    let tok = TextTokenizer::load(&a.model)?;
    let eos = super::eos_id(&policy, &tok)?;
    let enc = Encoder {
        tok: &tok,
        limits: Limits::default(),
        eos,
    };
    let (prompts, _) = data::load_prompts(&a.prompts, &enc, false)?;
    let judge = Judge::load(
        a.judge_reward_model.as_deref(),
        a.judge_model.as_deref(),
        &device,
    )?;
    let opts = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        temperature: a.temperature,
        seed: Rng::new(a.seed).next_u64(),
        eos: vec![eos],
        ..Default::default()
    };
    let (pairs, skipped) = label(&policy, &tok, &judge, &prompts, a.responses, &opts)?;
    if pairs.is_empty() {
        return Err(Error::file(
            &a.prompts,
            format!(
                "no prompt of {} gave two distinct non-empty responses; nothing written",
                prompts.len()
            ),
        ));
    }
    write_jsonl(&a.out, &pairs)?;
    let mean = pairs.iter().map(|p| p.confidence).sum::<f64>() / pairs.len().max(1) as f64;
    Ok((pairs.len(), skipped, mean))
}

/// Online (iterative) DPO: each round labels the current policy's samples on the prompts in
/// `args.data` with `judge` (2 responses per prompt) and runs DPO on them from the current policy,
/// which is also that round's reference. Returns the last round's model folder.
pub fn online_dpo(
    args: &super::TrainArgs,
    which: super::dpo::PrefTrainer,
    judge: &Judge,
    rounds: usize,
) -> Result<PathBuf> {
    let mut current = args.model.clone();
    for round in 1..=rounds {
        let device = crate::Device::from_choice(args.device)?;
        let policy = Model::load(&current, &device)?;
        let tok = TextTokenizer::load(&current)?;
        let eos = super::eos_id(&policy, &tok)?;
        let enc = Encoder {
            tok: &tok,
            limits: args.limits(),
            eos,
        };
        let (prompts, _) = data::load_prompts(&args.data, &enc, args.skip_invalid)?;
        let opts = GenerateOptions {
            max_new_tokens: args.max_len.saturating_sub(args.max_prompt_len).max(1),
            temperature: 1.0,
            seed: args.seed.wrapping_add(round as u64),
            eos: vec![eos],
            ..Default::default()
        };
        let (pairs, skipped) = label(&policy, &tok, judge, &prompts, 2, &opts)?;
        if pairs.is_empty() {
            return Err(Error::Unsupported {
                op: "online dpo",
                detail: format!(
                    "round {round}: every prompt's samples were identical; nothing to learn from"
                ),
            });
        }
        let dir = args.out.join(format!("round-{round}"));
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let labels = dir.join("labels.jsonl");
        write_jsonl(&labels, &pairs)?;
        let mut a = args.clone();
        a.model = current.clone();
        a.data = labels;
        a.out = dir;
        let (run, _) = super::dpo::train(&a, which)?;
        if !args.quiet {
            eprintln!(
                "round {round}: {} pairs ({skipped} prompts without two distinct responses skipped), last {:?}",
                pairs.len(),
                run.last.get("rewards/accuracies")
            );
        }
        current = run.final_dir;
    }
    Ok(current)
}
