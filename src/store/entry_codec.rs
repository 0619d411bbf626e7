//! How a ledger entry's leaf bytes are kept in the database: deflated against a fixed
//! dictionary of entry text, and given back byte for byte.
//!
//! Every interaction stores one entry of about 560 bytes of canonical JSON, most of it the
//! same field names, actor and action words in every entry; alone, deflate makes little of so
//! short a text (560 → 390 bytes), but against a dictionary of typical entries it keeps
//! what is particular to the entry — ids, time, signature — in about 190. A hospital's ten
//! million reads a day then add about 2 GB a day instead of 5.6. Nothing is dropped: what is
//! hashed, signed, proved and served is always the decoded leaf bytes.
//!
//! The stored form says which encoding it is in its first byte: `{` is the leaf itself (rows
//! written before this encoding, or an entry deflate could not shorten); [`DEFLATE_V1`] is a
//! raw deflate stream against [`DICTIONARY_V1`]. The dictionary is part of the storage format:
//! a different one needs a new tag, and this module keeps decoding the old.

use std::cell::RefCell;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use super::StoreError;

/// The tag of a leaf deflated against [`DICTIONARY_V1`].
const DEFLATE_V1: u8 = 1;

/// Largest leaf a stored entry decodes to (an entry names at most a page of resources; the
/// bound keeps a damaged row from inflating without end).
const MAX_LEAF_BYTES: usize = 8 * 1024 * 1024;

/// Typical entry text, most frequent last (deflate finds nearer matches cheaper). Only field
/// names and words every deployment writes: no ids, no names, nothing of any patient.
const DICTIONARY_V1: &[u8] = br#"{"action":"create","actor":{"client":"","fhirUser":"Practitioner/","issuer":"https://","purpose":"TREAT","role":"user","subject":""},"id":"","outcome":"deny","reason":"forbidden","rule":"consent","v":1}{"action":"history","count":1,"id":"","outcome":"deny","reason":"not-found","source":"127.0.0.1","v":1}{"action":"update","id":"","outcome":"permit","parts":["",""],"patients":["Patient/"],"resources":[{"id":"","type":"Observation","versionId":"2"},{"id":"","type":"Encounter","versionId":"1"}],"withheld":1,"v":1}{"action":"search","actor":{"client":"","issuer":"http://127.0.0.1:8080/local-issuer","role":"patient","subject":""},"id":"","outcome":"permit","partOf":"","patient":"Patient/","request":"","resources":[{"id":"","type":"Observation","versionId":"1"}],"rule":"scope:patient","sig":"","time":"2026-01-01T00:00:00.000000Z","v":1}{"action":"read","actor":{"client":"fhirledger-cli","issuer":"http://127.0.0.1:8080/local-issuer","role":"system","subject":""},"id":"01","outcome":"permit","patient":"Patient/01","request":"","resources":[{"id":"01","type":"Patient","versionId":"1"}],"rule":"scope:system","sig":"","time":"2026-12-01T00:00:00.000000Z","v":1}"#;

/// The stored form of an entry's leaf bytes.
pub fn encode(leaf: &[u8]) -> Vec<u8> {
    deflate(leaf)
        .filter(|deflated| deflated.len() < leaf.len())
        .unwrap_or_else(|| leaf.to_vec())
}

fn deflate(leaf: &[u8]) -> Option<Vec<u8>> {
    thread_local! {
        // Every ledgered request encodes an entry: one compressor per thread, reset for each,
        // rather than a deflate state (hundreds of KiB) allocated and freed per entry.
        static COMPRESS: RefCell<Compress> = RefCell::new(Compress::new(Compression::default(), false));
    }
    COMPRESS.with(|compress| {
        let mut compress = compress.try_borrow_mut().ok()?;
        compress.reset();
        deflate_with(&mut compress, leaf)
    })
}

fn deflate_with(compress: &mut Compress, leaf: &[u8]) -> Option<Vec<u8>> {
    compress.set_dictionary(DICTIONARY_V1).ok()?;
    let mut out = Vec::with_capacity(leaf.len() / 2 + 64);
    out.push(DEFLATE_V1);
    loop {
        out.reserve(256);
        let consumed = usize::try_from(compress.total_in()).ok()?;
        match compress
            .compress_vec(leaf.get(consumed..)?, &mut out, FlushCompress::Finish)
            .ok()?
        {
            Status::StreamEnd => return Some(out),
            Status::Ok | Status::BufError => {}
        }
    }
}

