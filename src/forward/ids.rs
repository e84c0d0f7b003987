//! Request ids (`X-Request-Id`): a client's is kept when it is short and printable, otherwise
//! weir makes its own.

use http::header::HeaderValue;

pub const X_REQUEST_ID: &str = "x-request-id";

/// A request id: 32 hex digits, random (not a secret, just unique enough to grep for).
pub fn new_request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut buf = [0u8; 32];
    let (a, b) = (fastrand::u64(..), fastrand::u64(..));
    for (i, byte) in buf.iter_mut().enumerate() {
        let word = if i < 16 { a } else { b };
        let nibble = (word >> ((i % 16) * 4)) & 0xf;
        *byte = HEX[nibble as usize];
    }
    HeaderValue::from_bytes(&buf).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

/// A client-supplied id is kept when it is short and printable; otherwise weir makes its own.
pub fn acceptable_request_id(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    !b.is_empty() && b.len() <= 200 && b.iter().all(|c| c.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_32_hex_digits_and_differ() {
        let a = new_request_id();
        let b = new_request_id();
        assert_eq!(a.len(), 32);
        assert!(a.as_bytes().iter().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn client_ids_must_be_short_and_printable() {
        assert!(acceptable_request_id(&HeaderValue::from_static("abc-123")));
        assert!(!acceptable_request_id(&HeaderValue::from_static(
            "has space"
        )));
        assert!(!acceptable_request_id(
            &HeaderValue::from_str(&"x".repeat(201)).unwrap()
        ));
    }
}
