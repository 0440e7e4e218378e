//! Datasets: JSON Lines in TRL's column conventions, tokenized with the model's tokenizer.
//!
//! - SFT: `messages` (a chat) or `prompt` / `completion`.
//! - Preferences: `prompt` / `chosen` / `rejected` (optional numeric `margin` for reward models).
//! - KTO: `prompt` / `completion` / `label` (true or 1 for desirable).
//!
//! Each text field is a string (plain text) or a list of `{role, content}` messages (chat, rendered
//! with the tokenizer's chat template). Plain prompts get the tokenizer's special tokens (BOS);
//! completions end with the EOS token. A bad line is an error naming the file, the line and the field,
//! or with `skip_invalid` is counted and reported, never dropped silently.
//!
//! Truncation: a prompt longer than `max_prompt_len` keeps its end (the question nearest the answer);
//! then a completion is cut from its end so that prompt + completion fits `max_len`.

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::model::tokenizer::{Message, TextTokenizer};

/// Token ids of one prompt and one completion.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub prompt: Vec<i32>,
    pub completion: Vec<i32>,
}

impl Example {
    pub fn tokens(&self) -> Vec<i32> {
        [self.prompt.as_slice(), self.completion.as_slice()].concat()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct PairExample {
    pub prompt: Vec<i32>,
    pub chosen: Vec<i32>,
    pub rejected: Vec<i32>,
    pub margin: f32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct KtoExample {
    pub prompt: Vec<i32>,
    pub completion: Vec<i32>,
    pub desirable: bool,
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_len: usize,
    pub max_prompt_len: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_len: 1024,
            max_prompt_len: 512,
        }
    }
}

/// A loader of one kind of data: path, encoder, whether to skip invalid lines.
pub type Loader<T> = fn(&Path, &Encoder, bool) -> Result<(Vec<T>, LoadReport)>;

/// What loading found, for the run summary.
#[derive(Debug, Default, Clone)]
pub struct LoadReport {
    pub lines: usize,
    pub loaded: usize,
    pub skipped: Vec<String>,
    pub truncated: usize,
}

impl LoadReport {
    pub fn summary(&self, path: &Path) -> String {
        let mut s = format!(
            "{}: {} examples from {} lines",
            path.display(),
            self.loaded,
            self.lines
        );
        if self.truncated > 0 {
            s += &format!(", {} truncated", self.truncated);
        }
        if !self.skipped.is_empty() {
            s += &format!(
                ", {} invalid lines skipped (first: {})",
                self.skipped.len(),
                self.skipped[0]
            );
        }
        s
    }

    /// Prints the summary unless `quiet`; skipped or truncated lines are printed even then, since
    /// nothing may be dropped or cut without a word.
    pub fn print(&self, path: &Path, quiet: bool) {
        if !quiet || !self.skipped.is_empty() || self.truncated > 0 {
            eprintln!("{}", self.summary(path));
        }
    }
}

struct Ctx<'a> {
    path: &'a Path,
    line: usize,
}

impl Ctx<'_> {
    fn err(&self, detail: impl std::fmt::Display) -> Error {
        Error::file(self.path, format!("line {}: {detail}", self.line))
    }
}

/// A text field: plain string, or a list of chat messages.
enum Text {
    Plain(String),
    Chat(Vec<Message>),
}

/// The roles chat templates render; any other is a typo the template would drop or misrender.
const CHAT_ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

fn parse_messages(ctx: &Ctx, field: &str, v: &Value) -> Result<Vec<Message>> {
    let list = v
        .as_array()
        .ok_or_else(|| ctx.err(format!("field `{field}` must be a list of messages")))?;
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let role = m.get("role").and_then(Value::as_str);
            let content = m.get("content").and_then(Value::as_str);
            match (role, content) {
                (Some(r), Some(c)) if CHAT_ROLES.contains(&r) => Ok(Message {
                    role: r.to_owned(),
                    content: c.to_owned(),
                }),
                (Some(r), Some(_)) => Err(ctx.err(format!(
                    "field `{field}`[{i}] has role `{r}`; chat templates know {}",
                    CHAT_ROLES.join(", ")
                ))),
                _ => Err(ctx.err(format!(
                    "field `{field}`[{i}] must be an object with string `role` and `content`"
                ))),
            }
        })
        .collect()
}

fn text_field(ctx: &Ctx, obj: &serde_json::Map<String, Value>, field: &str) -> Result<Text> {
    match obj.get(field) {
        None => Err(ctx.err(format!("missing field `{field}`"))),
        Some(Value::String(s)) => Ok(Text::Plain(s.clone())),
        Some(v @ Value::Array(_)) => Ok(Text::Chat(parse_messages(ctx, field, v)?)),
        Some(_) => Err(ctx.err(format!(
            "field `{field}` must be a string or a list of messages"
        ))),
    }
}

pub struct Encoder<'a> {
    pub tok: &'a TextTokenizer,
    pub limits: Limits,
    pub eos: i32,
}

