//! Splitting a byte stream into JSON messages.
//!
//! geth writes every message as compact JSON followed by `\n`, but a read may return
//! half a message or several at once, so messages are cut where a top-level JSON
//! value ends, not at newlines. A small incremental scanner (string/escape state and
//! nesting depth) finds the end of each value in O(n) over the stream, so a huge
//! message arriving in many reads is not re-parsed from the start on every read;
//! each complete value is then validated with `serde_json`.

use std::fmt;

/// The largest single message accepted (geth's IPC has no response size limit; this
/// only bounds memory against a runaway stream).
pub(crate) const DEFAULT_MAX_MESSAGE: usize = 256 * 1024 * 1024;

/// The byte stream is not a sequence of JSON values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FramingError {
    /// A byte that cannot start a JSON-RPC message (an object or an array).
    UnexpectedByte {
        /// The byte.
        byte: u8,
        /// Its offset in the stream.
        offset: u64,
    },
    /// A complete value that is not valid JSON (or not UTF-8).
    InvalidJson {
        /// serde_json's or the UTF-8 decoder's message.
        reason: String,
        /// The start of the value, for the log.
        excerpt: String,
    },
    /// A message larger than the limit.
    TooLarge {
        /// The limit in bytes.
        limit: usize,
    },
}

impl fmt::Display for FramingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FramingError::UnexpectedByte { byte, offset } => write!(
                f,
                "garbage on the IPC stream: byte {:?} at offset {offset} cannot start a JSON-RPC message",
                char::from(*byte)
            ),
            FramingError::InvalidJson { reason, excerpt } => {
                write!(f, "invalid JSON on the IPC stream ({reason}): {excerpt:?}")
            }
            FramingError::TooLarge { limit } => {
                write!(f, "a message on the IPC stream exceeds {limit} bytes")
            }
        }
    }
}

impl std::error::Error for FramingError {}

/// Accumulates bytes and yields complete top-level JSON values.
#[derive(Debug)]
pub(crate) struct JsonStreamDecoder {
    buf: Vec<u8>,
    /// Bytes of `buf` already scanned.
    scanned: usize,
    /// Nesting depth inside the current value (0: between values).
    depth: usize,
    in_string: bool,
    escaped: bool,
    /// Where the current value starts in `buf`, once its first byte was seen.
    start: Option<usize>,
    /// Bytes consumed before `buf[0]`, for error offsets.
    consumed: u64,
    max_message: usize,
}

impl Default for JsonStreamDecoder {
    fn default() -> Self {
        Self::with_limit(DEFAULT_MAX_MESSAGE)
    }
}

impl JsonStreamDecoder {
    /// A decoder that rejects messages larger than `max_message` bytes.
    pub(crate) fn with_limit(max_message: usize) -> Self {
        Self {
            buf: Vec::new(),
            scanned: 0,
            depth: 0,
            in_string: false,
            escaped: false,
            start: None,
            consumed: 0,
            max_message,
        }
    }

    /// Appends bytes read from the stream.
    pub(crate) fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// True when bytes of an unfinished message are buffered.
    pub(crate) fn has_partial(&self) -> bool {
        self.buf.iter().any(|b| !b.is_ascii_whitespace())
    }

