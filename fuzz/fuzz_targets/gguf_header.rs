//! Any bytes given to the GGUF header reader end in a header or an error: never a panic, never
//! an allocation of what the header claims (libFuzzer's `-rss_limit_mb` catches those).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(file) = peft_io::gguf::GgufFile::parse_bytes(data, "fuzz.gguf") {
        // Whatever the header lists lies inside the bytes given.
        for tensor in &file.tensors {
            assert!(tensor.n_bytes <= data.len() as u64);
        }
    }
});
