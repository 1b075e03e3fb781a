//! The GGUF reader and the engine's tensor loading on arbitrary bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = _lowlevel::formats::gguf::fuzz_one(data);
});
