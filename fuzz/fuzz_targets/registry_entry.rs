//! `weir::fuzzing::registry_entry` under libFuzzer (see src/fuzzing.rs for what it asserts).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| weir::fuzzing::registry_entry(data));
