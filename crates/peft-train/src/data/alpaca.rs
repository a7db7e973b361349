//! Stanford Alpaca instruction data: records, the two prompt templates, and tokenization as the
//! official LLaMA-Adapter fine-tuning code does it.

use std::path::Path;

use peft_llama::{ChatMessage, ChatTemplate, LlamaTokenizer};

use super::example::{Example, TokenizedDataset};
use super::json_records::{read_objects, FieldReader};
use crate::error::{RecordLocation, Result, TrainError};

/// The Alpaca prompt for records with an `input`.
///
/// Byte-for-byte `PROMPT_DICT["prompt_input"]` of Stanford Alpaca's `train.py`
/// (github.com/tatsu-lab/stanford_alpaca), which LLaMA-Adapter's
/// `alpaca_finetuning_v1/finetuning.py` (github.com/OpenGVLab/LLaMA-Adapter) repeats unchanged.
/// `{instruction}` and `{input}` are placeholders; the prompt ends at `### Response:` with no
/// newline or space after it.
pub const PROMPT_WITH_INPUT: &str = "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:";

/// The Alpaca prompt for records without an `input` (missing or empty).
///
/// Byte-for-byte `PROMPT_DICT["prompt_no_input"]` of the same two sources as
/// [`PROMPT_WITH_INPUT`].
pub const PROMPT_WITHOUT_INPUT: &str = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:";

/// One Alpaca record.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AlpacaRecord {
    /// The task.
    pub instruction: String,
    /// Optional context; empty when the record has none (missing, `null` or `""`).
    pub input: String,
    /// The reference response.
    pub output: String,
}

impl AlpacaRecord {
    /// A record from its three fields.
    pub fn new(
        instruction: impl Into<String>,
        input: impl Into<String>,
        output: impl Into<String>,
    ) -> Self {
        Self {
            instruction: instruction.into(),
            input: input.into(),
            output: output.into(),
        }
    }

    /// The prompt the model sees for this record (see [`alpaca_prompt`]).
    pub fn prompt(&self) -> String {
        alpaca_prompt(&self.instruction, &self.input)
    }
}

/// Fills the Alpaca template: [`PROMPT_WITH_INPUT`] when `input` is non-empty, else
/// [`PROMPT_WITHOUT_INPUT`] (the official code's test is `ann.get("input", "") == ""`).
///
/// Placeholders are substituted in one pass, as Python's `str.format_map` does: braces inside
/// the instruction or input are copied literally, never substituted again.
pub fn alpaca_prompt(instruction: &str, input: &str) -> String {
    let template = if input.is_empty() {
        PROMPT_WITHOUT_INPUT
    } else {
        PROMPT_WITH_INPUT
    };
    let mut prompt = String::with_capacity(template.len() + instruction.len() + input.len());
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        prompt.push_str(&rest[..start]);
        let after = &rest[start..];
        if let Some(tail) = after.strip_prefix("{instruction}") {
            prompt.push_str(instruction);
            rest = tail;
        } else if let Some(tail) = after.strip_prefix("{input}") {
            prompt.push_str(input);
            rest = tail;
        } else {
            prompt.push('{');
            rest = &after[1..];
        }
    }
    prompt.push_str(rest);
    prompt
}

/// Loads Alpaca records from a JSON array (Stanford `alpaca_data.json`, unchanged) or a JSON
/// Lines file; `input` may be missing or `null`, other fields are ignored.
///
/// # Errors
/// An unreadable, non-UTF-8 or malformed file; a record that is not an object, lacks
/// `instruction` or `output`, or has a non-string field (the error names the file and the
/// record index or line); no records at all.
pub fn load_alpaca(path: impl AsRef<Path>) -> Result<Vec<AlpacaRecord>> {
    let path = path.as_ref();
    read_objects(path)?
        .iter()
        .map(|(location, object)| {
            let fields = FieldReader {
                path,
                location: *location,
                object,
            };
            Ok(AlpacaRecord {
                instruction: fields.string("instruction")?,
                input: fields.optional_string("input")?,
                output: fields.string("output")?,
            })
        })
        .collect()
}

