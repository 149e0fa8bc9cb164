//! hush's binary encoding: big-endian integers and length-prefixed byte strings, decoded
//! strictly.
//!
//! Every decoder reads from a [`Reader`] and the top-level [`decode_exact`] refuses input with
//! bytes left over, so a message has exactly one encoding (the same rule as RFC 8446's
//! presentation language and libprio's `get_decoded`). Errors name the field that failed.

use std::fmt;

/// What went wrong while decoding; names the message and the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The input ended before the field was complete.
    #[error("truncated {what}: needed {needed} more bytes for {field}, {left} left")]
    Truncated {
        /// The message being decoded.
        what: &'static str,
        /// The field being read.
        field: &'static str,
        /// Bytes the field needs.
        needed: usize,
        /// Bytes that were left.
        left: usize,
    },
    /// Bytes were left after the message ended.
    #[error("{what} has {extra} trailing bytes after its end")]
    TrailingBytes {
        /// The message being decoded.
        what: &'static str,
        /// How many bytes were left over.
        extra: usize,
    },
    /// A field holds a value the format does not allow.
    #[error("invalid {field} in {what}: {reason}")]
    InvalidValue {
        /// The message being decoded.
        what: &'static str,
        /// The field being read.
        field: &'static str,
        /// Why the value is not allowed.
        reason: String,
    },
}

/// A cursor over input bytes that reads fields strictly.
#[derive(Clone)]
pub struct Reader<'a> {
    what: &'static str,
    buf: &'a [u8],
}

impl fmt::Debug for Reader<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reader")
            .field("what", &self.what)
            .field("left", &self.buf.len())
            .finish()
    }
}

