//! NDJSON split into numbered, bounded lines as bytes arrive, for every reader of bulk data
//! (a file on disk, a request body streamed over HTTP): a line longer than the bound is
//! skipped to its end without being held in memory.

/// One line as read: its text, or why it cannot be one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    Text(String),
    Blank,
    TooLong,
    NotUtf8,
}

/// Splits bytes pushed in any chunks into lines numbered from 1 (`\n` or `\r\n` ended; the
/// last may lack its end).
#[derive(Debug)]
pub struct LineSplitter {
    max: usize,
    number: u64,
    buffer: Vec<u8>,
    /// The current line passed the bound: its bytes are dropped until its end.
    overflowed: bool,
}

impl LineSplitter {
    /// Lines of at most `max` bytes (without their end).
    pub fn new(max: usize) -> Self {
        Self {
            max,
            number: 0,
            buffer: Vec::new(),
            overflowed: false,
        }
    }

    /// How many lines have been completed so far.
    pub fn lines(&self) -> u64 {
        self.number
    }

    /// Takes `chunk`, adding each line it completes to `out`; returns how many bytes of the
    /// chunk were consumed. With `stop_after`, stops at the end of the line that brings
    /// `out` to that many entries, so a reader can act on a full batch first and push the
    /// rest of the chunk after.
    pub fn push(
        &mut self,
        mut chunk: &[u8],
        out: &mut Vec<(u64, Line)>,
        stop_after: Option<usize>,
    ) -> usize {
        let length = chunk.len();
        while !chunk.is_empty() {
            if stop_after.is_some_and(|limit| out.len() >= limit) {
                break;
            }
            match chunk.iter().position(|&b| b == b'\n') {
                Some(at) => {
                    self.take(&chunk[..at]);
                    out.push(self.finish_line());
                    chunk = &chunk[at + 1..];
                }
                None => {
                    self.take(chunk);
                    chunk = &[];
                }
            }
        }
        length - chunk.len()
    }

    /// The last line, when the input ended without a line end after it.
    pub fn finish(&mut self) -> Option<(u64, Line)> {
        (self.overflowed || !self.buffer.is_empty()).then(|| self.finish_line())
    }

    fn take(&mut self, part: &[u8]) {
        if self.overflowed {
            return;
        }
        // One byte over the bound is kept so that a `\r` before the end can still go.
        if self.buffer.len() + part.len() > self.max.saturating_add(1) {
            self.overflowed = true;
            self.buffer = Vec::new();
        } else {
            self.buffer.extend_from_slice(part);
        }
    }

    fn finish_line(&mut self) -> (u64, Line) {
        self.number += 1;
        if self.buffer.last() == Some(&b'\r') {
            self.buffer.pop();
        }
        let line = if self.overflowed || self.buffer.len() > self.max {
            Line::TooLong
        } else {
            match std::str::from_utf8(&self.buffer) {
                Ok(text) if text.trim().is_empty() => Line::Blank,
                Ok(text) => Line::Text(text.to_owned()),
                Err(_) => Line::NotUtf8,
            }
        };
        self.buffer.clear();
        self.overflowed = false;
        (self.number, line)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail by panicking")]

    use super::*;

    fn split(chunks: &[&[u8]], max: usize) -> Vec<(u64, Line)> {
        let mut splitter = LineSplitter::new(max);
        let mut out = Vec::new();
        for chunk in chunks {
            assert_eq!(splitter.push(chunk, &mut out, None), chunk.len());
        }
        out.extend(splitter.finish());
        out
    }

    fn text(s: &str) -> Line {
        Line::Text(s.into())
    }

    #[test]
    fn lines_are_numbered_whatever_the_chunks() {
        let whole = split(&[b"{\"a\":1}\r\n\n  \n{\"b\":2}"], 100);
        let pieces = split(&[b"{\"a\"", b":1}\r", b"\n\n ", b" \n{\"b\":", b"2}"], 100);
        assert_eq!(whole, pieces);
        assert_eq!(
            whole,
            vec![
                (1, text("{\"a\":1}")),
                (2, Line::Blank),
                (3, Line::Blank),
                (4, text("{\"b\":2}"))
            ]
        );
    }

    #[test]
    fn a_long_line_is_named_and_the_next_one_read() {
        let lines = split(&[b"0123456789", b"0123\nok\n", b"\xff\xfe\n"], 8);
        assert_eq!(
            lines,
            vec![(1, Line::TooLong), (2, text("ok")), (3, Line::NotUtf8)]
        );
        // Exactly the bound fits, with or without a `\r` after it.
        let lines = split(&[b"12345678\r\n12345678\n123456789\n"], 8);
        assert_eq!(
            lines,
            vec![
                (1, text("12345678")),
                (2, text("12345678")),
                (3, Line::TooLong)
            ]
        );
        // A long last line without an end is still named.
        assert_eq!(
            split(&[b"ok\n0123456789"], 8),
            vec![(1, text("ok")), (2, Line::TooLong)]
        );
    }

    #[test]
    fn a_reader_can_stop_at_a_full_batch_and_push_the_rest_after() {
        let mut splitter = LineSplitter::new(100);
        let mut out = Vec::new();
        let chunk = b"a\nb\nc\nd";
        let used = splitter.push(chunk, &mut out, Some(2));
        assert_eq!(out, vec![(1, text("a")), (2, text("b"))]);
        out.clear();
        assert_eq!(
            used + splitter.push(&chunk[used..], &mut out, Some(2)),
            chunk.len()
        );
        out.extend(splitter.finish());
        assert_eq!(out, vec![(3, text("c")), (4, text("d"))]);
        assert_eq!(splitter.lines(), 4);
    }
}