/// Token ids of `text` with the tokenizer's own special tokens: the one tokenisation rule of
/// every command (training, evaluation and `peft generate` alike), as `transformers` and TRL
/// apply it. A LLaMA tokenizer's template puts BOS first (the official code's `bos=True`); a
/// tokenizer whose template adds nothing (SmolLM2, Qwen) gets no BOS, so a model is trained on
/// exactly the ids it is prompted with.
fn encode_as_the_tokenizer_does(
    tokenizer: &LlamaTokenizer,
    text: &str,
    what: impl Fn() -> String,
) -> Result<Vec<u32>> {
    tokenizer
        .encode(text, true)
        .map_err(|source| TrainError::Tokenizer {
            what: what(),
            source,
        })
}

/// Tokenizes one record for supervised fine-tuning as LLaMA-Adapter's
/// `alpaca_finetuning_v1/finetuning.py` (`InstructionDataset.__getitem__`) does:
///
/// 1. `prompt` = the Alpaca template filled with the record;
/// 2. `input_ids` = tokens of `prompt + output` (the response follows `### Response:` directly,
///    no separator) with the tokenizer's special tokens (for LLaMA: BOS first, the official
///    `encode(example, bos=True, eos=True)`; none for a tokenizer whose template adds none, as
///    `transformers` and `peft generate` encode) and EOS appended;
/// 3. the first `len(tokens of prompt)` labels are
///    [`IGNORE_INDEX`](super::IGNORE_INDEX), the rest equal the ids — the prompt is tokenized
///    on its own just to count, and, as in the official code, a token that straddles the
///    prompt/response boundary in the joint tokenization is not treated specially;
/// 4. both are cut to `max_seq_len` tokens from the start (a long response loses its EOS).
///
/// Differences from the official code, none of which changes which positions are trained on:
/// no padding here (batching pads); ignored labels are `-100` rather than `0` with
/// `ignore_index=0`, so a real `<unk>` (id 0) in a response is still a target here; and the
/// tokenizer is the model's Hugging Face `tokenizer.json` rather than SentencePiece — for LLaMA
/// they produce the same ids (both prepend the `▁` dummy prefix to the text).
///
/// Without an EOS id in the tokenizer no EOS is appended.
///
/// # Errors
/// `max_seq_len` is 0, or the tokenizer fails.
pub fn tokenize_alpaca(
    record: &AlpacaRecord,
    tokenizer: &LlamaTokenizer,
    max_seq_len: usize,
) -> Result<Example> {
    if max_seq_len == 0 {
        return Err(TrainError::config("max_seq_len", "must be at least 1"));
    }
    let prompt = record.prompt();
    let prompt_len =
        encode_as_the_tokenizer_does(tokenizer, &prompt, || "an Alpaca prompt".into())?.len();
    let input_ids = encode_as_the_tokenizer_does(tokenizer, &(prompt + &record.output), || {
        "an Alpaca example".into()
    })?;
    Ok(Example::response_only(
        input_ids,
        prompt_len,
        tokenizer.eos_id(),
        max_seq_len,
    ))
}

/// How an instruction record becomes a prompt and a response to train on.
#[derive(Debug, Clone)]
pub enum InstructionFormat {
    /// The Stanford Alpaca template, as the paper trains ([`tokenize_alpaca`]).
    Alpaca,
    /// The model's own chat template: an optional system turn, the instruction (with its input
    /// after a blank line) as the user's turn, the output as the assistant's; the loss is on the
    /// assistant's turn only, its end-of-turn tokens included ([`tokenize_chat`]).
    Chat {
        /// The model's template.
        template: ChatTemplate,
        /// The system turn; without one, whatever the template does by default.
        system: Option<String>,
    },
}

/// The user's turn of a record: the instruction, and its input after a blank line.
pub fn instruction_message(record: &AlpacaRecord) -> String {
    if record.input.is_empty() {
        record.instruction.clone()
    } else {
        format!("{}\n\n{}", record.instruction, record.input)
    }
}

