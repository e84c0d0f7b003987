//! `weir::fuzzing::request_head` under libFuzzer (see src/fuzzing.rs for what it asserts).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| weir::fuzzing::request_head(data));