    /// The next complete message, `Ok(None)` when more bytes are needed. After an
    /// error the stream is unusable (the caller closes the connection).
    pub(crate) fn next_message(&mut self) -> Result<Option<String>, FramingError> {
        let mut i = self.scanned;
        let mut end = None;
        while i < self.buf.len() {
            let b = self.buf[i];
            if self.in_string {
                if self.escaped {
                    self.escaped = false;
                } else if b == b'\\' {
                    self.escaped = true;
                } else if b == b'"' {
                    self.in_string = false;
                }
            } else if self.start.is_none() {
                match b {
                    b' ' | b'\t' | b'\r' | b'\n' => {}
                    b'{' | b'[' => {
                        self.start = Some(i);
                        self.depth = 1;
                    }
                    _ => {
                        return Err(FramingError::UnexpectedByte {
                            byte: b,
                            offset: self.consumed + i as u64,
                        });
                    }
                }
            } else {
                match b {
                    b'"' => self.in_string = true,
                    b'{' | b'[' => self.depth += 1,
                    b'}' | b']' => {
                        self.depth -= 1;
                        if self.depth == 0 {
                            end = Some(i + 1);
                            i += 1;
                            break;
                        }
                    }
                    _ => {}
                }
            }
            i += 1;
        }
        self.scanned = i;

        let Some(end) = end else {
            let pending = match self.start {
                Some(s) => self.buf.len() - s,
                None => 0,
            };
            if pending > self.max_message {
                return Err(FramingError::TooLarge {
                    limit: self.max_message,
                });
            }
            if self.start.is_none() {
                // Only whitespace so far: drop it.
                self.consumed += self.buf.len() as u64;
                self.buf.clear();
                self.scanned = 0;
            }
            return Ok(None);
        };
        let start = self.start.take().unwrap_or(0);
        if end - start > self.max_message {
            return Err(FramingError::TooLarge {
                limit: self.max_message,
            });
        }
        let bytes = &self.buf[start..end];
        let invalid = |reason: String| FramingError::InvalidJson {
            reason,
            excerpt: String::from_utf8_lossy(&bytes[..bytes.len().min(80)]).into_owned(),
        };
        let text = std::str::from_utf8(bytes).map_err(|e| invalid(e.to_string()))?;
        serde_json::from_str::<serde::de::IgnoredAny>(text).map_err(|e| invalid(e.to_string()))?;
        let msg = text.to_owned();
        self.buf.drain(..end);
        self.consumed += end as u64;
        self.scanned = 0;
        Ok(Some(msg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(dec: &mut JsonStreamDecoder) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(m) = dec.next_message().unwrap() {
            out.push(m);
        }
        out
    }

    #[test]
    fn byte_at_a_time() {
        let stream = concat!(
            r#"{"jsonrpc":"2.0","id":1,"result":{"s":"a}]\"{["}}"#,
            "\n",
            r#"[{"jsonrpc":"2.0","id":2,"result":true}]"#,
            "\n"
        );
        let mut dec = JsonStreamDecoder::default();
        let mut got = Vec::new();
        for b in stream.as_bytes() {
            dec.push(&[*b]);
            got.extend(all(&mut dec));
        }
        assert_eq!(
            got,
            vec![
                r#"{"jsonrpc":"2.0","id":1,"result":{"s":"a}]\"{["}}"#.to_owned(),
                r#"[{"jsonrpc":"2.0","id":2,"result":true}]"#.to_owned()
            ]
        );
        assert!(!dec.has_partial());
    }

    #[test]
    fn coalesced_messages_without_newlines_and_with_split_utf8() {
        let mut dec = JsonStreamDecoder::default();
        dec.push(br#"{"id":1,"result":"\u00e9\\"}{"id":2,"result":"h"#);
        dec.push(&[0xc3]); // first byte of é
        assert_eq!(all(&mut dec), vec![r#"{"id":1,"result":"\u00e9\\"}"#]);
        assert!(dec.has_partial());
        dec.push(&[0xa9]);
        dec.push(b"\"}\n  {\"id\":3,\"result\":[]}\n");
        assert_eq!(
            all(&mut dec),
            vec![r#"{"id":2,"result":"hé"}"#, r#"{"id":3,"result":[]}"#]
        );
    }

    #[test]
    fn huge_message_in_chunks() {
        let big = "x".repeat(30 * 1024 * 1024);
        let msg = format!(r#"{{"jsonrpc":"2.0","id":7,"result":"{big}"}}"#);
        let mut dec = JsonStreamDecoder::default();
        let bytes = msg.as_bytes();
        let mut got = Vec::new();
        for chunk in bytes.chunks(64 * 1024) {
            dec.push(chunk);
            got.extend(all(&mut dec));
        }
        dec.push(b"\n");
        got.extend(all(&mut dec));
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].len(), msg.len());
    }

    #[test]
    fn message_over_the_limit_is_an_error() {
        let mut dec = JsonStreamDecoder::with_limit(16);
        dec.push(br#"{"result":"0123456789abcdef"#);
        assert!(matches!(
            dec.next_message(),
            Err(FramingError::TooLarge { limit: 16 })
        ));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let cases: &[&[u8]] = &[
            b"hello\n",
            b"{\"a\" 1}",
            b"{]",
            b"[1,2,}",
            b"\x00\xff",
            b"{\"a\":\"\xff\xfe\"}",
            b"  \n 42",
            b"}",
        ];
        for case in cases {
            let mut dec = JsonStreamDecoder::default();
            dec.push(case);
            let res = (0..4).map(|_| dec.next_message()).find(|r| r.is_err());
            let err = res
                .unwrap_or_else(|| panic!("{case:?} gave no error"))
                .unwrap_err();
            assert!(!err.to_string().is_empty());
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap deterministic fuzz: xorshift bytes, biased towards JSON punctuation.
        let alphabet = b"{}[]\"\\:,0123 \nab\xc3\xa9";
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..2000 {
            let mut dec = JsonStreamDecoder::with_limit(512);
            for _ in 0..64 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let n = (x % 8) as usize;
                let chunk: Vec<u8> = (0..n)
                    .map(|k| alphabet[((x >> (k * 5)) as usize) % alphabet.len()])
                    .collect();
                dec.push(&chunk);
                if dec.next_message().is_err() {
                    break;
                }
            }
        }
    }
}