/// The conversation a record opens in a chat template: the system turn if any, then the user's
/// turn ([`instruction_message`]); the assistant's turn is the record's output.
pub fn chat_prompt_messages(record: &AlpacaRecord, system: Option<&str>) -> Vec<ChatMessage> {
    let mut messages: Vec<ChatMessage> = system
        .map(|text| ChatMessage::new("system", text))
        .into_iter()
        .collect();
    messages.push(ChatMessage::new("user", instruction_message(record)));
    messages
}

/// Tokenizes one record as a conversation in the model's chat template, as
/// `apply_chat_template` does: the prompt is the conversation up to the assistant's turn with
/// the generation prompt, the example the whole conversation; labels are
/// [`IGNORE_INDEX`](super::IGNORE_INDEX) over the prompt's tokens. No EOS is appended: the
/// template closes the assistant's turn itself. Cut to `max_seq_len` from the start.
///
/// # Errors
/// `max_seq_len` is 0; the template fails, or renders the conversation so that it does not
/// begin with the prompt (the prompt could not be masked); the tokenizer fails.
pub fn tokenize_chat(
    record: &AlpacaRecord,
    tokenizer: &LlamaTokenizer,
    template: &ChatTemplate,
    system: Option<&str>,
    max_seq_len: usize,
) -> Result<Example> {
    if max_seq_len == 0 {
        return Err(TrainError::config("max_seq_len", "must be at least 1"));
    }
    let failed = |source| TrainError::Tokenizer {
        what: "a chat-template example".into(),
        source,
    };
    let mut messages = chat_prompt_messages(record, system);
    let prompt = template.render(&messages, true).map_err(failed)?;
    messages.push(ChatMessage::new("assistant", record.output.clone()));
    let full = template.render(&messages, false).map_err(failed)?;
    if !full.starts_with(&prompt) {
        return Err(TrainError::config(
            "template",
            "the chat template renders the conversation without its generation prompt as a \
             prefix, so the prompt cannot be told from the response",
        ));
    }
    let prompt_len = tokenizer.encode(&prompt, false).map_err(failed)?.len();
    let input_ids = tokenizer.encode(&full, false).map_err(failed)?;
    Ok(Example::response_only(
        input_ids,
        prompt_len,
        None,
        max_seq_len,
    ))
}

/// Tokenizes one record in `format`.
///
/// # Errors
/// As [`tokenize_alpaca`] or [`tokenize_chat`].
pub fn tokenize_instruction(
    record: &AlpacaRecord,
    tokenizer: &LlamaTokenizer,
    format: &InstructionFormat,
    max_seq_len: usize,
) -> Result<Example> {
    match format {
        InstructionFormat::Alpaca => tokenize_alpaca(record, tokenizer, max_seq_len),
        InstructionFormat::Chat { template, system } => {
            tokenize_chat(record, tokenizer, template, system.as_deref(), max_seq_len)
        }
    }
}

/// Tokenizes every record in `format`; records left without a target by truncation are listed
/// in [`TokenizedDataset::without_targets`] (by index) instead of kept.
///
/// # Errors
/// As [`tokenize_instruction`], naming the record.
pub fn tokenize_instruction_records(
    records: &[AlpacaRecord],
    tokenizer: &LlamaTokenizer,
    format: &InstructionFormat,
    max_seq_len: usize,
) -> Result<TokenizedDataset> {
    let mut dataset = TokenizedDataset::default();
    for (index, record) in records.iter().enumerate() {
        let example =
            tokenize_instruction(record, tokenizer, format, max_seq_len).map_err(|e| match e {
                TrainError::Tokenizer { source, .. } => TrainError::Tokenizer {
                    what: format!("Alpaca record {index}"),
                    source,
                },
                other => other,
            })?;
        dataset.push(RecordLocation::Index(index), example);
    }
    Ok(dataset)
}

