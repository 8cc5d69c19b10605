//! Checksums of snapshot and dump files: BLAKE3 (the `blake3` crate, SIMD-accelerated).
//!
//! Chosen over SHA-256 because checksumming is most of a snapshot's pause: a full
//! snapshot hashes all of guest RAM. Measured here on 256 MiB: SHA-256 (with SHA-NI)
//! 187 ms, BLAKE3 54 ms fed 1 MiB at a time, 107 ms fed 4 KiB at a time. The checksums
//! find corruption and mismatched files; they do not authenticate (anyone who can edit
//! a file can edit the manifest beside it).

/// The name manifests record.
pub const NAME: &str = "blake3";

/// A streaming checksum.
#[derive(Default)]
pub struct Hasher(blake3::Hasher);

impl Hasher {
    pub fn new() -> Hasher {
        Hasher::default()
    }

    pub fn update(&mut self, data: impl AsRef<[u8]>) {
        self.0.update(data.as_ref());
    }

    /// The checksum as 64 lowercase hex digits.
    pub fn hex(&self) -> String {
        self.0.finalize().to_hex().to_string()
    }
}

/// The checksum of `data`, in hex.
pub fn of(data: &[u8]) -> String {
    let mut h = Hasher::new();
    h.update(data);
    h.hex()
}

/// Checks that a manifest's `checksum` field names the checksum this build uses.
pub fn check_kind(kind: &str) -> Result<(), String> {
    if kind == NAME { Ok(()) } else { Err(format!("checksum {kind} is not {NAME}")) }
}

/// Checks that file `name` has checksum `have` against a manifest's `files` map.
/// The error is a sentence naming the file.
pub fn check(files: &std::collections::BTreeMap<String, String>, name: &str, have: &str) -> Result<(), String> {
    match files.get(name) {
        None => Err(format!("manifest lists no {name}")),
        Some(want) if want != have => Err(format!("{name} does not match its checksum (corrupted or truncated)")),
        Some(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn streaming_equals_one_shot_and_differs_on_a_flipped_bit() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        let mut h = super::Hasher::new();
        data.chunks(333).for_each(|c| h.update(c));
        assert_eq!(h.hex(), super::of(&data));
        let mut flipped = data.clone();
        flipped[5000] ^= 1;
        assert_ne!(super::of(&flipped), super::of(&data));
        assert_eq!(super::of(b"").len(), 64);
    }
}
