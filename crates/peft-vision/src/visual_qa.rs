//! Visual question answering data: a question about an image, optional context and choices,
//! and an answer, in two layouts.
//!
//! - **ScienceQA** (`problems.json` style): a JSON array, a JSON object keyed by problem id, or
//!   JSON Lines, of records with `question`, `choices` (strings), `answer` (index into
//!   `choices`), `hint` (context, may be empty) and `image` (file name, or `null` for a
//!   text-only question).
//! - **Plain JSONL**: one `{"image": ..., "question": ..., "answer": "..."}` per line.
//!
//! Image paths are relative to the data file's folder. The prompt is the workspace's Alpaca
//! template with the question as instruction and `Context: …` / `Options: (A) … (B) …` as
//! input (empty for plain records); the answer text is the response. The image goes in through
//! the adapter, not through the text.

use std::path::{Path, PathBuf};

use peft_train::data::AlpacaRecord;
use serde_json::Value;

use crate::error::{Result, VisionError};

/// One visual question.
#[derive(Debug, Clone, PartialEq)]
pub struct VisualQaRecord {
    /// The image file, resolved against the data file's folder; `None` for text-only items.
    pub image: Option<PathBuf>,
    /// The question.
    pub question: String,
    /// Context (ScienceQA's `hint`), possibly empty.
    pub context: String,
    /// Answer options (empty for open questions).
    pub choices: Vec<String>,
    /// The correct answer's text.
    pub answer: String,
}

impl VisualQaRecord {
    /// The index of the answer among the choices, if it is one of them.
    pub fn answer_index(&self) -> Option<usize> {
        self.choices.iter().position(|c| *c == self.answer)
    }

    /// The text part as an Alpaca record with `output` as the response.
    pub fn alpaca_with_output(&self, output: &str) -> AlpacaRecord {
        let mut input = String::new();
        if !self.context.is_empty() {
            input.push_str("Context: ");
            input.push_str(&self.context);
        }
        if !self.choices.is_empty() {
            if !input.is_empty() {
                input.push('\n');
            }
            input.push_str("Options:");
            for (i, choice) in self.choices.iter().enumerate() {
                let letter = char::from(b'A' + (i % 26) as u8);
                input.push_str(&format!(" ({letter}) {choice}"));
            }
        }
        AlpacaRecord::new(self.question.clone(), input, output)
    }

    /// The training record: prompt and the correct answer.
    pub fn alpaca(&self) -> AlpacaRecord {
        self.alpaca_with_output(&self.answer)
    }
}

/// How the text part of a record becomes a prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptTemplate {
    /// The workspace's Alpaca template (question as instruction, context and options as input).
    Alpaca,
    /// A short form, `Question: …\nContext: …\nOptions: (A) … (B) …\nAnswer:`, followed by
    /// a space and the answer: a third of the Alpaca template's tokens, for small CPU runs.
    Short,
}

impl VisualQaRecord {
    /// The prompt in `template`, without the answer.
    pub fn prompt(&self, template: PromptTemplate) -> String {
        match template {
            PromptTemplate::Alpaca => self.alpaca().prompt(),
            PromptTemplate::Short => {
                let mut prompt = format!("Question: {}\n", self.question);
                let input = self.alpaca_with_output("").input;
                if !input.is_empty() {
                    prompt.push_str(&input);
                    prompt.push('\n');
                }
                prompt.push_str("Answer:");
                prompt
            }
        }
    }
}

/// The two layouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VisualQaLayout {
    /// `question`, `choices`, `answer` index, `hint`, `image`.
    ScienceQa,
    /// `image`, `question`, `answer` text.
    Plain,
}

