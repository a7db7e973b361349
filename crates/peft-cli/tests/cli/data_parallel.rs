//! `peft train --devices`: data-parallel training from the command line (CPU replicas here).

use std::path::Path;

use crate::common::{assert_success, peft, scratch};

fn train(output: &Path, extra: &[&str]) -> std::process::Output {
    let mut command = peft();
    command.args([
        "train",
        "--quiet",
        "--output",
        output.to_str().unwrap(),
        "--grad-accum",
        "1",
        "--lr",
        "0.02",
        "--val-size",
        "8",
        "--save-every",
        "2",
        "--seed",
        "3",
    ]);
    command.args(extra).output().unwrap()
}

/// Every tensor of the adapter's safetensors file (PEFT's or ours): (name, values).
fn adapter_values(output: &Path) -> Vec<(String, Vec<f32>)> {
    let file = std::fs::read_dir(output.join("adapter"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .expect("an adapter safetensors file");
    let bytes = std::fs::read(file).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<f32>)> = file
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let values = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (name, values)
        })
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    tensors
}

#[test]
fn two_cpu_replicas_of_batch_2_train_the_adapter_of_one_device_with_batch_4() {
    let dir = scratch("dp-cli");
    let one = dir.join("one");
    let two = dir.join("two");
    let out = train(&one, &["--batch-size", "4", "--max-steps", "4"]);
    assert_success(&out);
    let out = train(
        &two,
        &[
            "--batch-size",
            "2",
            "--devices",
            "cpu,cpu",
            "--max-steps",
            "4",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("effective batch 4 over 2 devices"),
        "{stderr}"
    );
    let (a, b) = (adapter_values(&one), adapter_values(&two));
    assert_eq!(a.len(), b.len());
    let mut moved = 0.0f32;
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        for (x, y) in x.iter().zip(y) {
            assert!((x - y).abs() <= 1e-5 + 1e-4 * x.abs(), "{name}: {x} vs {y}");
        }
        if name.contains("gate") {
            moved = moved.max(x.iter().map(|v| v.abs()).fold(0.0, f32::max));
        }
    }
    assert!(moved > 1e-4, "the gates did not move from zero ({moved})");

    // The checkpoint remembers 4 examples per micro-batch: resuming with 2 × 1 is refused,
    // and the checkpoint stays.
    let out = train(
        &two,
        &[
            "--batch-size",
            "1",
            "--devices",
            "cpu,cpu",
            "--resume",
            "--max-steps",
            "5",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("written with 4 examples per micro-batch") && stderr.contains("has 2"),
        "{stderr}"
    );
    assert!(two.join("checkpoints/latest").exists());
    // 4 × 1 on one device is the same plan: resuming continues.
    let out = train(&two, &["--batch-size", "4", "--resume", "--max-steps", "5"]);
    assert_success(&out);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_device_this_build_has_not_is_named_in_the_error() {
    let dir = scratch("dp-cli-bad-device");
    let out = train(&dir.join("out"), &["--devices", "cpu,cuda:1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("device `cuda:1`"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}