impl Encoder<'_> {
    /// Tokenizes a prompt and its completion; both plain or both chat.
    fn encode(
        &self,
        ctx: &Ctx,
        prompt: &Text,
        completion: &Text,
        field: &str,
    ) -> Result<(Vec<i32>, Vec<i32>)> {
        let (p, mut c) = match (prompt, completion) {
            (Text::Plain(p), Text::Plain(c)) => {
                if c.trim().is_empty() {
                    return Err(ctx.err(format!("field `{field}` is empty")));
                }
                (self.tok.encode(p, true)?, self.tok.encode(c, false)?)
            }
            (Text::Chat(p), Text::Chat(c)) => {
                if c.is_empty() || c.iter().all(|m| m.content.trim().is_empty()) {
                    return Err(ctx.err(format!("field `{field}` is empty")));
                }
                // Only the model's own turns are trained as its completion.
                if let Some(m) = c.iter().find(|m| m.role != "assistant") {
                    return Err(ctx.err(format!(
                        "field `{field}`: the completion holds a `{}` turn; only assistant turns may follow the prompt",
                        m.role
                    )));
                }
                let prompt_text = self.tok.apply_chat_template(p, true)?;
                let full = self
                    .tok
                    .apply_chat_template(&[p.as_slice(), c.as_slice()].concat(), false)?;
                let rest = full.strip_prefix(&prompt_text).ok_or_else(|| {
                    ctx.err(format!("the chat template renders the prompt differently alone than before `{field}`; cannot split them"))
                })?;
                (
                    self.tok.encode(&prompt_text, false)?,
                    self.tok.encode(rest, false)?,
                )
            }
            _ => {
                return Err(ctx.err(format!(
                    "`prompt` and `{field}` must both be plain text or both be chat messages"
                )))
            }
        };
        // Plain completions end with EOS, as TRL appends it; a chat template closes the turn itself
        // (with EOS, as SmolLM2's <|im_end|>, and perhaps a newline after it), so EOS is added only
        // where the rendered turn holds none.
        let ends = match completion {
            Text::Plain(_) => c.last() == Some(&self.eos),
            Text::Chat(_) => c.contains(&self.eos),
        };
        if !ends {
            c.push(self.eos);
        }
        if p.is_empty() {
            return Err(ctx.err(
                "field `prompt` is empty: no token comes before the completion's first, so it could not be scored",
            ));
        }
        Ok((p, c))
    }

    /// Applies the truncation policy; returns whether anything was cut.
    fn truncate(&self, prompt: &mut Vec<i32>, completions: &mut [&mut Vec<i32>]) -> bool {
        let mut cut = false;
        if prompt.len() > self.limits.max_prompt_len {
            prompt.drain(..prompt.len() - self.limits.max_prompt_len);
            cut = true;
        }
        let room = self.limits.max_len.saturating_sub(prompt.len()).max(1);
        for c in completions.iter_mut() {
            if c.len() > room {
                c.truncate(room);
                cut = true;
            }
        }
        cut
    }
}

/// Reads `path` line by line; `parse` turns one JSON object into an item.
fn read_jsonl<T>(
    path: &Path,
    skip_invalid: bool,
    mut parse: impl FnMut(&Ctx, &serde_json::Map<String, Value>) -> Result<(T, bool)>,
) -> Result<(Vec<T>, LoadReport)> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    let mut report = LoadReport::default();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        report.lines += 1;
        let ctx = Ctx { path, line: i + 1 };
        let item = serde_json::from_str::<Value>(line)
            .map_err(|e| ctx.err(format!("invalid JSON: {e}")))
            .and_then(|v| match v {
                Value::Object(o) => parse(&ctx, &o),
                _ => Err(ctx.err("expected a JSON object")),
            });
        match item {
            Ok((x, truncated)) => {
                out.push(x);
                report.loaded += 1;
                report.truncated += usize::from(truncated);
            }
            Err(e) if skip_invalid => report.skipped.push(e.to_string()),
            Err(e) => return Err(e),
        }
    }
    if out.is_empty() {
        return Err(Error::file(path, "no usable examples"));
    }
    Ok((out, report))
}

/// SFT data: `messages` (the last assistant turn is the completion) or `prompt` / `completion`.
pub fn load_sft(
    path: &Path,
    enc: &Encoder,
    skip_invalid: bool,
) -> Result<(Vec<Example>, LoadReport)> {
    read_jsonl(path, skip_invalid, |ctx, o| {
        let (prompt, completion, field) = if let Some(m) = o.get("messages") {
            let msgs = parse_messages(ctx, "messages", m)?;
            let last = msgs
                .iter()
                .rposition(|m| m.role == "assistant")
                .ok_or_else(|| ctx.err("field `messages` has no assistant turn"))?;
            (
                Text::Chat(msgs[..last].to_vec()),
                Text::Chat(msgs[last..].to_vec()),
                "messages",
            )
        } else {
            (
                text_field(ctx, o, "prompt")?,
                text_field(ctx, o, "completion")?,
                "completion",
            )
        };
        let (mut p, mut c) = enc.encode(ctx, &prompt, &completion, field)?;
        let cut = enc.truncate(&mut p, &mut [&mut c]);
        Ok((
            Example {
                prompt: p,
                completion: c,
            },
            cut,
        ))
    })
}

