//! Hostile dataset files: Alpaca JSON / JSON Lines and pre-tokenized JSON Lines that are empty,
//! truncated, not UTF-8, mistyped, nested without end or too long for `max_seq_len` are refused
//! with an error naming the file and the record (index or line), or, for examples truncation
//! leaves without a target, listed instead of kept. `docs/reliability.md` lists the messages.

use std::path::PathBuf;

use peft_llama::LlamaTokenizer;
use peft_train::{
    load_alpaca, load_pretokenized, tokenize_alpaca_records, AlpacaRecord, RecordLocation,
    TrainError,
};

use peft_io::scratch::ScratchFile as TempFile;

/// Prints the error (for `docs/reliability.md`, with `--nocapture`) and checks its fragments.
fn refused<T>(case: &str, result: Result<T, TrainError>, fragments: &[&str]) {
    let message = match result {
        Ok(_) => panic!("{case}: accepted"),
        Err(e) => e.to_string(),
    };
    println!("{case}: {message}");
    for fragment in fragments {
        assert!(
            message.contains(fragment),
            "{case}: `{fragment}` not in: {message}"
        );
    }
}

fn tokenizer() -> LlamaTokenizer {
    LlamaTokenizer::from_dir(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/stories260k"),
    )
    .unwrap()
}

const GOOD: &str = r#"{"instruction": "Say hi.", "input": "", "output": "Hi."}"#;

#[test]
fn empty_blank_and_truncated_alpaca_files_are_refused_naming_the_file() {
    let cases: [(&str, &str, &[&str]); 5] = [
        ("Alpaca empty", "", &["data.json", "holds no records"]),
        (
            "Alpaca blank lines only",
            "\n  \n\t\n",
            &["data.json", "holds no records"],
        ),
        (
            "Alpaca empty array",
            "[]",
            &["data.json", "holds no records"],
        ),
        (
            "Alpaca JSON array truncated",
            r#"[{"instruction": "Say hi.", "output": "H"#,
            &["data.json", "line 1, column", "EOF while parsing a string"],
        ),
        (
            "Alpaca JSONL truncated last line",
            "{\"instruction\": \"a\", \"output\": \"b\"}\n{\"instruction\": \"a\", \"out",
            &[
                "data.json",
                "at line 2, column 25: EOF while parsing a string",
            ],
        ),
    ];
    for (case, text, fragments) in cases {
        let file = TempFile::new("data.json", text);
        refused(case, load_alpaca(file.path()), fragments);
    }
}

#[test]
fn non_utf8_alpaca_is_refused_with_the_byte_offset() {
    let mut bytes = b"[{\"instruction\": \"caf".to_vec();
    bytes.push(0xe9); // Latin-1 é
    bytes.extend(b"\", \"output\": \"x\"}]");
    let file = TempFile::new("latin1.json", bytes);
    refused(
        "Alpaca not UTF-8",
        load_alpaca(file.path()),
        &["latin1.json", "not valid UTF-8", "offset 21"],
    );
}

#[test]
fn mistyped_alpaca_records_are_refused_naming_the_record_and_field() {
    let cases: [(&str, String, &[&str]); 6] = [
        (
            "Alpaca instruction a number",
            format!("[{GOOD}, {{\"instruction\": 3, \"output\": \"x\"}}]"),
            &[
                "record 1",
                "field `instruction` must be a string, found a number",
            ],
        ),
        (
            "Alpaca output missing (JSONL)",
            format!("{GOOD}\n\n{{\"instruction\": \"x\"}}\n"),
            &["line 3", "missing field `output`"],
        ),
        (
            "Alpaca input an array",
            r#"[{"instruction": "a", "input": ["b"], "output": "c"}]"#.into(),
            &["record 0", "field `input` must be a string, found an array"],
        ),
        (
            "Alpaca element not an object",
            format!("[{GOOD}, \"text\"]"),
            &["record 1", "expected a JSON object, found a string"],
        ),
        (
            "Alpaca top level a number",
            "42".into(),
            &["the start of the file", "found `4`"],
        ),
        (
            "Alpaca nested 10000 deep",
            format!("[{}{}]", "[".repeat(10_000), "]".repeat(10_000)),
            &["recursion limit exceeded"],
        ),
    ];
    for (case, text, fragments) in cases {
        let file = TempFile::new("data.json", text);
        refused(case, load_alpaca(file.path()), fragments);
    }
}

