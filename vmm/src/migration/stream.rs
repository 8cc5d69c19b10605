//! The migration stream: versioned, record by record, every field bounded
//! (docs/migration.md has the diagram).
//!
//! ```text
//! "SDVMMIG\0" u32 version
//! record*:  u8 type | u32 length | payload (length bytes, at most MAX_RECORD)
//!   HELLO  JSON Hello (memory size, engine, image digest and length)
//!   IMAGE  the guest image's bytes (in pieces, in order, up to Hello.image_len)
//!   PAGES  u64 first pfn | count x 4096 bytes   (count <= MAX_PAGES_PER_RECORD)
//!   ZEROS  u64 first pfn | u64 count            (frames that are all zeros)
//!   ROUND  u32 round number (the round before it is complete)
//!   STATE  JSON: the saved sections (vCPU, irqchip, devices, tracker), the sync pause
//!   MISSING post-copy only, between STATE and DONE: (u64 first pfn, u64 count) runs of
//!          frames whose contents come after the switch-over
//!   DONE   empty: the source sent everything (in post-copy: everything but MISSING)
//! then the destination answers one byte: COMMIT (it has everything and will run the
//! guest) or ABORT, followed by a reason. In post-copy it may ask for missing frames
//! ('R' | u64 pfn) before and after COMMIT; the source sends PAGES for them and pushes
//! the rest, then END; the destination ends with 'S' | u64 demand faults | u64 ns blocked.
//! ```
//!
//! Integers are little-endian. The reader trusts nothing: a record longer than
//! [`MAX_RECORD`], an unknown type, a version from the future, pages outside guest RAM
//! or sizes that disagree are errors naming what was wrong.

use std::io::{Read, Write};

const PAGE: u64 = 4096;
pub const MAGIC: [u8; 8] = *b"SDVMMIG\0";
/// This build writes and reads version 1.
pub const VERSION: u32 = 1;
/// Largest record payload (4 MiB: state JSON, or 1023 pages with their header).
pub const MAX_RECORD: u32 = 4 << 20;
/// Pages in one PAGES record.
pub const MAX_PAGES_PER_RECORD: u64 = 256;
/// The destination's answer to DONE.
pub const COMMIT: u8 = 0xC0;
pub const ABORT: u8 = 0xAB;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Hello = 1,
    Image = 2,
    Pages = 3,
    Zeros = 4,
    Round = 5,
    State = 6,
    Done = 7,
    /// Post-copy: `(u64 first pfn, u64 count)` runs of frames that will come after the
    /// switch-over (between STATE and DONE).
    Missing = 8,
    /// Post-copy: every missing frame was sent.
    End = 9,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Hello,
            2 => Kind::Image,
            3 => Kind::Pages,
            4 => Kind::Zeros,
            5 => Kind::Round,
            6 => Kind::State,
            7 => Kind::Done,
            8 => Kind::Missing,
            9 => Kind::End,
            _ => return None,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the migration connection failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a migration stream (bad magic {0:02x?})")]
    BadMagic([u8; 8]),
    #[error("migration stream version {0} is not supported (this VMM reads version {VERSION})")]
    Version(u32),
    #[error("unknown record type {0} in the migration stream")]
    UnknownRecord(u8),
    #[error("migration record {kind:?} of {len} bytes exceeds the limit of {MAX_RECORD}")]
    TooLong { kind: Kind, len: u32 },
    #[error("malformed migration record {kind:?}: {why}")]
    Malformed { kind: Kind, why: String },
}

/// The first record: what the destination must build.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    pub mem_bytes: u64,
    pub engine: crate::tracking::EngineKind,
    /// SHA-256 of the guest image, in hex (as snapshots record it).
    pub image_sha256: String,
    pub image_len: u64,
}

/// Writes records.
pub struct Writer<W: Write> {
    w: W,
    pub bytes: u64,
}

impl<W: Write> Writer<W> {
    pub fn start(mut w: W) -> Result<Writer<W>, Error> {
        w.write_all(&MAGIC)?;
        w.write_all(&VERSION.to_le_bytes())?;
        Ok(Writer { w, bytes: 12 })
    }

    pub fn record(&mut self, kind: Kind, payload: &[&[u8]]) -> Result<(), Error> {
        let len: usize = payload.iter().map(|p| p.len()).sum();
        let len = u32::try_from(len).ok().filter(|&l| l <= MAX_RECORD).ok_or(Error::TooLong { kind, len: u32::MAX })?;
        self.w.write_all(&[kind as u8])?;
        self.w.write_all(&len.to_le_bytes())?;
        for p in payload {
            self.w.write_all(p)?;
        }
        self.bytes += 5 + u64::from(len);
        Ok(())
    }

    pub fn flush(&mut self) -> Result<(), Error> {
        Ok(self.w.flush()?)
    }

    pub fn inner(&mut self) -> &mut W {
        &mut self.w
    }
}

/// Reads records, refusing anything out of bounds before allocating for it.
pub struct Reader<R: Read> {
    r: R,
}

