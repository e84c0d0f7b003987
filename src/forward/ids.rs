//! Request ids (`X-Request-Id`): a client's is kept when it is short and printable, otherwise
//! weir makes its own.

use http::header::HeaderValue;

pub const X_REQUEST_ID: &str = "x-request-id";

/// The length of weir's request ids.
pub const REQUEST_ID_LEN: usize = 32;

/// A request id: 32 hex digits, random (not a secret, just unique enough to grep for).
pub fn new_request_id() -> HeaderValue {
    let mut buf = [0u8; REQUEST_ID_LEN];
    write_request_id(&mut buf);
    shared_value(buf)
}

/// Writes a new request id into `buf`.
pub fn write_request_id(buf: &mut [u8; REQUEST_ID_LEN]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let (a, b) = (fastrand::u64(..), fastrand::u64(..));
    for (i, byte) in buf.iter_mut().enumerate() {
        let word = if i < 16 { a } else { b };
        let nibble = (word >> ((i % 16) * 4)) & 0xf;
        *byte = HEX[nibble as usize];
    }
}

/// A header value over an owned buffer of visible ASCII: one allocation, and every clone
/// (the attempt's head, the response, the access log, a hedge, a queued copy) only counts a
/// reference (a value copied from a slice would allocate again on its first clone).
pub(crate) fn shared_value<T: AsRef<[u8]> + Send + 'static>(buf: T) -> HeaderValue {
    HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(buf))
        .unwrap_or_else(|_| HeaderValue::from_static("0"))
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