/// Reads a data file, choosing the layout per record: a record with `choices` is ScienceQA's.
///
/// # Errors
/// An unreadable or malformed file, and any record with a missing or mistyped field or an
/// answer index outside its choices (naming the file and the record).
pub fn load_visual_qa(path: impl AsRef<Path>) -> Result<Vec<VisualQaRecord>> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|e| VisionError::io(path, e))?;
    let folder = path.parent().unwrap_or(Path::new("")).to_path_buf();
    let bad = |at: String, message: String| VisionError::Format {
        path: path.into(),
        message: format!("{at}: {message}"),
    };
    let mut values: Vec<(String, Value)> = Vec::new();
    match serde_json::from_str::<Value>(&text) {
        Ok(Value::Array(items)) => values.extend(
            items
                .into_iter()
                .enumerate()
                .map(|(i, v)| (format!("record {i}"), v)),
        ),
        Ok(Value::Object(map)) if !map.contains_key("question") => {
            values.extend(map.into_iter().map(|(k, v)| (format!("problem {k}"), v)))
        }
        _ => {
            for (i, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let value = serde_json::from_str(line)
                    .map_err(|e| bad(format!("line {}", i + 1), e.to_string()))?;
                values.push((format!("line {}", i + 1), value));
            }
        }
    }
    if values.is_empty() {
        return Err(bad("file".into(), "no records".into()));
    }
    values
        .into_iter()
        .map(|(at, value)| parse_record(&value, &folder).map_err(|m| bad(at, m)))
        .collect()
}

fn parse_record(value: &Value, folder: &Path) -> std::result::Result<VisualQaRecord, String> {
    let object = value.as_object().ok_or("not a JSON object")?;
    let string = |key: &str| -> std::result::Result<String, String> {
        match object.get(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(format!("`{key}` must be a string, found {other}")),
            None => Err(format!("no `{key}`")),
        }
    };
    let image = match object.get("image") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if !s.is_empty() => Some(folder.join(s)),
        Some(other) => {
            return Err(format!(
                "`image` must be a file name or null, found {other}"
            ))
        }
    };
    let question = string("question")?;
    let layout = if object.contains_key("choices") {
        VisualQaLayout::ScienceQa
    } else {
        VisualQaLayout::Plain
    };
    match layout {
        VisualQaLayout::ScienceQa => {
            let choices: Vec<String> = object["choices"]
                .as_array()
                .ok_or("`choices` must be a list of strings")?
                .iter()
                .map(|c| c.as_str().map(str::to_owned))
                .collect::<Option<_>>()
                .ok_or("`choices` must be a list of strings")?;
            let index = object
                .get("answer")
                .and_then(Value::as_u64)
                .ok_or("`answer` must be the index of the correct choice")?;
            let answer = choices.get(index as usize).cloned().ok_or(format!(
                "`answer` {index} is outside the {} choices",
                choices.len()
            ))?;
            let context = match object.get("hint") {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(other) => return Err(format!("`hint` must be a string, found {other}")),
            };
            Ok(VisualQaRecord {
                image,
                question,
                context,
                choices,
                answer,
            })
        }
        VisualQaLayout::Plain => Ok(VisualQaRecord {
            image,
            question,
            context: String::new(),
            choices: Vec::new(),
            answer: string("answer")?,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("peft-vision-qa-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn scienceqa_and_plain_records_read_with_paths_beside_the_file() {
        let path = write(
            "sqa.json",
            r#"{"1": {"question": "Which is a fish?", "choices": ["cat", "trout"], "answer": 1,
                      "hint": "Look closely.", "image": "image.png", "subject": "natural science"},
                "2": {"question": "2 + 2?", "choices": ["4", "5"], "answer": 0, "hint": "", "image": null}}"#,
        );
        let mut records = load_visual_qa(&path).unwrap();
        records.sort_by(|a, b| a.question.cmp(&b.question));
        assert_eq!(records[1].answer, "trout");
        assert_eq!(
            records[1].image,
            Some(path.parent().unwrap().join("image.png"))
        );
        assert_eq!(records[0].image, None);
        let prompt = records[1].alpaca().prompt();
        assert!(
            prompt.contains("Context: Look closely.\nOptions: (A) cat (B) trout"),
            "{prompt}"
        );
        let plain = write(
            "plain.jsonl",
            "{\"image\": \"a.png\", \"question\": \"Colour?\", \"answer\": \"red\"}\n",
        );
        let records = load_visual_qa(&plain).unwrap();
        assert_eq!(records[0].answer, "red");
        assert!(records[0].choices.is_empty());
    }

    #[test]
    fn a_bad_answer_index_names_the_record() {
        let path = write(
            "bad.jsonl",
            "{\"question\": \"q\", \"choices\": [\"a\"], \"answer\": 3, \"image\": null}\n",
        );
        let message = load_visual_qa(&path).unwrap_err().to_string();
        assert!(
            message.contains("line 1") && message.contains("answer"),
            "{message}"
        );
    }
}
