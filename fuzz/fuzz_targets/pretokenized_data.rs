#![no_main]
//! See `peft_fuzz::pretokenized_data`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| peft_fuzz::pretokenized_data(data));
