//! `peft train` end to end: resumption after `kill -9` gives the same adapter, a NaN stops
//! training with the last good checkpoint kept, and the outputs a user expects are written.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::common::{adapter_bytes, assert_success, peft, scratch};

/// Short Alpaca records, so that steps are fast on the CPU.
fn small_dataset(dir: &Path) -> PathBuf {
    let words = [
        "cat", "dog", "sun", "tree", "ball", "red", "blue", "happy", "little", "park",
    ];
    let records: Vec<serde_json::Value> = (0..48)
        .map(|i| {
            serde_json::json!({
                "instruction": format!("Say a word about the {}.", words[i % words.len()]),
                "input": if i % 3 == 0 { words[(i + 3) % words.len()] } else { "" },
                "output": format!("The {} is {}.", words[i % words.len()], words[(i * 7 + 1) % words.len()]),
            })
        })
        .collect();
    let path = dir.join("data.json");
    std::fs::write(&path, serde_json::to_string(&records).unwrap()).unwrap();
    path
}

fn train_args(data: &Path, output: &Path, method: &str) -> Vec<String> {
    [
        "train",
        "--quiet",
        "--method",
        method,
        "--data",
        data.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
        "--batch-size",
        "2",
        "--grad-accum",
        "2",
        "--epochs",
        "2",
        "--warmup-epochs",
        "0.5",
        "--lr",
        "0.01",
        "--max-seq-len",
        "128",
        "--val-size",
        "4",
        "--save-every",
        "1",
        "--seed",
        "5",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn latest_step(output: &Path) -> usize {
    std::fs::read_to_string(output.join("checkpoints/latest"))
        .ok()
        .and_then(|name| {
            name.trim()
                .strip_prefix("step-")
                .and_then(|s| s.parse().ok())
        })
        .unwrap_or(0)
}

#[test]
fn resuming_after_kill_9_gives_the_same_adapter_as_an_uninterrupted_run() {
    let dir = scratch("resume");
    let data = small_dataset(&dir);
    for method in ["adaption-prompt", "lora"] {
        let reference = dir.join(format!("{method}-reference"));
        let status = peft()
            .args(train_args(&data, &reference, method))
            .status()
            .unwrap();
        assert!(status.success());
        assert!(reference.join("metrics.jsonl").is_file() && reference.join("loss.svg").is_file());

        // Kill at several points (early, mid-run); each time resume, and once more kill the
        // resumed run itself.
        for kill_after in [1, 4] {
            let output = dir.join(format!("{method}-killed-{kill_after}"));
            for round in 0..2 {
                let mut args = train_args(&data, &output, method);
                if round > 0 {
                    args.push("--resume".into());
                }
                let mut child = peft().args(&args).stdout(Stdio::null()).spawn().unwrap();
                let started = Instant::now();
                let target = kill_after * (round + 1);
                while latest_step(&output) < target && started.elapsed() < Duration::from_secs(120)
                {
                    if child.try_wait().unwrap().is_some() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                let _ = child.kill(); // SIGKILL
                let _ = child.wait();
            }
            let status = peft()
                .args(train_args(&data, &output, method))
                .arg("--resume")
                .status()
                .unwrap();
            assert!(status.success(), "{method}: resumed run failed");
            // Byte-identical files: same tensors, bit for bit.
            assert!(
                adapter_bytes(&output) == adapter_bytes(&reference),
                "{method}: killed after step {kill_after} and resumed, the adapter differs"
            );
        }
    }
}

#[test]
fn non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint() {
    let dir = scratch("nan");
    let data = small_dataset(&dir);
    let output = dir.join("run");
    // A learning rate this large drives the loss to infinity within a few steps.
    let mut args = train_args(&data, &output, "lora");
    let lr = args.iter().position(|a| a == "--lr").unwrap();
    args[lr + 1] = "1e30".into();
    let result = peft().args(&args).output().unwrap();
    assert!(!result.status.success(), "training should stop");
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(stderr.contains("non-finite"), "{stderr}");
    let step = latest_step(&output);
    if step > 0 {
        assert!(
            stderr.contains(&format!("step-{step:08}")),
            "the message names the kept checkpoint: {stderr}"
        );
        let checkpoint = output.join(format!("checkpoints/step-{step:08}"));
        assert!(checkpoint.join("state.json").is_file() && checkpoint.join("adapter").is_dir());
    }
}

#[test]
fn records_whose_prompt_fills_max_seq_len_are_reported_not_dropped_silently() {
    let dir = scratch("long-prompts");
    let long = "once upon a time ".repeat(40);
    let records: Vec<serde_json::Value> = (0..6)
        .map(|i| serde_json::json!({"instruction": format!("{long} {i}"), "output": "The end."}))
        .collect();
    let data = dir.join("long.json");
    std::fs::write(&data, serde_json::to_string(&records).unwrap()).unwrap();
    let mut args = train_args(&data, &dir.join("run"), "lora");
    let len = args.iter().position(|a| a == "--max-seq-len").unwrap();
    args[len + 1] = "32".into();
    let result = peft().args(&args).output().unwrap();
    let stderr = String::from_utf8_lossy(&result.stderr);
    // Every training record is dropped: a warning says so, then training refuses to start.
    assert!(
        stderr.contains("warning: ")
            && stderr
                .contains("2 of 2 training records have no response token within --max-seq-len 32"),
        "{stderr}"
    );
    assert!(!result.status.success(), "{stderr}");
    assert!(stderr.contains("the training set is empty"), "{stderr}");
}

fn eval_loss(data: &Path, adapter: Option<&Path>) -> f64 {
    let mut command = peft();
    command.args(["eval", "--json", "--data", data.to_str().unwrap()]);
    if let Some(adapter) = adapter {
        command.args(["--adapter", adapter.to_str().unwrap()]);
    }
    let result = command.output().unwrap();
    assert_success(&result);
    let report: serde_json::Value = serde_json::from_slice(&result.stdout).unwrap();
    report["loss"].as_f64().unwrap()
}

#[test]
fn prefixes_initialised_from_text_start_at_the_base_model() {
    let dir = scratch("prefix-text");
    let data = small_dataset(&dir);
    let output = dir.join("run");
    let mut args = train_args(&data, &output, "prefix");
    args.extend(["--prefix-init", "text", "--max-steps", "1"].map(String::from));
    // The first step of the warm-up has learning rate 0: the saved prefixes are the initial ones.
    let result = peft().args(&args).output().unwrap();
    assert_success(&result);
    let validation = output.join("validation.json");
    let base = eval_loss(&validation, None);
    let adapted = eval_loss(&validation, Some(&output.join("adapter")));
    // Reading the Alpaca preamble once more before the prompt changes the loss only slightly
    // (0.007 when written), where PEFT's N(0, 1) prefixes move it far from the base.
    assert!(
        (adapted - base).abs() < 0.02,
        "base {base}, adapted {adapted}"
    );
    let random_output = dir.join("random");
    let mut args = train_args(&data, &random_output, "prefix");
    args.extend(["--max-steps", "1"].map(String::from));
    assert!(peft().args(&args).status().unwrap().success());
    // `--adapter` takes the run's output directory as well as the adapter inside it.
    let random = eval_loss(&validation, Some(&random_output));
    assert_eq!(
        random,
        eval_loss(&validation, Some(&random_output.join("adapter")))
    );
    assert!(
        (random - base).abs() > 0.1,
        "base {base}, random prefixes {random}"
    );

    let mut args = train_args(&data, &dir.join("lora"), "lora");
    args.extend(["--prefix-init", "text"].map(String::from));
    let result = peft().args(&args).output().unwrap();
    assert!(!result.status.success());
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(
        stderr.contains("--prefix-init text applies to --method prefix only"),
        "{stderr}"
    );
}

#[test]
fn multimodal_training_and_generation_with_an_image_run_from_the_cli() {
    let dir = scratch("visual");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let image = root.join("fixtures/clip/test_image.png");
    let vision = root.join("fixtures/clip/model");
    let lines: Vec<String> = ["red", "blue", "red", "blue"]
        .iter()
        .map(|answer| {
            serde_json::json!({"image": image, "question": "What colour is it?", "answer": answer})
                .to_string()
        })
        .collect();
    let data = dir.join("visual.jsonl");
    std::fs::write(&data, lines.join("\n")).unwrap();
    let output = dir.join("run");
    let result = peft()
        .args([
            "train",
            "--quiet",
            "--method",
            "adaption-prompt",
            "--epochs",
            "1",
        ])
        .args([
            "--batch-size",
            "2",
            "--lr",
            "0.01",
            "--seed",
            "3",
            "--val-size",
            "1",
        ])
        .args(["--grad-accum", "1", "--eval-every", "1"])
        .arg("--vision-model")
        .arg(&vision)
        .arg("--data")
        .arg(&data)
        .arg("--output")
        .arg(&output)
        .output()
        .unwrap();
    assert_success(&result);
    let adapter = output.join("adapter");
    assert!(adapter.is_dir(), "adapter written");
    // Through the shared trainer: per-step metrics with validation (--eval-every), checkpoints.
    let metrics = std::fs::read_to_string(output.join("metrics.jsonl")).unwrap();
    assert!(metrics.contains("\"val_loss\""), "{metrics}");
    assert!(output.join("checkpoints/latest").is_file());
    let result = peft()
        .args([
            "generate",
            "--prompt",
            "What colour is it?",
            "--max-new-tokens",
            "3",
        ])
        .arg("--adapter")
        .arg(&output) // the run directory: its adapter/ is used
        .arg("--vision-model")
        .arg(&vision)
        .arg("--image")
        .arg(&image)
        .output()
        .unwrap();
    assert_success(&result);
    assert!(!result.stdout.is_empty(), "generation printed something");
    // An image without the multimodal adapter's vision tower is refused by the argument parser.
    let result = peft()
        .args(["generate", "--prompt", "x", "--image"])
        .arg(&image)
        .output()
        .unwrap();
    assert!(!result.status.success());
}

/// `peft merge` writes a Hugging Face directory that carries every file of the model but its
/// weights (tokenizer files, generation settings, a chat template), and refuses to overwrite
/// the model it merges into.
#[test]
fn a_merged_model_keeps_every_tokenizer_and_template_file() {
    let dir = scratch("merge");
    let data = small_dataset(&dir);
    let run = dir.join("run");
    let mut args = train_args(&data, &run, "lora");
    args.extend(["--max-steps", "1"].map(String::from));
    assert_success(&peft().args(&args).output().unwrap());
    // The built-in model with a chat template beside it.
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/stories260k");
    for entry in std::fs::read_dir(&source).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, model.join(path.file_name().unwrap())).unwrap();
    }
    std::fs::write(model.join("chat_template.jinja"), "{{ messages }}").unwrap();
    let merged = dir.join("merged");
    let result = peft()
        .args(["merge", "--model"])
        .arg(&model)
        .arg("--adapter")
        .arg(&run)
        .arg("--output")
        .arg(&merged)
        .output()
        .unwrap();
    assert_success(&result);
    for file in [
        "chat_template.jinja",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors",
    ] {
        assert!(
            merged.join(file).is_file(),
            "{file} missing from the merged model"
        );
    }
    assert_eq!(
        std::fs::read(merged.join("chat_template.jinja")).unwrap(),
        b"{{ messages }}"
    );
    // The merged model loads and evaluates.
    let result = peft()
        .args(["eval", "--json", "--model"])
        .arg(&merged)
        .arg("--data")
        .arg(run.join("validation.json"))
        .output()
        .unwrap();
    assert_success(&result);
    // Merging onto the model's own directory is refused before anything is written.
    let before = std::fs::read(model.join("model.safetensors")).unwrap();
    let result = peft()
        .args(["merge", "--model"])
        .arg(&model)
        .arg("--adapter")
        .arg(&run)
        .arg("--output")
        .arg(&model)
        .output()
        .unwrap();
    assert!(!result.status.success());
    assert!(String::from_utf8_lossy(&result.stderr).contains("overwrite"));
    assert_eq!(
        std::fs::read(model.join("model.safetensors")).unwrap(),
        before
    );
}

/// `--model file.gguf --template chat`: `generate` prompts with the ids `apply_chat_template`
/// gives (fixtures/chat_templates.json, the same ChatML template as the GGUF's), with and
/// without `--system`; `train` learns on the chat format and `eval` scores it the same way.
#[test]
fn a_gguf_model_generates_trains_and_evaluates_in_its_chat_template() {
    let dir = scratch("gguf-chat");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let model = root.join("fixtures/gguf/tiny-bpe.gguf");
    let cases: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("fixtures/chat_templates.json")).unwrap(),
    )
    .unwrap();
    let expected = |system: Option<&str>, user: &str| -> Vec<u64> {
        let case = cases["cases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| {
                let m = c["messages"].as_array().unwrap();
                c["template"] == "chatml"
                    && c["add_generation_prompt"] == true
                    && m.last().unwrap()["content"] == user
                    && m.len() == 1 + usize::from(system.is_some())
                    && system.is_none_or(|s| m[0]["content"] == s)
            })
            .unwrap();
        serde_json::from_value(case["ids"].clone()).unwrap()
    };
    for (system, user) in [
        (None, "Hi!"),
        (Some(" You are a pirate. "), "Where is the gold?"),
    ] {
        let mut args = vec![
            "generate".to_string(),
            "--model".into(),
            model.to_str().unwrap().into(),
            "--template".into(),
            "chat".into(),
            "--prompt".into(),
            user.into(),
            "--max-new-tokens".into(),
            "2".into(),
            "--json".into(),
        ];
        if let Some(system) = system {
            args.extend(["--system".to_string(), system.to_string()]);
        }
        let output = peft().args(&args).output().unwrap();
        assert_success(&output);
        let line: serde_json::Value =
            serde_json::from_slice(output.stdout.split(|&b| b == b'\n').next().unwrap()).unwrap();
        let ids: Vec<u64> = serde_json::from_value(line["prompt_ids"].clone()).unwrap();
        assert_eq!(ids, expected(system, user), "system {system:?}");
    }
    let data = small_dataset(&dir);
    let output = dir.join("run");
    let mut args = train_args(&data, &output, "lora");
    args.extend(
        [
            "--model",
            model.to_str().unwrap(),
            "--template",
            "chat",
            "--system",
            "Answer briefly.",
            "--max-steps",
            "3",
        ]
        .map(String::from),
    );
    let trained = peft().args(&args).output().unwrap();
    assert_success(&trained);
    assert!(output.join("adapter/adapter_model.safetensors").is_file());
    let eval = |template: &str| {
        let out = peft()
            .args([
                "eval",
                "--model",
                model.to_str().unwrap(),
                "--adapter",
                output.to_str().unwrap(),
                "--data",
                output.join("validation.json").to_str().unwrap(),
                "--template",
                template,
                "--json",
            ])
            .output()
            .unwrap();
        assert_success(&out);
        let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        line["tokens"].as_u64().unwrap()
    };
    // The chat format scores the assistant turns (their end-of-turn tokens included), which
    // differ in length from the Alpaca responses with EOS.
    assert_ne!(eval("chat"), eval("alpaca"));

    // Merging into the GGUF base writes a Hugging Face directory whose configuration, tokenizer
    // and chat template come from the GGUF metadata: it scores the held-out turns as the GGUF
    // with the adapter does.
    let merged = dir.join("merged");
    let result = peft()
        .args(["merge", "--model", model.to_str().unwrap(), "--adapter"])
        .arg(&output)
        .arg("--output")
        .arg(&merged)
        .output()
        .unwrap();
    assert_success(&result);
    for file in [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(merged.join(file).is_file(), "{file} missing");
    }
    let chat_loss = |model: &Path, adapter: Option<&Path>| -> f64 {
        let mut command = peft();
        command.args(["eval", "--template", "chat", "--json", "--model"]);
        command
            .arg(model)
            .arg("--data")
            .arg(output.join("validation.json"));
        if let Some(adapter) = adapter {
            command.arg("--adapter").arg(adapter);
        }
        let out = command.output().unwrap();
        assert_success(&out);
        let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        line["loss"].as_f64().unwrap()
    };
    let (adapted, folded) = (chat_loss(&model, Some(&output)), chat_loss(&merged, None));
    assert!(
        (adapted - folded).abs() < 1e-4,
        "{adapted} vs merged {folded}"
    );
    let base = chat_loss(&model, None);
    assert!(
        (base - folded).abs() > 1e-4,
        "the merge changed nothing: {base}"
    );
    let prompt_ids = |model: &Path| -> serde_json::Value {
        let out = peft()
            .args([
                "generate",
                "--template",
                "chat",
                "--prompt",
                "Hi!",
                "--json",
            ])
            .args(["--max-new-tokens", "1", "--model"])
            .arg(model)
            .output()
            .unwrap();
        assert_success(&out);
        let line: serde_json::Value =
            serde_json::from_slice(out.stdout.split(|&b| b == b'\n').next().unwrap()).unwrap();
        line["prompt_ids"].clone()
    };
    assert_eq!(prompt_ids(&merged), prompt_ids(&model));
    // `--template chat` on a model without a template says so.
    let stories = peft()
        .args(["generate", "--template", "chat", "--prompt", "Hi"])
        .output()
        .unwrap();
    assert!(!stories.status.success());
    let err = String::from_utf8_lossy(&stories.stderr);
    assert!(err.contains("ships no chat template"), "{err}");
}