/// The leaf bytes of a stored entry.
pub fn decode(stored: &[u8]) -> Result<Vec<u8>, StoreError> {
    match stored.first() {
        Some(b'{') => Ok(stored.to_vec()),
        Some(&DEFLATE_V1) => inflate(&stored[1..]),
        _ => Err(StoreError::Corrupt(
            "a ledger entry is stored in an unknown encoding".into(),
        )),
    }
}

fn inflate(deflated: &[u8]) -> Result<Vec<u8>, StoreError> {
    let corrupt = || StoreError::Corrupt("a stored ledger entry does not inflate".into());
    let mut decompress = Decompress::new(false);
    decompress
        .set_dictionary(DICTIONARY_V1)
        .map_err(|_| corrupt())?;
    let mut out = Vec::with_capacity(deflated.len() * 3);
    loop {
        if out.len() >= MAX_LEAF_BYTES {
            return Err(corrupt());
        }
        out.reserve(1024);
        let consumed = usize::try_from(decompress.total_in()).map_err(|_| corrupt())?;
        let before = (decompress.total_in(), decompress.total_out());
        let input = deflated.get(consumed..).ok_or_else(corrupt)?;
        match decompress
            .decompress_vec(input, &mut out, FlushDecompress::Finish)
            .map_err(|_| corrupt())?
        {
            Status::StreamEnd => return Ok(out),
            Status::Ok | Status::BufError => {
                if (decompress.total_in(), decompress.total_out()) == before
                    && out.len() < out.capacity()
                {
                    // No progress with room to spare: the stream is cut short.
                    return Err(corrupt());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;

    const ENTRY: &[u8] = br#"{"action":"read","actor":{"client":"fhirledger-cli","issuer":"http://127.0.0.1:8281/local-issuer","role":"system","subject":"bench"},"id":"01a22f45-8ef9-764b-95c5-889fd2a89324","outcome":"permit","patient":"Patient/01a22f44-76b9-746b-a0ea-3d4b3b7c18eb","request":"c9ecb5d2-7f9b-4c55-bde5-0a2e32bc2cb3","resources":[{"id":"01a22f44-76b9-746b-a0ea-3d4b3b7c18eb","type":"Patient","versionId":"1"}],"rule":"scope:system","sig":"OOK3XKJzhpR/ldfJnULedDtJhCH14VytezJKTBVM/kb5vDuAd+zxGO93G6pnpfGA89GChgIg1rLjqEed2z/FCQ==","time":"2026-12-01T01:43:37.465807Z","v":1}"#;

    #[test]
    fn entries_come_back_byte_for_byte_and_smaller() {
        let stored = encode(ENTRY);
        assert_eq!(stored[0], DEFLATE_V1);
        assert!(stored.len() * 2 < ENTRY.len(), "{} bytes", stored.len());
        assert_eq!(decode(&stored).unwrap(), ENTRY);
    }

    #[test]
    fn rows_written_before_the_encoding_decode_as_they_are() {
        assert_eq!(decode(ENTRY).unwrap(), ENTRY);
    }

    #[test]
    fn a_leaf_deflate_cannot_shorten_is_kept_as_it_is() {
        let tiny = br#"{"Zq":"xK9w"}"#;
        assert_eq!(encode(tiny), tiny);
        assert_eq!(decode(&encode(tiny)).unwrap(), tiny);
    }

    #[test]
    fn damaged_rows_are_errors_not_panics() {
        let mut stored = encode(ENTRY);
        stored.truncate(stored.len() / 2);
        assert!(decode(&stored).is_err());
        assert!(decode(&[DEFLATE_V1, 0xff, 0xff, 0xff]).is_err());
        assert!(decode(&[7, 1, 2]).is_err());
        assert!(decode(&[]).is_err());
    }

    #[test]
    fn large_entries_round_trip() {
        let mut big = b"{\"resources\":[".to_vec();
        for i in 0..5_000 {
            big.extend_from_slice(
                format!("{{\"id\":\"{i:032x}\",\"type\":\"Observation\",\"versionId\":\"1\"}},")
                    .as_bytes(),
            );
        }
        big.extend_from_slice(b"{}]}");
        assert_eq!(decode(&encode(&big)).unwrap(), big);
    }
}
