#![no_main]
//! See `checks::session` for the input layout and the invariants.

#[path = "../checks.rs"]
#[allow(dead_code)]
mod checks;

libfuzzer_sys::fuzz_target!(
    init: {
        // quiche::Config::new loads the system CA store (SSL_CTX_set_default_verify_paths), 20 ms
        // per input under ASan; a server never verifies clients, so point it at nothing. Set
        // here, before any thread exists.
        std::env::set_var("SSL_CERT_FILE", "/nonexistent/h3gate-fuzz");
        std::env::set_var("SSL_CERT_DIR", "/nonexistent/h3gate-fuzz");
    },
    |data: &[u8]| checks::session(data)
);