/// `--quantize nf4`: training, evaluation and generation over a 4-bit frozen base; the run's
/// final validation is what `eval` over the same base reports, the dense base scores the
/// adapter differently, and merging into the quantized base is refused.
#[test]
fn a_quantized_base_trains_evaluates_and_generates_and_merging_into_it_is_refused() {
    let dir = scratch("quantized");
    let data = small_dataset(&dir);
    let run = dir.join("run");
    let mut args = train_args(&data, &run, "lora");
    args.extend(["--max-steps", "2", "--quantize", "nf4"].map(String::from));
    let result = peft().args(&args).output().unwrap();
    assert_success(&result);
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(
        stderr.contains("decoder projections held as nf4"),
        "{stderr}"
    );
    let validation_loss = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .rev()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
        .find(|record| record["kind"] == "validation")
        .and_then(|record| record["val_loss"].as_f64())
        .expect("a validation record");
    let eval = |quantize: &str| -> f64 {
        let result = peft()
            .args([
                "eval",
                "--json",
                "--max-seq-len",
                "128",
                "--quantize",
                quantize,
            ])
            .arg("--data")
            .arg(run.join("validation.json"))
            .arg("--adapter")
            .arg(&run)
            .output()
            .unwrap();
        assert_success(&result);
        let report: serde_json::Value = serde_json::from_slice(&result.stdout).unwrap();
        report["loss"].as_f64().unwrap()
    };
    let quantized = eval("nf4");
    assert!(
        (quantized - validation_loss).abs() < 1e-4,
        "eval over nf4 {quantized}, the run's validation {validation_loss}"
    );
    // The 260K-parameter model loses a lot to 4 bits: the dense base scores differently.
    let dense = eval("none");
    assert!((dense - quantized).abs() > 1e-3, "{dense} vs {quantized}");

    let result = peft()
        .args(["generate", "--quantize", "nf4", "--max-new-tokens", "8"])
        .args(["--prompt", "Once upon a time", "--adapter"])
        .arg(&run)
        .output()
        .unwrap();
    assert_success(&result);
    assert!(String::from_utf8_lossy(&result.stdout).starts_with("Once upon a time"));

    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/stories260k");
    let merged = dir.join("merged");
    let result = peft()
        .args(["merge", "--quantize", "nf4", "--model"])
        .arg(&model)
        .arg("--adapter")
        .arg(&run)
        .arg("--output")
        .arg(&merged)
        .output()
        .unwrap();
    assert!(!result.status.success());
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(
        stderr.contains("held quantized") && stderr.contains("dense checkpoint"),
        "{stderr}"
    );
    assert!(
        !merged.exists(),
        "nothing is written when merging is refused"
    );
    // Keeping GGUF blocks needs a GGUF file.
    let result = peft()
        .args(["eval", "--quantize", "gguf", "--data"])
        .arg(run.join("validation.json"))
        .output()
        .unwrap();
    assert!(!result.status.success());
    assert!(String::from_utf8_lossy(&result.stderr).contains("needs a .gguf file"));
}
