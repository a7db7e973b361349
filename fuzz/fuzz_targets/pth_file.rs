#![no_main]
//! See `peft_fuzz::pth_file`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| peft_fuzz::pth_file(data));