pub fn load_pairs(
    path: &Path,
    enc: &Encoder,
    skip_invalid: bool,
) -> Result<(Vec<PairExample>, LoadReport)> {
    read_jsonl(path, skip_invalid, |ctx, o| {
        let prompt = text_field(ctx, o, "prompt")?;
        let (p, mut c) = enc.encode(ctx, &prompt, &text_field(ctx, o, "chosen")?, "chosen")?;
        let (_, mut r) = enc.encode(ctx, &prompt, &text_field(ctx, o, "rejected")?, "rejected")?;
        let margin = match o.get("margin") {
            None | Some(Value::Null) => 0.0,
            Some(v) => {
                let m = v
                    .as_f64()
                    .ok_or_else(|| ctx.err("field `margin` must be a number"))?;
                if !(m as f32).is_finite() {
                    return Err(
                        ctx.err(format!("field `margin` is {m:e}, beyond what an f32 holds"))
                    );
                }
                m as f32
            }
        };
        let mut p = p;
        let cut = enc.truncate(&mut p, &mut [&mut c, &mut r]);
        Ok((
            PairExample {
                prompt: p,
                chosen: c,
                rejected: r,
                margin,
            },
            cut,
        ))
    })
}

pub fn load_kto(
    path: &Path,
    enc: &Encoder,
    skip_invalid: bool,
) -> Result<(Vec<KtoExample>, LoadReport)> {
    read_jsonl(path, skip_invalid, |ctx, o| {
        let desirable = match o.get("label") {
            Some(Value::Bool(b)) => *b,
            Some(Value::Number(n)) if n.as_f64() == Some(1.0) => true,
            Some(Value::Number(n)) if n.as_f64() == Some(0.0) => false,
            Some(_) => return Err(ctx.err("field `label` must be true/false or 1/0")),
            None => return Err(ctx.err("missing field `label`")),
        };
        let (mut p, mut c) = enc.encode(
            ctx,
            &text_field(ctx, o, "prompt")?,
            &text_field(ctx, o, "completion")?,
            "completion",
        )?;
        let cut = enc.truncate(&mut p, &mut [&mut c]);
        Ok((
            KtoExample {
                prompt: p,
                completion: c,
                desirable,
            },
            cut,
        ))
    })
}

/// A deterministic split: every `1/fraction`-th example (by a seeded shuffle) goes to evaluation.
pub fn split<T: Clone>(items: &[T], eval_fraction: f64, seed: u64) -> (Vec<T>, Vec<T>) {
    let mut idx: Vec<usize> = (0..items.len()).collect();
    shuffle(&mut idx, seed);
    let n_eval = ((items.len() as f64) * eval_fraction).round() as usize;
    let n_eval = n_eval.min(items.len().saturating_sub(1));
    let (e, t) = idx.split_at(n_eval);
    (
        t.iter().map(|&i| items[i].clone()).collect(),
        e.iter().map(|&i| items[i].clone()).collect(),
    )
}

/// Fisher-Yates with the crate's seeded generator.
pub fn shuffle<T>(v: &mut [T], seed: u64) {
    let mut rng = crate::rng::Rng::new(seed);
    for i in (1..v.len()).rev() {
        v.swap(i, rng.below(i + 1));
    }
}

/// A prompt for online training.
#[derive(Debug, Clone)]
pub struct Prompt {
    pub tokens: Vec<i32>,
    /// The reference `answer`, for rule rewards.
    pub answer: Option<String>,
    /// The `prompt` field as written (text or messages), to write back into labelled data.
    pub raw: Value,
}

/// Prompts for online training: `prompt` (plain text or chat messages; chat prompts get the
/// assistant's turn opened) and, when present, a reference `answer` for rule-based rewards.
pub fn load_prompts(
    path: &Path,
    enc: &Encoder,
    skip_invalid: bool,
) -> Result<(Vec<Prompt>, LoadReport)> {
    read_jsonl(path, skip_invalid, |ctx, o| {
        let mut ids = match text_field(ctx, o, "prompt")? {
            Text::Plain(p) => enc.tok.encode(&p, true)?,
            Text::Chat(m) => enc
                .tok
                .encode(&enc.tok.apply_chat_template(&m, true)?, false)?,
        };
        if ids.is_empty() {
            return Err(ctx.err("field `prompt` is empty"));
        }
        let answer = match o.get("answer") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.trim().is_empty() => {
                return Err(ctx.err("field `answer` is empty"))
            }
            Some(Value::String(s)) => Some(s.clone()),
            Some(v) if v.is_number() => Some(v.to_string()),
            Some(_) => return Err(ctx.err("field `answer` must be a string or a number")),
        };
        let cut = ids.len() > enc.limits.max_prompt_len;
        if cut {
            ids.drain(..ids.len() - enc.limits.max_prompt_len);
        }
        Ok((
            Prompt {
                tokens: ids,
                answer,
                raw: o["prompt"].clone(),
            },
            cut,
        ))
    })
}
