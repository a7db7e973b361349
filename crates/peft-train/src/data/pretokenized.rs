//! Pre-tokenized data: JSON Lines of `{"input_ids": [...], "labels": [...]}`.
//!
//! `labels` follows the Hugging Face convention (aligned with `input_ids`, `-100` ignored; see
//! [`Example`]); without it every token is a target, as for plain language modelling.

use std::path::Path;

use super::example::{Example, TokenizedDataset, IGNORE_INDEX};
use super::json_records::{read_objects, FieldReader};
use crate::error::{Result, TrainError};

/// Loads and validates pre-tokenized examples, cutting each to `max_seq_len` tokens.
///
/// Each record needs a non-empty `input_ids` array of ids below `vocab_size`; an optional
/// `labels` array must have the same length and hold ids below `vocab_size` or `-100`. Other
/// fields (e.g. `attention_mask`) are ignored. A JSON array of such objects is read too.
/// Records without any target (all labels `-100`, after truncation) are listed in
/// [`TokenizedDataset::without_targets`] instead of kept.
///
/// # Errors
/// `vocab_size` or `max_seq_len` is 0; the file is unreadable, not UTF-8 or malformed; a
/// record breaks a rule above (the error names the file, the line and the position); no records.
pub fn load_pretokenized(
    path: impl AsRef<Path>,
    vocab_size: usize,
    max_seq_len: usize,
) -> Result<TokenizedDataset> {
    if vocab_size == 0 {
        return Err(TrainError::config("vocab_size", "must be at least 1"));
    }
    if max_seq_len == 0 {
        return Err(TrainError::config("max_seq_len", "must be at least 1"));
    }
    let path = path.as_ref();
    let mut dataset = TokenizedDataset::default();
    for (location, object) in read_objects(path)? {
        let fields = FieldReader {
            path,
            location,
            object: &object,
        };
        let bad = |message: String| TrainError::record(path, location, message);
        let raw_ids = fields.integers("input_ids")?;
        if raw_ids.is_empty() {
            return Err(bad("`input_ids` is empty".into()));
        }
        let input_ids = raw_ids
            .iter()
            .enumerate()
            .map(|(position, &id)| match u32::try_from(id) {
                Ok(id) if (id as usize) < vocab_size => Ok(id),
                _ => Err(bad(format!(
                    "`input_ids`[{position}] = {id} is outside the vocabulary (0..{vocab_size})"
                ))),
            })
            .collect::<Result<Vec<u32>>>()?;
        let labels = match fields.optional_integers("labels")? {
            None => raw_ids,
            Some(labels) => {
                if labels.len() != input_ids.len() {
                    return Err(bad(format!(
                        "`labels` has {} entries but `input_ids` has {}",
                        labels.len(),
                        input_ids.len()
                    )));
                }
                let bad_label = labels.iter().position(|&label| {
                    label != IGNORE_INDEX && !(0..vocab_size as i64).contains(&label)
                });
                if let Some(position) = bad_label {
                    return Err(bad(format!(
                        "`labels`[{position}] = {} is neither -100 nor in the vocabulary (0..{vocab_size})",
                        labels[position]
                    )));
                }
                labels
            }
        };
        let mut example = Example::new(input_ids, labels);
        example.truncate(max_seq_len);
        dataset.push(location, example);
    }
    Ok(dataset)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::test_files::TempFile;
    use crate::error::RecordLocation;

    #[test]
    fn labels_default_to_the_ids_and_examples_are_truncated() {
        let file = TempFile::new(
            "tokens.jsonl",
            "{\"input_ids\": [1, 5, 6, 7]}\n{\"input_ids\": [1, 8, 9], \"labels\": [-100, -100, 9], \"attention_mask\": [1, 1, 1]}\n",
        );
        let dataset = load_pretokenized(file.path(), 16, 3).unwrap();
        assert_eq!(
            dataset.examples[0],
            Example::new(vec![1, 5, 6], vec![1, 5, 6])
        );
        assert_eq!(
            dataset.examples[1],
            Example::new(vec![1, 8, 9], vec![-100, -100, 9])
        );
        assert!(dataset.without_targets.is_empty());
    }

    #[test]
    fn records_whose_targets_are_truncated_away_are_listed() {
        let file = TempFile::new(
            "cut.jsonl",
            "{\"input_ids\": [1, 5, 6, 7], \"labels\": [-100, -100, -100, 7]}\n{\"input_ids\": [1, 2]}\n",
        );
        let dataset = load_pretokenized(file.path(), 16, 3).unwrap();
        assert_eq!(dataset.examples.len(), 1);
        assert_eq!(dataset.without_targets, vec![RecordLocation::Line(1)]);
    }

    #[test]
    fn out_of_vocabulary_ids_and_labels_are_errors_naming_the_line_and_position() {
        let file = TempFile::new(
            "oov.jsonl",
            "{\"input_ids\": [1, 2]}\n{\"input_ids\": [1, 16]}\n",
        );
        let message = load_pretokenized(file.path(), 16, 8)
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("line 2") && message.contains("`input_ids`[1] = 16"),
            "{message}"
        );

        let file = TempFile::new(
            "neg.jsonl",
            "{\"input_ids\": [1, 2], \"labels\": [-1, 2]}\n",
        );
        let message = load_pretokenized(file.path(), 16, 8)
            .unwrap_err()
            .to_string();
        assert!(message.contains("`labels`[0] = -1"), "{message}");
    }

    #[test]
    fn unequal_lengths_empty_ids_and_non_integers_are_errors() {
        let unequal = TempFile::new(
            "unequal.jsonl",
            "{\"input_ids\": [1, 2], \"labels\": [2]}\n",
        );
        let message = load_pretokenized(unequal.path(), 16, 8)
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("`labels` has 1 entries but `input_ids` has 2"),
            "{message}"
        );

        let empty = TempFile::new("empty_ids.jsonl", "{\"input_ids\": []}\n");
        assert!(load_pretokenized(empty.path(), 16, 8)
            .unwrap_err()
            .to_string()
            .contains("empty"));

        let float = TempFile::new("float.jsonl", "{\"input_ids\": [1, 2.5]}\n");
        let message = load_pretokenized(float.path(), 16, 8)
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("`input_ids`[1] must be an integer, found the number 2.5"),
            "{message}"
        );

        let missing = TempFile::new("missing.jsonl", "{\"labels\": [1]}\n");
        let message = load_pretokenized(missing.path(), 16, 8)
            .unwrap_err()
            .to_string();
        assert!(message.contains("missing field `input_ids`"), "{message}");
    }
}
