//! The destination side: accept one migration, check every record against what it
//! claims, fill fresh guest memory, and hand the run everything it needs to go on where
//! the source stopped. The stream is untrusted: nothing is written outside guest RAM,
//! no allocation follows a size the stream claims beyond its bounds.

use super::addr::Addr;
use super::postcopy::{self, Demand, Mailbox};
use super::stream::{self, split_pfn, Hello, Kind, Reader};
use super::transport::{self, Conn, Flags, Listener, Security};
use super::{decode_pause, decode_sections};
use crate::machine::devices::SyncPoint;
use crate::machine::image::MAX_IMAGE_BYTES;
use crate::machine::memory::{self, GuestMem, MIN_MEM_BYTES};
use crate::storage::snapshot::Sections;
use crate::tracking::frame_set::FrameSet;
use guest_abi::{MAX_MEM, MEM_ALIGN};
use std::io::Write;
use std::time::Duration;

const PAGE: u64 = 4096;
/// Silence from the source for this long ends the migration.
const READ_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Transport(#[from] transport::Error),
    #[error("incoming migration: {0}")]
    Stream(#[from] stream::Error),
    #[error("incoming migration: {0}")]
    Refused(String),
    #[error(transparent)]
    Memory(#[from] memory::Error),
    #[error(transparent)]
    Postcopy(#[from] super::postcopy::Error),
}

fn refused<T>(why: impl Into<String>) -> Result<T, Error> {
    Err(Error::Refused(why.into()))
}

/// A migration received in full, not yet committed.
pub struct Incoming {
    pub hello: Hello,
    pub image: Vec<u8>,
    pub mem: GuestMem,
    /// vCPU, irqchip, devices (`serial`) and tracker (`tracker`) sections.
    pub state: Sections,
    /// The sync the VM was paused at on the source, if it was.
    pub paused: Option<SyncPoint>,
    /// Post-copy: the frames that come after the switch-over.
    pub missing: Option<FrameSet>,
    /// The stream, until post-copy hands it to the fault thread.
    conn: Option<Conn>,
    /// Post-copy: the way to the source, through the fault thread that owns the stream.
    mailbox: Option<Mailbox>,
}

impl Incoming {
    /// Post-copy: drops the missing frames and starts serving faults on guest RAM by
    /// fetching them from the source. Call before anything touches guest memory.
    pub fn start_postcopy(&mut self) -> Result<Option<Demand>, Error> {
        let Some(missing) = self.missing.take() else { return Ok(None) };
        let conn = self.conn.take().expect("the stream is here until post-copy starts");
        eprintln!("vmm: post-copy: {} frames follow from the source while the guest runs here", missing.len());
        let (demand, mailbox) = Demand::start(&self.mem, missing, conn)?;
        self.mailbox = Some(mailbox);
        Ok(Some(demand))
    }

    /// Tells the source that this side has everything and runs the guest from here on:
    /// the source then stops for good.
    pub fn commit(self) -> std::io::Result<()> {
        self.answer(vec![stream::COMMIT])
    }

    /// Tells the source to go on (this side failed to build the VM).
    pub fn abort(self, why: &str) {
        let mut msg = vec![stream::ABORT];
        msg.extend(why.as_bytes());
        let _ = self.answer(msg);
    }

    /// The last words of the stream's receiver. In post-copy they go through the fault
    /// thread, which keeps the connection; otherwise it is closed cleanly after them.
    fn answer(self, msg: Vec<u8>) -> std::io::Result<()> {
        if let Some(mailbox) = &self.mailbox {
            return mailbox.send(msg);
        }
        let mut conn = self.conn.expect("the stream is here without post-copy");
        let sent = conn.write_all(&msg).and_then(|()| conn.flush());
        conn.close();
        sent
    }
}

/// Checks `flags` against `addr` (loading the TLS files) and listens there; the
/// listener knows the port it bound.
pub fn listen(addr: &Addr, flags: &Flags) -> Result<Listener, Error> {
    let security = Security::new(addr, flags)?;
    Ok(transport::listen(addr, &security)?)
}

/// Waits up to `wait` for one migration on `listener` and receives it.
///
/// `prepare` runs once the first records said what machine comes and its (still empty)
/// memory exists, before any frame arrives: whatever it builds there (the VM, its
/// memory slots, the vCPU) is off the downtime, which is only the last dirty set, the
/// state and the commit. An error from it ends the migration (the source goes on).
pub fn receive<T, E: From<Error>>(listener: Listener, wait: Duration, prepare: impl FnOnce(&Hello, &GuestMem) -> Result<T, E>)
    -> Result<(Incoming, T), E> {
    let conn = listener.accept_within(wait).map_err(Error::from)?;
    // A source that goes silent, or stops reading our answer, ends the migration.
    conn.set_read_timeout(Some(READ_TIMEOUT))
        .and_then(|()| conn.set_write_timeout(Some(READ_TIMEOUT)))
        .map_err(|e| Error::from(stream::Error::from(e)))?;
    let (r, hello, image, mem) = read_machine(conn)?;
    let prepared = prepare(&hello, &mem)?;
    Ok((read_memory_and_state(r, hello, image, mem)?, prepared))
}

/// Checks the first record: the machine it describes must be one this VMM can build.
fn check_hello(h: &Hello) -> Result<(), Error> {
    if h.mem_bytes < MIN_MEM_BYTES || h.mem_bytes > MAX_MEM || !h.mem_bytes.is_multiple_of(MEM_ALIGN) {
        return refused(format!("guest memory of {} bytes is not a multiple of 2 MiB between {} and {} MiB",
            h.mem_bytes, MIN_MEM_BYTES >> 20, MAX_MEM >> 20));
    }
    if h.image_len == 0 || h.image_len > MAX_IMAGE_BYTES {
        return refused(format!("a guest image of {} bytes (the limit is {MAX_IMAGE_BYTES})", h.image_len));
    }
    if h.image_sha256.len() != 64 || !h.image_sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return refused("the image digest is not 64 hex digits");
    }
    Ok(())
}

/// The stream up to its first frame: the machine (Hello, checked), the image (checked
/// against its digest) and fresh guest memory of the announced size.
fn read_machine(conn: Conn) -> Result<(Reader<Conn>, Hello, Vec<u8>, GuestMem), Error> {
    let mut r = match Reader::start(conn) {
        // A TLS record header (handshake, version 3.x) where the magic was due.
        Err(stream::Error::BadMagic(m)) if m[..2] == [0x16, 0x03] => {
            return refused("a TLS handshake arrived, not a migration stream: the source uses TLS, this destination --insecure-plaintext");
        }
        r => r?,
    };
    let (kind, payload) = r.next_record()?;
    if kind != Kind::Hello {
        return refused(format!("the stream starts with {kind:?}, not Hello"));
    }
    let hello: Hello = serde_json::from_slice(&payload).map_err(|e| Error::Refused(format!("Hello: {e}")))?;
    check_hello(&hello)?;
    let mut image = Vec::new();
    while (image.len() as u64) < hello.image_len {
        let (kind, payload) = r.next_record()?;
        if kind != Kind::Image || image.len() as u64 + payload.len() as u64 > hello.image_len {
            return refused(format!("{kind:?} record where {} more image bytes were due", hello.image_len - image.len() as u64));
        }
        image.extend(payload);
    }
    let digest = crate::storage::snapshot::sha256_hex(&image);
    if digest != hello.image_sha256 {
        return refused(format!("the image's SHA-256 is {digest}, the stream announced {}", hello.image_sha256));
    }
    let mem = memory::create(hello.mem_bytes)?;
    Ok((r, hello, image, mem))
}

/// The rest of the stream: frames straight into `mem`, the state, post-copy's missing
/// frames, DONE.
fn read_memory_and_state(mut r: Reader<Conn>, hello: Hello, image: Vec<u8>, mem: GuestMem) -> Result<Incoming, Error> {
    let pages = hello.mem_bytes / PAGE;
    // Frames written so far: a zero run for a frame nobody wrote costs nothing (fresh
    // memory is zero), for one written before it is written again.
    let mut written = FrameSet::new(pages);
    let in_ram = |kind, pfn: u64, count: u64| stream::frames_in_ram(kind, pfn, count, pages).map_err(Error::Refused);
    let zero = vec![0u8; PAGE as usize];
    let state = loop {
        let (kind, len) = r.next_header()?;
        if kind == Kind::Pages {
            // Read straight into guest memory (no vCPU runs yet), after the checks.
            if len < 8 {
                return refused(format!("Pages record of {len} bytes, fewer than the 8 of a frame number"));
            }
            let mut first = [0u8; 8];
            r.payload(&mut first)?;
            let pfn = u64::from_le_bytes(first);
            let bytes = u64::from(len) - 8;
            let count = stream::pages_in_ram(pfn, bytes, pages).map_err(Error::Refused)?;
            memory::populate(&mem, pfn * PAGE, bytes as usize);
            memory::with_stopped_guest_bytes_mut(&mem, pfn * PAGE, bytes as usize, |dst| r.payload(dst))??;
            written.insert_range(pfn, count);
            continue;
        }
        let mut payload = vec![0u8; len as usize];
        r.payload(&mut payload)?;
        match kind {
            Kind::Pages => unreachable!("read above"),
            Kind::Zeros => {
                let (pfn, rest) = split_pfn(kind, &payload)?;
                let count = u64::from_le_bytes(rest.try_into().map_err(|_| Error::Refused("Zeros record of the wrong size".into()))?);
                in_ram(kind, pfn, count)?;
                for p in pfn..pfn + count {
                    if written.contains(p) {
                        memory::write(&mem, p * PAGE, &zero)?;
                    }
                }
            }
            Kind::Round => {}
            Kind::State => break decode_sections(&payload).map_err(|e| Error::Refused(format!("State: {e}")))?,
            other => return refused(format!("{other:?} record in the memory part of the stream")),
        }
    };
    let mut missing: Option<FrameSet> = None;
    loop {
        let (kind, payload) = r.next_record()?;
        match kind {
            Kind::Done => break,
            Kind::Missing => {
                let set = missing.get_or_insert_with(|| FrameSet::new(pages));
                postcopy::decode_missing(&payload, set, pages).map_err(Error::Refused)?;
            }
            _ => return refused(format!("{kind:?} record after State, where Done was due")),
        }
    }
    let paused = state.get("pause").map(|b| decode_pause(b)).transpose().map_err(Error::Refused)?;
    // What the stream wrote is the guest's memory, not a write of this VMM.
    memory::take_vmm_writes(&mem);
    let conn = r.into_inner();
    Ok(Incoming { hello, image, mem, state, paused, missing, conn: Some(conn), mailbox: None })
}
