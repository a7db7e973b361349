//! Reading a dataset file into JSON objects, each with its place in the file for error messages.
//!
//! Two layouts are accepted and told apart by the first non-blank character, whatever the file
//! extension (many `.json` files on the Hub are really JSON Lines):
//! - `[` — one JSON array of objects (Stanford `alpaca_data.json`); places are 0-based indices;
//! - `{` — JSON Lines, one object per line, blank lines skipped; places are 1-based lines.

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{RecordLocation, Result, TrainError};

/// One record object and where it was found.
pub(crate) type LocatedObject = (RecordLocation, Map<String, Value>);

/// Reads `path` as UTF-8 (a leading byte-order mark is dropped) and returns its record objects.
///
/// # Errors
/// Unreadable file, invalid UTF-8, malformed JSON, an element that is not an object, or no
/// records at all.
pub(crate) fn read_objects(path: &Path) -> Result<Vec<LocatedObject>> {
    let bytes = std::fs::read(path).map_err(|source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let text = String::from_utf8(bytes).map_err(|e| TrainError::NotUtf8 {
        path: path.to_path_buf(),
        offset: e.utf8_error().valid_up_to(),
    })?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let objects = match text.trim_start().chars().next() {
        None => Vec::new(),
        Some('[') => array_objects(path, text)?,
        Some('{') => line_objects(path, text)?,
        Some(other) => {
            return Err(TrainError::Json {
                path: path.to_path_buf(),
                location: "the start of the file".into(),
                message: format!(
                    "expected a JSON array of records (`[`) or JSON Lines objects (`{{`), found `{other}`"
                ),
            })
        }
    };
    if objects.is_empty() {
        return Err(TrainError::EmptyDataset {
            path: path.to_path_buf(),
        });
    }
    Ok(objects)
}

fn json_error(path: &Path, error: &serde_json::Error, line_offset: usize) -> TrainError {
    // serde_json ends its message with its own position, which for a JSON Lines line counts
    // from that line; the location given here replaces it.
    let message = error.to_string();
    let own_position = format!(" at line {} column {}", error.line(), error.column());
    TrainError::Json {
        path: path.to_path_buf(),
        location: format!(
            "line {}, column {}",
            error.line() + line_offset,
            error.column()
        ),
        message: message
            .strip_suffix(&own_position)
            .unwrap_or(&message)
            .to_string(),
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn into_object(path: &Path, location: RecordLocation, value: Value) -> Result<Map<String, Value>> {
    match value {
        Value::Object(object) => Ok(object),
        other => Err(TrainError::record(
            path,
            location,
            format!("expected a JSON object, found {}", kind(&other)),
        )),
    }
}

fn array_objects(path: &Path, text: &str) -> Result<Vec<LocatedObject>> {
    let values: Vec<Value> = serde_json::from_str(text).map_err(|e| json_error(path, &e, 0))?;
    values
        .into_iter()
        .enumerate()
        .map(|(index, value)| {
            let location = RecordLocation::Index(index);
            into_object(path, location, value).map(|object| (location, object))
        })
        .collect()
}

fn line_objects(path: &Path, text: &str) -> Result<Vec<LocatedObject>> {
    let mut objects = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let location = RecordLocation::Line(index + 1);
        let value: Value = serde_json::from_str(line).map_err(|e| json_error(path, &e, index))?;
        objects.push((location, into_object(path, location, value)?));
    }
    Ok(objects)
}

/// Where a field is missing or has the wrong type.
pub(crate) struct FieldReader<'a> {
    pub(crate) path: &'a Path,
    pub(crate) location: RecordLocation,
    pub(crate) object: &'a Map<String, Value>,
}

impl FieldReader<'_> {
    fn wrong_type(&self, key: &str, expected: &str, found: &Value) -> TrainError {
        TrainError::record(
            self.path,
            self.location,
            format!("field `{key}` must be {expected}, found {}", kind(found)),
        )
    }

    fn missing(&self, key: &str) -> TrainError {
        TrainError::record(self.path, self.location, format!("missing field `{key}`"))
    }

    /// A required string field.
    pub(crate) fn string(&self, key: &str) -> Result<String> {
        match self.object.get(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(self.wrong_type(key, "a string", other)),
            None => Err(self.missing(key)),
        }
    }

    /// An optional string field: absent or `null` reads as empty.
    pub(crate) fn optional_string(&self, key: &str) -> Result<String> {
        match self.object.get(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(Value::Null) | None => Ok(String::new()),
            Some(other) => Err(self.wrong_type(key, "a string", other)),
        }
    }

    /// An array of integers, if the field is present (and not `null`).
    pub(crate) fn optional_integers(&self, key: &str) -> Result<Option<Vec<i64>>> {
        let items = match self.object.get(key) {
            Some(Value::Array(items)) => items,
            Some(Value::Null) | None => return Ok(None),
            Some(other) => return Err(self.wrong_type(key, "an array of integers", other)),
        };
        items
            .iter()
            .enumerate()
            .map(|(position, item)| {
                item.as_i64().ok_or_else(|| {
                    TrainError::record(
                        self.path,
                        self.location,
                        format!(
                            "field `{key}`[{position}] must be an integer, found {}",
                            match item {
                                Value::Number(n) => format!("the number {n}"),
                                other => kind(other).to_string(),
                            }
                        ),
                    )
                })
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// A required array of integers.
    pub(crate) fn integers(&self, key: &str) -> Result<Vec<i64>> {
        self.optional_integers(key)?
            .ok_or_else(|| self.missing(key))
    }
}