impl<'a> Reader<'a> {
    /// Starts reading `buf` as the message `what` (used in error messages).
    pub fn new(what: &'static str, buf: &'a [u8]) -> Self {
        Self { what, buf }
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    /// Fails unless every byte was read.
    pub fn finish(self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes {
                what: self.what,
                extra: self.buf.len(),
            })
        }
    }

    /// An error about `field` holding a bad value.
    pub fn invalid(&self, field: &'static str, reason: impl Into<String>) -> DecodeError {
        DecodeError::InvalidValue {
            what: self.what,
            field,
            reason: reason.into(),
        }
    }

    /// Reads `n` bytes.
    pub fn bytes(&mut self, field: &'static str, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated {
                what: self.what,
                field,
                needed: n,
                left: self.buf.len(),
            });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    /// Reads a fixed-size array.
    pub fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        let b = self.bytes(field, N)?;
        // Unwrap safety: `bytes` returned exactly N bytes.
        Ok(b.try_into().unwrap())
    }

    /// Reads a `u8`.
    pub fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(field)?[0])
    }

    /// Reads a big-endian `u16`.
    pub fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array(field)?))
    }

    /// Reads a big-endian `u32`.
    pub fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array(field)?))
    }

    /// Reads a big-endian `u64`.
    pub fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array(field)?))
    }

    /// Reads a byte string with a `u8` length prefix.
    pub fn opaque_u8(&mut self, field: &'static str) -> Result<&'a [u8], DecodeError> {
        let n = self.u8(field)? as usize;
        self.bytes(field, n)
    }

    /// Reads a byte string with a `u16` length prefix.
    pub fn opaque_u16(&mut self, field: &'static str) -> Result<&'a [u8], DecodeError> {
        let n = self.u16(field)? as usize;
        self.bytes(field, n)
    }

    /// Reads a byte string with a `u32` length prefix.
    pub fn opaque_u32(&mut self, field: &'static str) -> Result<&'a [u8], DecodeError> {
        let n = self.u32(field)? as usize;
        self.bytes(field, n)
    }

    /// Reads everything that is left.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }
}

/// Appends fields to a byte vector.
pub trait Writer {
    /// Appends a `u8`.
    fn put_u8(&mut self, v: u8);
    /// Appends a big-endian `u16`.
    fn put_u16(&mut self, v: u16);
    /// Appends a big-endian `u32`.
    fn put_u32(&mut self, v: u32);
    /// Appends a big-endian `u64`.
    fn put_u64(&mut self, v: u64);
    /// Appends a byte string with a `u8` length prefix. Panics if it is longer than 255 bytes:
    /// callers check lengths in their constructors.
    fn put_opaque_u8(&mut self, v: &[u8]);
    /// Appends a byte string with a `u16` length prefix. Panics past 65,535 bytes (see above).
    fn put_opaque_u16(&mut self, v: &[u8]);
    /// Appends a byte string with a `u32` length prefix.
    fn put_opaque_u32(&mut self, v: &[u8]);
}

impl Writer for Vec<u8> {
    fn put_u8(&mut self, v: u8) {
        self.push(v);
    }
    fn put_u16(&mut self, v: u16) {
        self.extend_from_slice(&v.to_be_bytes());
    }
    fn put_u32(&mut self, v: u32) {
        self.extend_from_slice(&v.to_be_bytes());
    }
    fn put_u64(&mut self, v: u64) {
        self.extend_from_slice(&v.to_be_bytes());
    }
    fn put_opaque_u8(&mut self, v: &[u8]) {
        let n = u8::try_from(v.len()).expect("length checked by the constructor");
        self.push(n);
        self.extend_from_slice(v);
    }
    fn put_opaque_u16(&mut self, v: &[u8]) {
        let n = u16::try_from(v.len()).expect("length checked by the constructor");
        self.put_u16(n);
        self.extend_from_slice(v);
    }
    fn put_opaque_u32(&mut self, v: &[u8]) {
        let n = u32::try_from(v.len()).expect("length checked by the constructor");
        self.put_u32(n);
        self.extend_from_slice(v);
    }
}

/// A message with hush's binary encoding.
pub trait Codec: Sized {
    /// Name used in error messages.
    const NAME: &'static str;

    /// Appends the encoding to `out`.
    fn encode(&self, out: &mut Vec<u8>);

    /// Reads one message from `r`, leaving the rest.
    fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError>;

    /// The encoding as a new vector.
    fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }

    /// Decodes exactly one message: truncated input and trailing bytes are errors.
    fn from_bytes(bytes: &[u8]) -> Result<Self, DecodeError> {
        decode_exact(bytes)
    }
}

/// Decodes exactly one `T` from `bytes`; trailing bytes are an error.
pub fn decode_exact<T: Codec>(bytes: &[u8]) -> Result<T, DecodeError> {
    let mut r = Reader::new(T::NAME, bytes);
    let v = T::decode(&mut r)?;
    r.finish()?;
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_reads_fields_in_order() {
        let mut buf = Vec::new();
        buf.put_u8(7);
        buf.put_u16(0x0102);
        buf.put_u32(0x03040506);
        buf.put_u64(u64::MAX);
        buf.put_opaque_u8(b"ab");
        buf.put_opaque_u16(b"cde");
        buf.put_opaque_u32(b"");
        assert_eq!(
            hex::encode(&buf),
            "07010203040506ffffffffffffffff0261620003636465\
             00000000"
        );
        let mut r = Reader::new("test", &buf);
        assert_eq!(r.u8("a").unwrap(), 7);
        assert_eq!(r.u16("b").unwrap(), 0x0102);
        assert_eq!(r.u32("c").unwrap(), 0x03040506);
        assert_eq!(r.u64("d").unwrap(), u64::MAX);
        assert_eq!(r.opaque_u8("e").unwrap(), b"ab");
        assert_eq!(r.opaque_u16("f").unwrap(), b"cde");
        assert_eq!(r.opaque_u32("g").unwrap(), b"");
        r.finish().unwrap();
    }

    #[test]
    fn truncation_names_the_field() {
        let mut r = Reader::new("thing", &[0, 5, 1, 2]);
        let err = r.opaque_u16("payload").unwrap_err();
        assert_eq!(
            err.to_string(),
            "truncated thing: needed 5 more bytes for payload, 2 left"
        );
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut r = Reader::new("thing", &[1, 2]);
        r.u8("x").unwrap();
        assert_eq!(
            r.finish().unwrap_err(),
            DecodeError::TrailingBytes {
                what: "thing",
                extra: 1
            }
        );
    }
}
