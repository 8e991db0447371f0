//! Newtypes for the units of this field: bytes, 512-byte sectors, logical and physical blocks
//! and sequence numbers. The bugs of block storage are unit bugs; these types keep them apart.

use std::fmt;

/// Size of a virtio-blk sector in bytes (virtio spec 5.2.6: sectors are always 512 bytes).
pub const SECTOR_SIZE: u64 = 512;

macro_rules! newtype_u64 {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        pub struct $name(pub u64);

        impl $name {
            /// The raw value.
            pub const fn get(self) -> u64 {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self.0)
            }
        }

        impl From<u64> for $name {
            fn from(v: u64) -> Self {
                Self(v)
            }
        }
    };
}

newtype_u64!(
    /// A logical block address: the index of a block of the virtual disk as the guest sees it,
    /// in units of the image's block size.
    Lba
);
newtype_u64!(
    /// A physical block address (block id): the index of a slot of the image's data area.
    /// Once written, the content of a data PBA never changes.
    Pba
);
newtype_u64!(
    /// The image's sequence number: every state-changing operation (write, discard,
    /// write-zeroes) gets the next one. Seq 0 is the freshly created image.
    Seq
);
newtype_u64!(
    /// A 512-byte virtio-blk sector number.
    Sector
);

impl Sector {
    /// Byte offset of this sector, or `None` on overflow.
    pub fn to_bytes(self) -> Option<u64> {
        self.0.checked_mul(SECTOR_SIZE)
    }
}

/// A block size: a power of two from 512 bytes to 64 KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlockSize(u32);

impl BlockSize {
    /// Smallest supported block size.
    pub const MIN: u32 = 512;
    /// Largest supported block size.
    pub const MAX: u32 = 64 * 1024;
    /// The default block size.
    pub const DEFAULT: BlockSize = BlockSize(4096);

    /// Validates a block size: a power of two in `MIN..=MAX`.
    pub fn new(bytes: u32) -> Option<Self> {
        if bytes.is_power_of_two() && (Self::MIN..=Self::MAX).contains(&bytes) {
            Some(Self(bytes))
        } else {
            None
        }
    }

    /// Bytes per block.
    pub const fn bytes(self) -> u32 {
        self.0
    }

    /// Bytes per block as `u64`.
    pub const fn bytes_u64(self) -> u64 {
        self.0 as u64
    }

    /// log2 of the block size.
    pub const fn shift(self) -> u32 {
        self.0.trailing_zeros()
    }
}

impl Default for BlockSize {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl fmt::Display for BlockSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Parses a size with an optional K/M/G/T suffix (binary multiples, case-insensitive, optional
/// trailing `B` or `iB`), like qemu-img: `8G`, `512`, `64K`, `1.5G` is rejected.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("empty size".to_string());
    }
    let lower = t.to_ascii_lowercase();
    let stripped = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .unwrap_or(&lower);
    let (digits, shift) = match stripped.chars().last() {
        Some('k') => (&stripped[..stripped.len() - 1], 10),
        Some('m') => (&stripped[..stripped.len() - 1], 20),
        Some('g') => (&stripped[..stripped.len() - 1], 30),
        Some('t') => (&stripped[..stripped.len() - 1], 40),
        Some('p') => (&stripped[..stripped.len() - 1], 50),
        _ => (stripped, 0),
    };
    let n: u64 = digits.parse().map_err(|_| {
        format!("invalid size '{s}': expected a number with an optional K/M/G/T suffix")
    })?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("size '{s}' overflows 64 bits"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_suffixes() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("64K").unwrap(), 65536);
        assert_eq!(parse_size("8G").unwrap(), 8 << 30);
        assert_eq!(parse_size("1t").unwrap(), 1 << 40);
        assert_eq!(parse_size("2MiB").unwrap(), 2 << 20);
        assert!(parse_size("").is_err());
        assert!(parse_size("1.5G").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn block_sizes_are_validated() {
        assert!(BlockSize::new(512).is_some());
        assert!(BlockSize::new(65536).is_some());
        assert!(BlockSize::new(256).is_none());
        assert!(BlockSize::new(131072).is_none());
        assert!(BlockSize::new(3000).is_none());
        assert_eq!(BlockSize::new(4096).unwrap().shift(), 12);
    }
}
