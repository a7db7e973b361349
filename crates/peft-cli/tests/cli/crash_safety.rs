//! Crash safety of `peft train`: `kill -9` at random instants, over and over, each time resuming
//! with `--resume`. After every kill each `step-*` checkpoint on disk must read back completely
//! (adapter, optimiser state, position), and the run that finally completes must write the
//! adapter of an uninterrupted run, byte for byte.
//!
//! Killed runs set `PEFT_CHECKPOINT_WRITE_DELAY_MS` (see `peft_train::checkpoint`), which pauses
//! before each file and rename of a checkpoint save, so that many kills land inside a write; the
//! uninterrupted reference runs without it (it changes timing only).
//!
//! CI runs 4 kills. More: `PEFT_CRASH_KILLS=40 cargo test --release -p peft-cli --test cli
//! crash_safety -- --nocapture` (`PEFT_CRASH_SEED` changes the kill instants).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::common::{adapter_bytes, peft, scratch};

use burn::backend::NdArray;
use peft_llama::LlamaConfig;
use peft_train::CheckpointDir;

type B = NdArray<f32>;

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A tiny Alpaca set: 24 records (4 held out), so one epoch is 10 optimiser steps of 2 examples.
fn dataset(dir: &Path) -> PathBuf {
    let words = ["cat", "dog", "sun", "tree", "ball", "red", "blue", "park"];
    let records: Vec<serde_json::Value> = (0..24)
        .map(|i| {
            serde_json::json!({
                "instruction": format!("Name a {}.", words[i % words.len()]),
                "output": format!("A {} {}.", words[(i * 3 + 1) % words.len()], words[i % words.len()]),
            })
        })
        .collect();
    let path = dir.join("data.json");
    std::fs::write(&path, serde_json::to_string(&records).unwrap()).unwrap();
    path
}

fn train_args(data: &Path, output: &Path) -> Vec<String> {
    let args = [
        "train",
        "--quiet",
        "--method",
        "adaption-prompt",
        "--adapter-len",
        "4",
        "--batch-size",
        "2",
        "--grad-accum",
        "1",
        "--epochs",
        "1",
        "--warmup-epochs",
        "0.3",
        "--lr",
        "0.01",
        "--max-seq-len",
        "128",
        "--val-size",
        "4",
        "--save-every",
        "1",
        "--seed",
        "11",
    ];
    let mut args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    args.extend([
        "--data".into(),
        data.display().to_string(),
        "--output".into(),
        output.display().to_string(),
    ]);
    args
}

/// xorshift64*: kill instants that a seed reproduces, without a dependency.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
    }
}

/// Reads back every `step-*` directory; returns the names of the leftovers of interrupted
/// writes (`.tmp-*`, `.removing-*`; unique per process).
fn check_every_checkpoint(output: &Path, model: &peft_llama::Llama<B>) -> Vec<String> {
    let root = output.join("checkpoints");
    let Ok(entries) = std::fs::read_dir(&root) else {
        return Vec::new();
    };
    let mut leftovers = Vec::new();
    for entry in entries {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("step-") {
            CheckpointDir::read::<B, peft_core::AnyAdapter<B>>(
                &entry.path(),
                model,
                &Default::default(),
            )
            .unwrap_or_else(|e| panic!("checkpoint {name} is unreadable after a kill: {e}"));
        } else if name.starts_with(".tmp-") || name.starts_with(".removing-") {
            leftovers.push(name);
        }
    }
    leftovers
}

