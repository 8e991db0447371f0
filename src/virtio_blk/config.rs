//! The virtio-blk device configuration space (virtio spec 1.2, section 5.2.4).
//!
//! [`BlkConfig`] is `struct virtio_blk_config` byte for byte (little-endian, no padding), up to
//! and including the secure-erase fields; the zoned fields that follow are not offered and read
//! as zeros. [`BlkConfig::read_window`] answers a configuration read of any offset and length,
//! and [`BlkConfig::write_window`] accepts the one field a driver may write (`writeback`).

use std::mem::size_of;

use vm_memory::{ByteValued, Le16, Le32, Le64};

use crate::units::SECTOR_SIZE;

/// The largest configuration read answered, in bytes (the vhost-user limit,
/// `VHOST_USER_CONFIG_SIZE`). Longer reads are truncated to it.
pub const MAX_CONFIG_WINDOW: u32 = 0x1000;

/// Byte offset of `writeback` in the configuration space.
pub const WRITEBACK_OFFSET: u32 = 32;

/// `struct virtio_blk_config` (virtio spec 1.2, 5.2.4), little-endian, 72 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlkConfig {
    /// Capacity in 512-byte sectors.
    pub capacity: Le64,
    /// Maximum size of one data segment (VIRTIO_BLK_F_SIZE_MAX).
    pub size_max: Le32,
    /// Maximum number of data segments in a request (VIRTIO_BLK_F_SEG_MAX).
    pub seg_max: Le32,
    /// Geometry: cylinders (VIRTIO_BLK_F_GEOMETRY, not offered).
    pub cylinders: Le16,
    /// Geometry: heads.
    pub heads: u8,
    /// Geometry: sectors per track.
    pub sectors: u8,
    /// Logical block size in bytes (VIRTIO_BLK_F_BLK_SIZE).
    pub blk_size: Le32,
    /// log2 of logical blocks per physical block (VIRTIO_BLK_F_TOPOLOGY).
    pub physical_block_exp: u8,
    /// Offset of the first aligned logical block.
    pub alignment_offset: u8,
    /// Suggested minimum I/O size, in logical blocks.
    pub min_io_size: Le16,
    /// Optimal (suggested maximum) I/O size, in logical blocks.
    pub opt_io_size: Le32,
    /// 1: write-back cache (the driver must FLUSH); 0: write-through (VIRTIO_BLK_F_CONFIG_WCE).
    pub writeback: u8,
    /// Reserved.
    pub unused0: u8,
    /// Number of request queues (VIRTIO_BLK_F_MQ).
    pub num_queues: Le16,
    /// Maximum sectors in one discard segment (VIRTIO_BLK_F_DISCARD).
    pub max_discard_sectors: Le32,
    /// Maximum discard segments in one request.
    pub max_discard_seg: Le32,
    /// Discard alignment, in sectors.
    pub discard_sector_alignment: Le32,
    /// Maximum sectors in one write-zeroes segment (VIRTIO_BLK_F_WRITE_ZEROES).
    pub max_write_zeroes_sectors: Le32,
    /// Maximum write-zeroes segments in one request.
    pub max_write_zeroes_seg: Le32,
    /// 1 when write-zeroes with the UNMAP flag may deallocate.
    pub write_zeroes_may_unmap: u8,
    /// Reserved.
    pub unused1: [u8; 3],
    /// Secure erase limits (VIRTIO_BLK_F_SECURE_ERASE, not offered).
    pub max_secure_erase_sectors: Le32,
    /// Secure erase limits (not offered).
    pub max_secure_erase_seg: Le32,
    /// Secure erase limits (not offered).
    pub secure_erase_sector_alignment: Le32,
}

// The layout above has no implicit padding: every field sits at its natural alignment and the
// total is a multiple of 8.
const _: () = assert!(size_of::<BlkConfig>() == 72);

// SAFETY: BlkConfig is repr(C), made only of integers and arrays of integers (the Le* types are
// transparent wrappers over them), has no implicit padding (asserted above), and every bit
// pattern is a valid value.
unsafe impl ByteValued for BlkConfig {}

/// What the configuration space is built from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigParams {
    /// Device capacity in bytes (rounded down to whole sectors).
    pub capacity_bytes: u64,
    /// Logical block size reported as `blk_size` (512 unless the guest should see 4Kn).
    pub logical_block_size: u32,
    /// Physical block size (the image's block size), reported through the topology.
    pub physical_block_size: u32,
    /// Maximum data segments per request.
    pub seg_max: u32,
    /// Number of request queues.
    pub num_queues: u16,
    /// Whether the device presents a write-back cache.
    pub writeback: bool,
    /// Maximum sectors per discard / write-zeroes segment.
    pub max_dwz_sectors: u32,
    /// Maximum discard / write-zeroes segments per request.
    pub max_dwz_segments: u32,
}

/// A rejected configuration write.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// The write touches bytes other than `writeback`.
    #[error("configuration write of {len} bytes at offset {offset} touches read-only fields")]
    ReadOnlyField {
        /// Offset of the write.
        offset: u32,
        /// Length of the write.
        len: usize,
    },
    /// `writeback` may only be 0 or 1.
    #[error("invalid writeback value {0}")]
    InvalidWriteback(u8),
}

