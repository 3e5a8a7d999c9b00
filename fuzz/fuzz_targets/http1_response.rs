#![no_main]
//! See `checks::http1_response` for the input layout and the invariants.

#[path = "../checks.rs"]
#[allow(dead_code)]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::http1_response(data));
