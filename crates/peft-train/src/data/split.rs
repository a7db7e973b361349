//! A seeded train/validation split.

use super::shuffle::{Purpose, SeededRng};
use crate::error::{Result, TrainError};

/// Splits `items` into `(train, validation)`, with `val_size` items chosen by a seeded shuffle.
///
/// The same `seed` and length always choose the same items; both parts keep the original
/// relative order and together hold every item exactly once. Split records (not tokenized
/// examples) so that the choice does not depend on the tokenizer or `max_seq_len`. (The
/// official LLaMA-Adapter script validates on the first 200 records, which it also trains on.)
///
/// # Errors
/// `val_size` leaves no training items (`val_size >= items.len()` with `val_size > 0`).
pub fn split_validation<T>(items: Vec<T>, val_size: usize, seed: u64) -> Result<(Vec<T>, Vec<T>)> {
    if val_size == 0 {
        return Ok((items, Vec::new()));
    }
    if val_size >= items.len() {
        return Err(TrainError::config(
            "val_size",
            format!(
                "{val_size} validation records would leave none of the {} for training",
                items.len()
            ),
        ));
    }
    let mut order: Vec<usize> = (0..items.len()).collect();
    SeededRng::new(seed, Purpose::ValidationSplit).shuffle(&mut order);
    let mut is_validation = vec![false; items.len()];
    for &index in &order[..val_size] {
        is_validation[index] = true;
    }
    let (mut train, mut validation) = (
        Vec::with_capacity(items.len() - val_size),
        Vec::with_capacity(val_size),
    );
    for (item, validation_item) in items.into_iter().zip(is_validation) {
        if validation_item {
            validation.push(item);
        } else {
            train.push(item);
        }
    }
    Ok((train, validation))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_is_disjoint_complete_and_seeded() {
        let items: Vec<u32> = (0..40).collect();
        let (train, validation) = split_validation(items.clone(), 7, 3).unwrap();
        assert_eq!((train.len(), validation.len()), (33, 7));
        let mut all: Vec<u32> = train.iter().chain(&validation).copied().collect();
        all.sort_unstable();
        assert_eq!(all, items);
        assert!(train.windows(2).all(|w| w[0] < w[1]), "order kept");
        assert_eq!(split_validation(items.clone(), 7, 3).unwrap().1, validation);
        assert_ne!(split_validation(items, 7, 4).unwrap().1, validation);
    }

    #[test]
    fn validation_as_large_as_the_dataset_is_an_error() {
        assert!(matches!(
            split_validation(vec![1, 2], 2, 0),
            Err(TrainError::Config {
                setting: "val_size",
                ..
            })
        ));
        assert_eq!(
            split_validation(vec![1, 2], 0, 0).unwrap(),
            (vec![1, 2], vec![])
        );
    }
}
