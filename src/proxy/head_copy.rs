//! A request head kept for later in one buffer: what a hedge needs of the request it may
//! duplicate.
//!
//! Every hedgeable request keeps its head from its first attempt until its answer is chosen,
//! and almost none is ever hedged (about 0.1 % under load, docs/perf.md). Cloning Pingora's
//! `RequestHeader` costs a header map, a case map, and an allocation for the first clone of
//! each non-standard header name; [`HeadCopy`] costs one allocation, sized exactly, and the
//! `RequestHeader` is rebuilt only for a hedge that goes out ([`HeadCopy::rebuild`]).
//!
//! Layout: flags (1 byte: bit 0 the head keeps header case), version (1 byte), method and
//! target as `u16`/`u32` length-prefixed bytes, then each header as a `u16`-prefixed name
//! (as the client wrote it when the head keeps case) and a `u32`-prefixed value, in order.

use http::{HeaderValue, Version};
use pingora::http::RequestHeader;
use pingora::prelude::*;

const KEEPS_CASE: u8 = 1;

/// A request head in one buffer.
pub struct HeadCopy {
    buf: Vec<u8>,
}

fn version_byte(v: Version) -> u8 {
    match v {
        Version::HTTP_09 => 0,
        Version::HTTP_10 => 1,
        Version::HTTP_2 => 3,
        Version::HTTP_3 => 4,
        _ => 2,
    }
}

fn version_of(b: u8) -> Version {
    match b {
        0 => Version::HTTP_09,
        1 => Version::HTTP_10,
        3 => Version::HTTP_2,
        4 => Version::HTTP_3,
        _ => Version::HTTP_11,
    }
}

impl HeadCopy {
    /// The head's copy, or `None` for a head that does not fit the layout (a method, target,
    /// name or value beyond its length prefix: not hedged).
    pub fn of(head: &RequestHeader) -> Option<HeadCopy> {
        let method = head.method.as_str().as_bytes();
        let target = head.raw_path();
        let mut len = 2 + 2 + method.len() + 4 + target.len();
        // A `u16`-prefixed field and a `u32`-prefixed one: method and target, name and value.
        let fits = |short: &[u8], long: &[u8]| {
            u16::try_from(short.len()).is_ok() && u32::try_from(long.len()).is_ok()
        };
        let keeps_case = head.has_case();
        let mut fit = fits(method, target);
        each_header(head, |name, value| {
            fit &= fits(name, value);
            len += 6 + name.len() + value.len();
        });
        if !fit {
            return None;
        }
        let mut buf = Vec::with_capacity(len);
        buf.push(if keeps_case { KEEPS_CASE } else { 0 });
        buf.push(version_byte(head.version));
        put(&mut buf, method, 2);
        put(&mut buf, target, 4);
        each_header(head, |name, value| {
            put(&mut buf, name, 2);
            put(&mut buf, value, 4);
        });
        debug_assert_eq!(buf.len(), len);
        Some(HeadCopy { buf })
    }

    /// The head again, as Pingora would have sent it.
    pub fn rebuild(&self) -> Result<RequestHeader> {
        let bad = || Error::explain(ErrorType::InternalError, "hedge: a damaged head copy");
        let mut r = Reader(&self.buf);
        let flags = r.byte().ok_or_else(bad)?;
        let version = r.byte().ok_or_else(bad)?;
        let method = r.field(2).ok_or_else(bad)?;
        let target = r.field(4).ok_or_else(bad)?;
        let mut head = if flags & KEEPS_CASE != 0 {
            RequestHeader::build(method, target, None)?
        } else {
            RequestHeader::build_no_case(method, target, None)?
        };
        head.set_version(version_of(version));
        while !r.0.is_empty() {
            let name = r.field(2).ok_or_else(bad)?;
            let value = r.field(4).ok_or_else(bad)?;
            let value = HeaderValue::from_bytes(value).map_err(|_| bad())?;
            head.append_header(bytes::Bytes::copy_from_slice(name), value)?;
        }
        Ok(head)
    }
}