/// Tokenizes every record with [`tokenize_alpaca`] (see [`tokenize_instruction_records`]).
///
/// # Errors
/// As [`tokenize_alpaca`], naming the record.
pub fn tokenize_alpaca_records(
    records: &[AlpacaRecord],
    tokenizer: &LlamaTokenizer,
    max_seq_len: usize,
) -> Result<TokenizedDataset> {
    tokenize_instruction_records(records, tokenizer, &InstructionFormat::Alpaca, max_seq_len)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::data::test_files::TempFile;
    use crate::data::IGNORE_INDEX;

    fn tokenizer() -> LlamaTokenizer {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/stories260k");
        LlamaTokenizer::from_dir(dir).expect("the vendored stories260k tokenizer loads")
    }

    #[test]
    fn chat_examples_train_on_the_assistant_turn_only() {
        let gguf =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/gguf/tiny-bpe.gguf");
        let tokenizer = LlamaTokenizer::load(&gguf).unwrap();
        let template = ChatTemplate::from_model(&gguf, &tokenizer)
            .unwrap()
            .unwrap();
        let record = AlpacaRecord::new("Add the numbers.", "2 and 3", "The sum is 5.");
        let end = tokenizer.encode("<|im_end|>", false).unwrap()[0];
        for system in [None, Some("Be terse.")] {
            let example = tokenize_chat(&record, &tokenizer, &template, system, 512).unwrap();
            let mut messages: Vec<ChatMessage> = system
                .map(|s| ChatMessage::new("system", s))
                .into_iter()
                .collect();
            messages.push(ChatMessage::new("user", "Add the numbers.\n\n2 and 3"));
            let prompt = template.encode(&tokenizer, &messages, true).unwrap();
            messages.push(ChatMessage::new("assistant", "The sum is 5."));
            let full = template.encode(&tokenizer, &messages, false).unwrap();
            assert_eq!(example.input_ids, full);
            let masked = example
                .labels
                .iter()
                .take_while(|&&l| l == IGNORE_INDEX)
                .count();
            assert_eq!(masked, prompt.len());
            assert!(example.labels[masked..]
                .iter()
                .zip(&full[masked..])
                .all(|(&l, &id)| l == i64::from(id)));
            // The template's end of turn is a target; no EOS is added after it.
            assert!(example.labels.contains(&i64::from(end)));
            assert_eq!(full.iter().filter(|&&id| id == end).count(), 3);
            let text = tokenizer.decode(&full[masked..]).unwrap();
            assert!(text.starts_with("The sum is 5."), "{text:?}");
        }
        // A template whose conversation does not begin with its prompt is refused.
        let odd = ChatTemplate::new(
            "{% if add_generation_prompt %}A{% else %}B{% endif %}",
            "odd",
        );
        let err = tokenize_chat(&record, &tokenizer, &odd, None, 64)
            .unwrap_err()
            .to_string();
        assert!(err.contains("generation prompt"), "{err}");
    }

    #[test]
    fn prompts_match_the_stanford_templates_byte_for_byte() {
        let with_input = alpaca_prompt("Translate.", "Bonjour");
        assert_eq!(
            with_input,
            "Below is an instruction that describes a task, paired with an input that provides \
             further context. Write a response that appropriately completes the request.\n\n\
             ### Instruction:\nTranslate.\n\n### Input:\nBonjour\n\n### Response:"
        );
        let without_input = AlpacaRecord::new("Say hi.", "", "Hi").prompt();
        assert_eq!(
            without_input,
            "Below is an instruction that describes a task. Write a response that appropriately \
             completes the request.\n\n### Instruction:\nSay hi.\n\n### Response:"
        );
    }

    #[test]
    fn braces_in_the_record_are_not_substituted_again() {
        let prompt = alpaca_prompt("Print {input} and {x}", "{instruction}");
        assert!(prompt
            .contains("### Instruction:\nPrint {input} and {x}\n\n### Input:\n{instruction}\n\n"));
    }

    #[test]
    fn json_array_with_missing_null_and_empty_inputs_loads() {
        let file = TempFile::new(
            "alpaca.json",
            "\u{feff}[\n {\"instruction\": \"A\", \"input\": \"\", \"output\": \"a\\n\\\"q\\\" \\u00e9\"},\n \
             {\"instruction\": \"B\", \"output\": \"b\"},\n {\"instruction\": \"C\", \"input\": null, \
             \"output\": \"c\", \"extra\": 3},\n {\"instruction\": \"D\", \"input\": \"d in\", \"output\": \"d\"}\n]",
        );
        let records = load_alpaca(file.path()).unwrap();
        assert_eq!(records.len(), 4);
        assert_eq!(records[0].output, "a\n\"q\" é");
        assert_eq!(records[1].input, "");
        assert_eq!(records[2].input, "");
        assert_eq!(records[3], AlpacaRecord::new("D", "d in", "d"));
    }

    #[test]
    fn jsonl_loads_and_skips_blank_lines() {
        let file = TempFile::new(
            "alpaca.jsonl",
            "{\"instruction\": \"A\", \"output\": \"a\"}\n\n{\"instruction\": \"B\", \"input\": \"x\", \"output\": \"b\"}\n",
        );
        let records = load_alpaca(file.path()).unwrap();
        assert_eq!(
            records,
            vec![
                AlpacaRecord::new("A", "", "a"),
                AlpacaRecord::new("B", "x", "b")
            ]
        );
    }

    #[test]
    fn missing_field_error_names_the_file_and_record_index() {
        let file = TempFile::new(
            "missing.json",
            "[{\"instruction\": \"A\", \"output\": \"a\"}, {\"instruction\": \"B\"}]",
        );
        let message = load_alpaca(file.path()).unwrap_err().to_string();
        assert!(message.contains("missing.json"), "{message}");
        assert!(message.contains("record 1"), "{message}");
        assert!(message.contains("missing field `output`"), "{message}");
    }

    #[test]
    fn wrong_type_error_names_the_line_of_a_jsonl_file() {
        let file = TempFile::new(
            "wrong.jsonl",
            "{\"instruction\": \"A\", \"output\": \"a\"}\n\n{\"instruction\": 5, \"output\": \"b\"}\n",
        );
        let message = load_alpaca(file.path()).unwrap_err().to_string();
        assert!(message.contains("line 3"), "{message}");
        assert!(
            message.contains("`instruction` must be a string, found a number"),
            "{message}"
        );
    }

    #[test]
    fn malformed_json_reports_line_and_column() {
        let file = TempFile::new(
            "broken.jsonl",
            "{\"instruction\": \"A\", \"output\": \"a\"}\n{\"instruction\": \n",
        );
        let error = load_alpaca(file.path()).unwrap_err();
        assert!(
            matches!(&error, TrainError::Json { location, .. } if location.starts_with("line 2")),
            "{error}"
        );
    }

    #[test]
    fn empty_and_non_utf8_files_are_errors() {
        let empty = TempFile::new("empty.json", "[]");
        assert!(matches!(
            load_alpaca(empty.path()),
            Err(TrainError::EmptyDataset { .. })
        ));
        let blank = TempFile::new("blank.jsonl", "\n  \n");
        assert!(matches!(
            load_alpaca(blank.path()),
            Err(TrainError::EmptyDataset { .. })
        ));
        let latin1 = TempFile::new(
            "latin1.json",
            b"[{\"instruction\": \"caf\xe9\", \"output\": \"x\"}]",
        );
        assert!(matches!(
            load_alpaca(latin1.path()),
            Err(TrainError::NotUtf8 { offset: 21, .. })
        ));
    }

    #[test]
    fn tokenized_example_is_bos_prompt_response_eos_with_the_prompt_masked() {
        let tokenizer = tokenizer();
        let record = AlpacaRecord::new("Tell a story.", "", "Once upon a time.");
        let example = tokenize_alpaca(&record, &tokenizer, 512).unwrap();
        let prompt_ids = tokenizer.encode(&record.prompt(), true).unwrap();
        let joint = tokenizer
            .encode(&format!("{}{}", record.prompt(), record.output), true)
            .unwrap();
        assert_eq!(example.input_ids[0], 1, "BOS first");
        assert_eq!(*example.input_ids.last().unwrap(), 2, "EOS last");
        assert_eq!(example.input_ids[..example.len() - 1], joint[..]);
        assert_eq!(example.labels.len(), example.len());
        assert!(example.labels[..prompt_ids.len()]
            .iter()
            .all(|&l| l == IGNORE_INDEX));
        for position in prompt_ids.len()..example.len() {
            assert_eq!(
                example.labels[position],
                i64::from(example.input_ids[position])
            );
        }
        let response = tokenizer
            .decode(&example.input_ids[prompt_ids.len()..])
            .unwrap();
        assert_eq!(response.trim(), "Once upon a time.");
    }

    #[test]
    fn truncation_cuts_from_the_end_and_prompt_only_records_are_left_out() {
        let tokenizer = tokenizer();
        let record = AlpacaRecord::new("Tell a story.", "", "Once upon a time there was a cat.");
        let full = tokenize_alpaca(&record, &tokenizer, 512).unwrap();
        let cut = tokenize_alpaca(&record, &tokenizer, full.len() - 3).unwrap();
        assert_eq!(cut.input_ids[..], full.input_ids[..full.len() - 3]);
        assert_eq!(cut.labels[..], full.labels[..full.len() - 3]);

        let prompt_len = tokenizer.encode(&record.prompt(), true).unwrap().len();
        let records = vec![record.clone(), AlpacaRecord::new("x", "", "y"), record];
        let dataset = tokenize_alpaca_records(&records, &tokenizer, prompt_len).unwrap();
        // The first and last records have a longer prompt than the cut; the short one fits.
        assert_eq!(dataset.examples.len(), 1);
        assert_eq!(
            dataset.without_targets,
            vec![RecordLocation::Index(0), RecordLocation::Index(2)]
        );
        assert!(matches!(
            tokenize_alpaca(&records[0], &tokenizer, 0),
            Err(TrainError::Config { .. })
        ));
    }

    /// A tokenizer whose template adds no BOS (SmolLM2's and Qwen's do not): training examples
    /// start with the prompt's own tokens, exactly the ids `peft generate` feeds for the prompt.
    #[test]
    fn a_tokenizer_that_adds_no_bos_gets_none_in_training_either() {
        let dir = peft_io::scratch::ScratchDir::new("no-bos-tokenizer");
        let source =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/stories260k");
        let mut json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(source.join("tokenizer.json")).unwrap())
                .unwrap();
        json["post_processor"] = serde_json::Value::Null;
        dir.write("tokenizer.json", json.to_string());
        std::fs::copy(
            source.join("tokenizer_config.json"),
            dir.join("tokenizer_config.json"),
        )
        .unwrap();
        let plain = LlamaTokenizer::from_dir(dir.path()).unwrap();
        let with_bos = tokenizer();
        let record = AlpacaRecord::new("Tell a story.", "", "Once upon a time.");
        for (name, tokenizer) in [("no BOS template", &plain), ("LLaMA template", &with_bos)] {
            let example = tokenize_alpaca(&record, tokenizer, 512).unwrap();
            // What `peft generate` encodes for the same prompt.
            let prompt = tokenizer.encode(&record.prompt(), true).unwrap();
            assert_eq!(example.input_ids[..prompt.len()], prompt[..], "{name}");
        }
        let example = tokenize_alpaca(&record, &plain, 512).unwrap();
        assert_ne!(
            example.input_ids[0], 1,
            "no BOS where the tokenizer adds none"
        );
        assert_eq!(
            example.input_ids[..example.len() - 1],
            tokenize_alpaca(&record, &with_bos, 512).unwrap().input_ids[1..example.len()],
            "the same tokens after the BOS"
        );
    }

    /// The 999-record demo set of this workspace; run with `cargo test -- --ignored` where
    /// `/work/shared/data` (or `PEFT_ALPACA_DEMO`) exists.
    #[test]
    #[ignore = "needs the shared demo data outside the repository"]
    fn demo_alpaca_file_loads_and_tokenizes() {
        let path = std::env::var("PEFT_ALPACA_DEMO")
            .unwrap_or_else(|_| "/work/shared/data/alpaca_en_demo.json".into());
        let records = load_alpaca(&path).unwrap();
        assert_eq!(records.len(), 999);
        assert_eq!(records.iter().filter(|r| !r.input.is_empty()).count(), 412);
        let dataset = tokenize_alpaca_records(&records, &tokenizer(), 512).unwrap();
        assert_eq!(dataset.examples.len() + dataset.without_targets.len(), 999);
    }
}
