#![no_main]
//! See `peft_fuzz::safetensors_file`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| peft_fuzz::safetensors_file(data));
