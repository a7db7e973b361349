#![no_main]
//! See `peft_fuzz::model_config`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| peft_fuzz::model_config(data));
