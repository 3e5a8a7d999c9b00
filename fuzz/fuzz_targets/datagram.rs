#![no_main]
//! See `checks::datagram` for the input layout and the invariants.

#[path = "../checks.rs"]
#[allow(dead_code)]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::datagram(data));