impl<R: Read> Reader<R> {
    pub fn start(mut r: R) -> Result<Reader<R>, Error> {
        let mut magic = [0u8; 8];
        r.read_exact(&mut magic)?;
        if magic != MAGIC {
            return Err(Error::BadMagic(magic));
        }
        let mut v = [0u8; 4];
        r.read_exact(&mut v)?;
        let v = u32::from_le_bytes(v);
        if v != VERSION {
            return Err(Error::Version(v));
        }
        Ok(Reader { r })
    }

    /// The next record's type and payload.
    pub fn next_record(&mut self) -> Result<(Kind, Vec<u8>), Error> {
        let (kind, len) = self.next_header()?;
        let mut payload = vec![0u8; len as usize];
        self.payload(&mut payload)?;
        Ok((kind, payload))
    }

    /// The next record's type and length (at most [`MAX_RECORD`]); its payload is read
    /// next, with [`Self::payload`], all of it.
    pub fn next_header(&mut self) -> Result<(Kind, u32), Error> {
        let mut head = [0u8; 5];
        self.r.read_exact(&mut head)?;
        let kind = Kind::from_u8(head[0]).ok_or(Error::UnknownRecord(head[0]))?;
        let len = u32::from_le_bytes(head[1..5].try_into().expect("4 bytes"));
        if len > MAX_RECORD {
            return Err(Error::TooLong { kind, len });
        }
        Ok((kind, len))
    }

    /// The next `buf.len()` bytes of the current record's payload.
    pub fn payload(&mut self, buf: &mut [u8]) -> Result<(), Error> {
        Ok(self.r.read_exact(buf)?)
    }

    pub fn into_inner(self) -> R {
        self.r
    }

    /// Goes on reading records from a stream whose header was read already.
    pub fn resume(r: R) -> Reader<R> {
        Reader { r }
    }

    pub fn get_ref(&self) -> &R {
        &self.r
    }

    pub fn get_mut(&mut self) -> &mut R {
        &mut self.r
    }
}

/// Checks that a `kind` record's `count` frames from `pfn` lie inside guest RAM of
/// `ram_pages` frames (and that there is at least one).
pub fn frames_in_ram(kind: Kind, pfn: u64, count: u64, ram_pages: u64) -> Result<(), String> {
    if count == 0 || pfn.checked_add(count).is_none_or(|end| end > ram_pages) {
        return Err(format!("{kind:?} record for {count} frames from {pfn:#x}, outside the {ram_pages} frames of guest RAM"));
    }
    Ok(())
}

/// Checks a PAGES record's data (`bytes` long, from frame `pfn`): whole pages, at most
/// [`MAX_PAGES_PER_RECORD`], inside guest RAM. Returns the page count.
pub fn pages_in_ram(pfn: u64, bytes: u64, ram_pages: u64) -> Result<u64, String> {
    if !bytes.is_multiple_of(PAGE) || bytes > MAX_PAGES_PER_RECORD * PAGE {
        return Err(format!("Pages record with {bytes} bytes of data"));
    }
    let count = bytes / PAGE;
    frames_in_ram(Kind::Pages, pfn, count, ram_pages)?;
    Ok(count)
}

/// `first pfn, then the rest` of a PAGES or ZEROS payload.
pub fn split_pfn(kind: Kind, payload: &[u8]) -> Result<(u64, &[u8]), Error> {
    if payload.len() < 8 {
        return Err(Error::Malformed { kind, why: format!("{} bytes, fewer than the 8 of a frame number", payload.len()) });
    }
    Ok((u64::from_le_bytes(payload[..8].try_into().expect("8 bytes")), &payload[8..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_bounds_hold() {
        let mut buf = Vec::new();
        let mut w = Writer::start(&mut buf).unwrap();
        w.record(Kind::Round, &[&7u32.to_le_bytes()]).unwrap();
        w.record(Kind::Done, &[]).unwrap();
        let mut r = Reader::start(&buf[..]).unwrap();
        assert_eq!(r.next_record().unwrap(), (Kind::Round, 7u32.to_le_bytes().to_vec()));
        assert_eq!(r.next_record().unwrap().0, Kind::Done);
        assert!(matches!(r.next_record(), Err(Error::Io(_))), "truncated");

        let mut future = buf.clone();
        future[8] = 9;
        assert!(matches!(Reader::start(&future[..]), Err(Error::Version(9))));
        assert!(matches!(Reader::start(&b"garbage garbage"[..]), Err(Error::BadMagic(_))));
        let mut huge = buf[..12].to_vec();
        huge.extend([Kind::State as u8]);
        huge.extend(u32::MAX.to_le_bytes());
        assert!(matches!(Reader::start(&huge[..]).unwrap().next_record(), Err(Error::TooLong { .. })), "no 4 GiB allocation");
        let mut unknown = buf[..12].to_vec();
        unknown.extend([99, 0, 0, 0, 0]);
        assert!(matches!(Reader::start(&unknown[..]).unwrap().next_record(), Err(Error::UnknownRecord(99))));
    }
}
