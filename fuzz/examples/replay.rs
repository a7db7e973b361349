//! Runs one fuzz target on given files in an ordinary build (no libFuzzer, no sanitizer, stable
//! Rust), to reproduce a finding as a user's program would meet it:
//!
//! ```sh
//! cd fuzz && cargo run --release --example replay -- pth_pickle artifacts/pth_pickle/oom-*
//! ```

fn main() {
    let mut args = std::env::args().skip(1);
    let target = args.next().expect("usage: replay TARGET FILE...");
    let run: fn(&[u8]) = match target.as_str() {
        "adapter_config" => peft_fuzz::adapter_config,
        "safetensors_file" => peft_fuzz::safetensors_file,
        "pth_file" => peft_fuzz::pth_file,
        "pth_pickle" => peft_fuzz::pth_pickle,
        "model_config" => peft_fuzz::model_config,
        "sharded_index" => peft_fuzz::sharded_index,
        "alpaca_data" => peft_fuzz::alpaca_data,
        "pretokenized_data" => peft_fuzz::pretokenized_data,
        other => panic!("unknown target {other}"),
    };
    for file in args {
        let data = std::fs::read(&file).expect("input file");
        let start = std::time::Instant::now();
        run(&data);
        println!("{file}: returned after {:.2?}", start.elapsed());
    }
}