/// Each header of `head` in order, with its name as the client wrote it when the head keeps
/// case.
fn each_header(head: &RequestHeader, mut f: impl FnMut(&[u8], &[u8])) {
    if head.has_case() {
        for (name, value) in head.case_header_iter() {
            f(name.as_slice(), value.as_bytes());
        }
    } else {
        for (name, value) in head.headers.iter() {
            f(name.as_str().as_bytes(), value.as_bytes());
        }
    }
}

fn put(buf: &mut Vec<u8>, field: &[u8], prefix: usize) {
    match prefix {
        2 => buf.extend_from_slice(&(field.len() as u16).to_le_bytes()),
        _ => buf.extend_from_slice(&(field.len() as u32).to_le_bytes()),
    }
    buf.extend_from_slice(field);
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }

    fn field(&mut self, prefix: usize) -> Option<&'a [u8]> {
        let (len, rest) = self.0.split_at_checked(prefix)?;
        let len = match prefix {
            2 => u16::from_le_bytes(len.try_into().ok()?) as usize,
            _ => u32::from_le_bytes(len.try_into().ok()?) as usize,
        };
        let (field, rest) = rest.split_at_checked(len)?;
        self.0 = rest;
        Some(field)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(head: &RequestHeader) -> Vec<u8> {
        let mut w = Vec::new();
        head.header_to_h1_wire(&mut w);
        w
    }

    #[test]
    fn a_rebuilt_head_is_the_head() {
        let mut head = RequestHeader::build("POST", b"/a/b?c=%20d&e", None).unwrap();
        head.append_header("Host", "example.test").unwrap();
        head.append_header("x-MiXeD-Case", "v1").unwrap();
        head.append_header("X-Mixed-Case", "v2").unwrap();
        head.append_header("Accept", "*/*").unwrap();
        head.append_header("X-Obs", HeaderValue::from_bytes(b"caf\xe9\tx").unwrap())
            .unwrap();
        head.set_version(Version::HTTP_10);
        let copy = HeadCopy::of(&head).unwrap();
        let again = copy.rebuild().unwrap();
        assert_eq!(again.method, head.method);
        assert_eq!(again.raw_path(), head.raw_path());
        assert_eq!(again.version, Version::HTTP_10);
        assert!(again.has_case());
        // The same header lines, in the same order, with the client's case.
        assert_eq!(wire(&again), wire(&head));
        assert_eq!(
            copy.buf.capacity(),
            copy.buf.len(),
            "sized exactly: one allocation"
        );
    }

    #[test]
    fn a_head_without_case_stays_without_case() {
        let mut head = RequestHeader::build_no_case("GET", b"/", None).unwrap();
        head.insert_header("x-a", "1").unwrap();
        head.set_version(Version::HTTP_2);
        let again = HeadCopy::of(&head).unwrap().rebuild().unwrap();
        assert!(!again.has_case());
        assert_eq!(again.version, Version::HTTP_2);
        assert_eq!(again.headers.get("x-a").unwrap(), "1");
    }

    #[test]
    fn a_non_utf8_target_survives() {
        let head = RequestHeader::build("GET", b"/caf\xe9", None).unwrap();
        let again = HeadCopy::of(&head).unwrap().rebuild().unwrap();
        assert_eq!(again.raw_path(), b"/caf\xe9");
    }

    #[test]
    fn a_damaged_copy_is_an_error_not_a_panic() {
        let mut head = RequestHeader::build("GET", b"/x", None).unwrap();
        head.append_header("Host", "h").unwrap();
        let copy = HeadCopy::of(&head).unwrap();
        for cut in 0..copy.buf.len() {
            let damaged = HeadCopy {
                buf: copy.buf[..cut].to_vec(),
            };
            // Every prefix either rebuilds a shorter head or is refused.
            let _ = damaged.rebuild();
        }
    }
}