impl BlkConfig {
    /// Builds the configuration space.
    pub fn new(p: &ConfigParams) -> Self {
        let logical = p.logical_block_size.max(SECTOR_SIZE as u32);
        let physical = p.physical_block_size.max(logical);
        let per_physical = physical / logical;
        let physical_sectors = physical / SECTOR_SIZE as u32;
        BlkConfig {
            capacity: Le64::from(p.capacity_bytes / SECTOR_SIZE),
            seg_max: Le32::from(p.seg_max),
            blk_size: Le32::from(logical),
            physical_block_exp: per_physical.trailing_zeros() as u8,
            min_io_size: Le16::from(u16::try_from(per_physical).unwrap_or(u16::MAX)),
            opt_io_size: Le32::from(per_physical),
            writeback: u8::from(p.writeback),
            num_queues: Le16::from(p.num_queues),
            max_discard_sectors: Le32::from(p.max_dwz_sectors),
            max_discard_seg: Le32::from(p.max_dwz_segments),
            discard_sector_alignment: Le32::from(physical_sectors),
            max_write_zeroes_sectors: Le32::from(p.max_dwz_sectors),
            max_write_zeroes_seg: Le32::from(p.max_dwz_segments),
            write_zeroes_may_unmap: 1,
            ..Default::default()
        }
    }

    /// Answers a configuration read: exactly `len` bytes (at most [`MAX_CONFIG_WINDOW`]) starting
    /// at `offset`; bytes past the end of the structure read as zeros. Never panics.
    pub fn read_window(&self, offset: u32, len: u32) -> Vec<u8> {
        let len = len.min(MAX_CONFIG_WINDOW) as usize;
        let mut out = vec![0u8; len];
        let bytes = self.as_slice();
        if let Some(src) = bytes.get(offset as usize..) {
            let n = src.len().min(len);
            if let (Some(dst), Some(src)) = (out.get_mut(..n), src.get(..n)) {
                dst.copy_from_slice(src);
            }
        }
        out
    }

    /// Applies a configuration write. Only the one-byte `writeback` field is writable (virtio
    /// spec 5.2.5: with VIRTIO_BLK_F_CONFIG_WCE the driver may switch the cache mode).
    pub fn write_window(&mut self, offset: u32, data: &[u8]) -> Result<(), ConfigError> {
        match data {
            [v] if offset == WRITEBACK_OFFSET => match *v {
                0 | 1 => {
                    self.writeback = *v;
                    Ok(())
                }
                other => Err(ConfigError::InvalidWriteback(other)),
            },
            _ => Err(ConfigError::ReadOnlyField {
                offset,
                len: data.len(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> ConfigParams {
        ConfigParams {
            capacity_bytes: 8 << 30,
            logical_block_size: 512,
            physical_block_size: 4096,
            seg_max: 254,
            num_queues: 4,
            writeback: true,
            max_dwz_sectors: 1 << 22,
            max_dwz_segments: 32,
        }
    }

    #[test]
    fn fields_sit_at_spec_offsets() {
        let c = BlkConfig::new(&params());
        let b = c.as_slice();
        assert_eq!(
            u64::from_le_bytes(b[0..8].try_into().unwrap()),
            (8u64 << 30) / 512
        );
        assert_eq!(u32::from_le_bytes(b[12..16].try_into().unwrap()), 254);
        assert_eq!(u32::from_le_bytes(b[20..24].try_into().unwrap()), 512);
        assert_eq!(
            b[24], 3,
            "4096 / 512 = 2^3 logical blocks per physical block"
        );
        assert_eq!(u16::from_le_bytes(b[26..28].try_into().unwrap()), 8);
        assert_eq!(b[32], 1, "writeback");
        assert_eq!(u16::from_le_bytes(b[34..36].try_into().unwrap()), 4);
        assert_eq!(u32::from_le_bytes(b[36..40].try_into().unwrap()), 1 << 22);
        assert_eq!(u32::from_le_bytes(b[40..44].try_into().unwrap()), 32);
        assert_eq!(u32::from_le_bytes(b[44..48].try_into().unwrap()), 8);
        assert_eq!(u32::from_le_bytes(b[48..52].try_into().unwrap()), 1 << 22);
        assert_eq!(u32::from_le_bytes(b[52..56].try_into().unwrap()), 32);
        assert_eq!(b[56], 1, "write_zeroes_may_unmap");
    }

    #[test]
    fn every_window_reads_the_right_bytes() {
        let c = BlkConfig::new(&params());
        let full = c.as_slice().to_vec();
        for offset in 0..=(full.len() as u32 + 16) {
            for len in 0..=(full.len() as u32 + 16) {
                let w = c.read_window(offset, len);
                assert_eq!(w.len(), len as usize);
                for (i, byte) in w.iter().enumerate() {
                    let expect = full.get(offset as usize + i).copied().unwrap_or(0);
                    assert_eq!(*byte, expect, "offset {offset} len {len} byte {i}");
                }
            }
        }
    }

    #[test]
    fn extreme_windows_are_clamped() {
        let c = BlkConfig::new(&params());
        assert_eq!(c.read_window(u32::MAX, 8), vec![0; 8]);
        assert_eq!(c.read_window(0, u32::MAX).len(), MAX_CONFIG_WINDOW as usize);
        assert_eq!(c.read_window(u32::MAX, u32::MAX).len(), 4096);
    }

    #[test]
    fn only_writeback_is_writable() {
        let mut c = BlkConfig::new(&params());
        c.write_window(WRITEBACK_OFFSET, &[0]).unwrap();
        assert_eq!(c.writeback, 0);
        c.write_window(WRITEBACK_OFFSET, &[1]).unwrap();
        assert_eq!(c.writeback, 1);
        assert_eq!(
            c.write_window(WRITEBACK_OFFSET, &[2]),
            Err(ConfigError::InvalidWriteback(2))
        );
        assert!(c.write_window(0, &[0; 8]).is_err());
        assert!(c.write_window(WRITEBACK_OFFSET, &[1, 0]).is_err());
        assert!(c.write_window(u32::MAX, &[1]).is_err());
        assert_eq!(c.writeback, 1);
    }
}