#[test]
fn kill_9_at_random_instants_never_breaks_a_checkpoint_and_resuming_gives_the_same_adapter() {
    let kills = env_number("PEFT_CRASH_KILLS", 4);
    let mut rng = Rng(env_number("PEFT_CRASH_SEED", 0x5eed) | 1);
    let delay_ms = env_number("PEFT_CRASH_WRITE_DELAY_MS", 15);
    let dir = scratch("random-kills");
    let data = dataset(&dir);
    // Random weights of the built-in model's shape: reading a checkpoint needs only its sizes.
    let model = LlamaConfig::from_hf_file(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/stories260k/config.json"),
    )
    .unwrap()
    .init::<B>(&Default::default(), burn::tensor::DType::F32);

    let reference = dir.join("reference");
    let started = Instant::now();
    let status = peft()
        .args(train_args(&data, &reference))
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "the uninterrupted run failed");
    // Kill instants spread over the length of a whole run, write pauses included.
    let window_ms = started.elapsed().as_millis() as u64 + 60 * delay_ms;

    // Campaigns: a fresh output directory, killed until a run completes on its own (or after
    // 10 kills, resumed to the end), then compared; repeated until `kills` kills are done.
    let (mut killed, mut inside_a_write, mut runs, mut campaigns) = (0, 0, 0, 0);
    while killed < kills {
        campaigns += 1;
        let output = dir.join(format!("killed-{campaigns}"));
        let mut unfinished_writes = std::collections::HashSet::new();
        let mut done = false;
        for round in 0..10 {
            if killed >= kills {
                break;
            }
            runs += 1;
            let mut args = train_args(&data, &output);
            if round > 0 {
                args.push("--resume".into());
            }
            let mut child = peft()
                .args(&args)
                .env("PEFT_CHECKPOINT_WRITE_DELAY_MS", delay_ms.to_string())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let deadline = Instant::now() + Duration::from_millis(rng.below(window_ms));
            while Instant::now() < deadline && child.try_wait().unwrap().is_none() {
                std::thread::sleep(Duration::from_millis(1));
            }
            if let Some(status) = child.try_wait().unwrap() {
                assert!(status.success(), "a resumed run failed on its own");
                done = true;
                break;
            }
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
            killed += 1;
            let leftovers = check_every_checkpoint(&output, &model);
            let before = unfinished_writes.len();
            unfinished_writes.extend(leftovers);
            inside_a_write += usize::from(unfinished_writes.len() > before);
        }
        if !done {
            runs += 1;
            let status = peft()
                .args(train_args(&data, &output))
                .arg("--resume")
                .stdout(Stdio::null())
                .status()
                .unwrap();
            assert!(status.success(), "the final resumed run failed");
        }
        check_every_checkpoint(&output, &model);
        assert!(
            adapter_bytes(&output) == adapter_bytes(&reference),
            "campaign {campaigns}: the resumed run's adapter differs from the uninterrupted run's"
        );
    }
    println!(
        "{killed} kills in {campaigns} campaigns ({runs} runs); after {inside_a_write} kills a \
         checkpoint write was left unfinished; every checkpoint stayed readable and every \
         campaign ended with the reference adapter"
    );
    assert!(killed > 0, "no run was killed");
}

/// Visual questions on the fixture image: 10 records (2 held out), 4 optimiser steps of 2.
fn visual_dataset(dir: &Path) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let image = root.join("fixtures/clip/test_image.png");
    let answers = [
        "red", "blue", "green", "red", "blue", "red", "green", "blue", "red", "red",
    ];
    let lines: Vec<String> = answers
        .iter()
        .enumerate()
        .map(|(i, answer)| {
            // Every other question has no image: the batch mixes both kinds.
            let mut record =
                serde_json::json!({"question": "What colour is it?", "answer": answer});
            if i % 2 == 0 {
                record["image"] = serde_json::json!(image);
            }
            record.to_string()
        })
        .collect();
    let path = dir.join("visual.jsonl");
    std::fs::write(&path, lines.join("\n")).unwrap();
    path
}