#[test]
fn prompts_longer_than_max_seq_len_are_listed_not_trained_on() {
    let long = "word ".repeat(400);
    let records = vec![
        AlpacaRecord::new("Say hi.", "", "Hi."),
        AlpacaRecord::new(long.clone(), "", "never seen"),
        AlpacaRecord::new("Repeat.", long, "never seen"),
    ];
    // The Alpaca template alone is about 100 tokens of this 512-token vocabulary.
    let dataset = tokenize_alpaca_records(&records, &tokenizer(), 256).unwrap();
    assert_eq!(
        dataset.without_targets,
        vec![RecordLocation::Index(1), RecordLocation::Index(2)]
    );
    assert_eq!(dataset.examples.len(), 1);
    assert!(dataset.examples[0].input_ids.len() <= 256);
    // A response cut by max_seq_len keeps the positions that fit.
    let cut = vec![AlpacaRecord::new(
        "Say it.",
        "",
        "one two three ".repeat(200),
    )];
    let dataset = tokenize_alpaca_records(&cut, &tokenizer(), 256).unwrap();
    assert_eq!(dataset.examples[0].input_ids.len(), 256);
    assert!(dataset.examples[0].labels.iter().any(|&l| l >= 0));
}

#[test]
fn malformed_pretokenized_records_are_refused_naming_the_line_and_position() {
    let cases: [(&str, &[u8], &[&str]); 8] = [
        (
            "pre-tokenized empty",
            b"",
            &["tokens.jsonl", "holds no records"],
        ),
        (
            "pre-tokenized truncated",
            b"{\"input_ids\": [1, 2]}\n{\"input_ids\": [1,",
            &["line 2", "EOF while parsing"],
        ),
        (
            "pre-tokenized not UTF-8",
            b"{\"input_ids\": [1, 2], \"note\": \"\xff\"}\n",
            &["tokens.jsonl", "not valid UTF-8", "offset 31"],
        ),
        (
            "pre-tokenized ids a string",
            b"{\"input_ids\": \"1 2 3\"}\n",
            &[
                "line 1",
                "field `input_ids` must be an array of integers, found a string",
            ],
        ),
        (
            "pre-tokenized id beyond i64",
            b"{\"input_ids\": [1, 99999999999999999999]}\n",
            &[
                "line 1",
                "`input_ids`[1] must be an integer, found the number 1e+20",
            ],
        ),
        (
            "pre-tokenized id outside the vocabulary",
            b"{\"input_ids\": [1, 4294967297]}\n",
            &[
                "line 1",
                "`input_ids`[1] = 4294967297 is outside the vocabulary (0..512)",
            ],
        ),
        (
            "pre-tokenized negative id",
            b"{\"input_ids\": [-1]}\n",
            &["line 1", "`input_ids`[0] = -1 is outside the vocabulary"],
        ),
        (
            "pre-tokenized labels of another length",
            b"{\"input_ids\": [1, 2, 3], \"labels\": [1]}\n",
            &["line 1", "`labels` has 1 entries but `input_ids` has 3"],
        ),
    ];
    for (case, bytes, fragments) in cases {
        let file = TempFile::new("tokens.jsonl", bytes);
        refused(case, load_pretokenized(file.path(), 512, 64), fragments);
    }
}

#[test]
fn pretokenized_examples_longer_than_max_seq_len_are_cut_and_targetless_ones_listed() {
    let ids: Vec<u32> = (0..300).map(|i| i % 500).collect();
    let mut labels = vec![-100i64; 300];
    labels[299] = 299;
    let text = format!(
        "{}\n{}\n",
        serde_json::json!({ "input_ids": ids }),
        serde_json::json!({ "input_ids": ids, "labels": labels }),
    );
    let file = TempFile::new("tokens.jsonl", text);
    let dataset = load_pretokenized(file.path(), 512, 64).unwrap();
    assert_eq!(dataset.examples.len(), 1);
    assert_eq!(dataset.examples[0].input_ids.len(), 64);
    assert_eq!(dataset.without_targets, vec![RecordLocation::Line(2)]);
}
