//! W3C Trace Context (`traceparent`): a valid header from the client goes to every upstream
//! attempt unchanged; an absent or invalid one is replaced by a new trace rooted at weir
//! (version 00, random 16-byte trace id and 8-byte parent id, flags 01 = sampled).
//!
//! Validation reads the bytes in place and generation formats into a caller's buffer, so the
//! only allocation is the new header value itself (shared with a new request id, see
//! `Client::capture`).

use http::header::HeaderValue;

pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

/// `00-` + 32 + `-` + 16 + `-` + 2.
const LEN_V00: usize = 55;

/// True for a `traceparent` that a W3C Trace Context participant must accept: lowercase hex
/// fields, version not `ff` (and exactly 55 bytes for version 00; a later version may append
/// `-…`), trace id and parent id not all zeros.
pub fn valid_traceparent(v: &[u8]) -> bool {
    if v.len() < LEN_V00 || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return false;
    }
    let version = &v[0..2];
    let trace_id = &v[3..35];
    let parent_id = &v[36..52];
    let flags = &v[53..55];
    let fields_ok = [version, trace_id, parent_id, flags].iter().all(|f| {
        f.iter()
            .all(|&c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
    });
    if !fields_ok || version == b"ff" {
        return false;
    }
    if trace_id.iter().all(|&c| c == b'0') || parent_id.iter().all(|&c| c == b'0') {
        return false;
    }
    match version {
        b"00" => v.len() == LEN_V00,
        _ => v.len() == LEN_V00 || v[LEN_V00] == b'-',
    }
}

/// A new `traceparent`: `00-<32 hex>-<16 hex>-01`.
pub fn new_traceparent() -> HeaderValue {
    let mut buf = [0u8; LEN_V00];
    write_traceparent(&mut buf);
    super::ids::shared_value(buf)
}

/// The length of weir's traceparents.
pub const TRACEPARENT_LEN: usize = LEN_V00;

/// Writes a new traceparent into `buf`.
pub fn write_traceparent(buf: &mut [u8; LEN_V00]) {
    buf[..3].copy_from_slice(b"00-");
    // A zero id is invalid; the chance is 2^-64 per word, but the retry costs nothing.
    let nonzero = || loop {
        let x = fastrand::u64(..);
        if x != 0 {
            return x;
        }
    };
    write_hex(&mut buf[3..19], nonzero());
    write_hex(&mut buf[19..35], fastrand::u64(..));
    buf[35] = b'-';
    write_hex(&mut buf[36..52], nonzero());
    buf[52..].copy_from_slice(b"-01");
}

fn write_hex(out: &mut [u8], mut x: u64) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for byte in out.iter_mut().rev() {
        *byte = HEX[(x & 0xf) as usize];
        x >>= 4;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC_EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn the_spec_example_is_valid() {
        assert!(valid_traceparent(SPEC_EXAMPLE.as_bytes()));
        assert!(valid_traceparent(
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"
        ));
    }

    #[test]
    fn malformed_headers_are_invalid() {
        let bad = [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "0-4bf92f3577b34da6a3ce929d0e0e47361-00f067aa0ba902b7-01",
        ];
        for b in bad {
            assert!(!valid_traceparent(b.as_bytes()), "{b:?} accepted");
        }
    }

    #[test]
    fn later_versions_may_carry_more_fields() {
        assert!(valid_traceparent(
            b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future"
        ));
        assert!(!valid_traceparent(
            b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01future"
        ));
    }

    #[test]
    fn generated_traceparents_are_valid_sampled_and_differ() {
        let a = new_traceparent();
        let b = new_traceparent();
        assert!(valid_traceparent(a.as_bytes()), "{a:?}");
        assert!(a.as_bytes().starts_with(b"00-"));
        assert!(a.as_bytes().ends_with(b"-01"));
        assert_ne!(a, b);
        assert_ne!(a.as_bytes()[3..35], b.as_bytes()[3..35]);
    }
}
