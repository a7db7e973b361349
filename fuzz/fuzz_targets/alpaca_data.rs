#![no_main]
//! See `peft_fuzz::alpaca_data`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| peft_fuzz::alpaca_data(data));
