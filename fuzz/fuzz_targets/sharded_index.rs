#![no_main]
//! See `peft_fuzz::sharded_index`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| peft_fuzz::sharded_index(data));
