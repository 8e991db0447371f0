//! Image set-up shared by the engine, record and CLI tests.

use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rr_row::image::{CreateOptions, Image};
use rr_row::units::BlockSize;

/// Creates a fresh image at `path`: `size` bytes in blocks of `block_size` bytes, no base.
pub fn create_image(path: &Path, size: u64, block_size: u32) -> Image {
    let opts = CreateOptions {
        size,
        block_size: BlockSize::new(block_size).expect("bad block size"),
        base: None,
    };
    Image::create(path, &opts).unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()))
}

/// Writes seeded random data, `chunk` bytes at every multiple of `stride` below the image's
/// size, in offset order (one `write_at` per chunk, each filled by the same `StdRng`).
pub fn write_random(img: &Image, seed: u64, chunk: usize, stride: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut data = vec![0u8; chunk];
    let mut offset = 0;
    while offset < img.size() {
        rng.fill(&mut data[..]);
        img.write_at(offset, &data).expect("write_at failed");
        offset += stride;
    }
}