/// The multimodal adapter goes through the same trainer as the text ones, so it checkpoints and
/// resumes the same way: a run killed with SIGKILL after its first checkpoint and resumed ends
/// with the uninterrupted run's adapter, byte for byte.
#[test]
fn a_multimodal_run_killed_after_a_checkpoint_resumes_to_the_same_adapter() {
    let dir = scratch("visual-kill");
    let data = visual_dataset(&dir);
    let vision = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/clip/model");
    let args = |output: &Path| -> Vec<String> {
        let mut args: Vec<String> = [
            "train",
            "--quiet",
            "--adapter-len",
            "4",
            "--batch-size",
            "2",
            "--grad-accum",
            "1",
            "--epochs",
            "1",
            "--lr",
            "0.01",
            "--warmup-epochs",
            "0.3",
            "--val-size",
            "2",
            "--save-every",
            "1",
            "--seed",
            "5",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for (flag, value) in [("--vision-model", &vision), ("--data", &data.to_path_buf())] {
            args.extend([flag.to_string(), value.display().to_string()]);
        }
        args.extend(["--output".into(), output.display().to_string()]);
        args
    };
    let reference = dir.join("reference");
    let result = peft().args(args(&reference)).output().unwrap();
    crate::common::assert_success(&result);
    // The shared trainer's outputs: metrics, the loss plot, checkpoints (kept: the newest 2).
    for file in ["metrics.jsonl", "loss.svg", "checkpoints/latest"] {
        assert!(reference.join(file).is_file(), "{file} written");
    }

    let killed = dir.join("killed");
    let mut child = peft()
        .args(args(&killed))
        .env("PEFT_CHECKPOINT_WRITE_DELAY_MS", "40")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let latest = killed.join("checkpoints/latest");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !latest.is_file() && Instant::now() < deadline && child.try_wait().unwrap().is_none() {
        std::thread::sleep(Duration::from_millis(2));
    }
    let finished_on_its_own = child.try_wait().unwrap().is_some();
    child.kill().ok(); // SIGKILL
    child.wait().unwrap();
    assert!(
        !finished_on_its_own,
        "the run ended before it could be killed"
    );
    assert!(latest.is_file(), "no checkpoint before the kill");
    assert!(!killed.join("adapter").exists(), "killed before the end");
    let mut resumed = args(&killed);
    resumed.push("--resume".into());
    let result = peft().args(&resumed).output().unwrap();
    crate::common::assert_success(&result);
    assert!(
        adapter_bytes(&killed) == adapter_bytes(&reference),
        "the resumed multimodal run's adapter differs from the uninterrupted run's"
    );
}

/// Saving an adapter over an existing one replaces the directory as a whole: a run killed with
/// SIGKILL while it writes its final adapter leaves the previous adapter complete and loadable.
#[test]
fn a_kill_during_the_final_adapter_save_leaves_the_previous_adapter_whole() {
    let dir = scratch("save-kill");
    let data = dataset(&dir);
    let output = dir.join("run");
    let mut args = train_args(&data, &output);
    args.extend(["--max-steps".into(), "1".into()]);
    let result = peft().args(&args).output().unwrap();
    crate::common::assert_success(&result);
    let before = adapter_bytes(&output);

    // Another run into the same directory (another seed: another adapter), killed while the
    // final adapter's files are being assembled beside the old directory.
    let seed = args.iter().position(|a| a == "--seed").unwrap() + 1;
    args[seed] = "12".into();
    let mut child = peft()
        .args(&args)
        .env("PEFT_WRITE_DELAY_MS", "300")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let staging = |output: &Path| {
        std::fs::read_dir(output)
            .unwrap()
            .filter_map(|e| e.ok())
            .any(|e| e.file_name().to_string_lossy().starts_with(".adapter.tmp-"))
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while !staging(&output) && Instant::now() < deadline && child.try_wait().unwrap().is_none() {
        std::thread::sleep(Duration::from_millis(2));
    }
    let finished_on_its_own = child.try_wait().unwrap().is_some();
    child.kill().ok(); // SIGKILL
    child.wait().unwrap();
    assert!(!finished_on_its_own, "the run ended before the kill");
    assert!(staging(&output), "killed outside the adapter save");
    assert!(
        adapter_bytes(&output) == before,
        "the adapter directory changed although its replacement was interrupted"
    );
    // And it loads.
    let result = peft()
        .args(["inspect"])
        .arg(output.join("adapter"))
        .output()
        .unwrap();
    crate::common::assert_success(&result);
}
