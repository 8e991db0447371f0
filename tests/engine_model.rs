//! Model-based property test of the image engine: random sequences of aligned and sub-block
//! writes, discards, write-zeroes, flushes and reopens, checked against a plain byte vector plus
//! a snapshot per seq. After every operation the whole disk reads as the model; at the end every
//! past seq's `state_at` view, and every block its `resolve` names (read with `read_block`),
//! agrees with the snapshot of that seq.

use proptest::prelude::*;
use rr_row::image::{CreateOptions, Extent, Image, OpenMode};
use rr_row::units::{BlockSize, Lba, Seq};

#[derive(Debug, Clone)]
enum Op {
    /// Write `len` sectors at sector `off`, filled from `seed`.
    Write {
        off: u64,
        len: u64,
        seed: u8,
    },
    /// Block-aligned write of `blocks` blocks at block `blk`.
    WriteBlocks {
        blk: u64,
        blocks: u64,
        seed: u8,
    },
    Discard {
        off: u64,
        len: u64,
    },
    WriteZeroes {
        off: u64,
        len: u64,
    },
    Flush,
    /// Reopen; `close` says whether `close()` is called first (else the image is dropped).
    Reopen {
        close: bool,
    },
}

#[derive(Debug, Clone)]
struct Case {
    bs: u32,
    blocks: u64,
    /// Sectors cut from the end (a partial last block).
    short: u64,
    base: bool,
    ckpt_threshold: u64,
    unsynced_limit: u64,
    ops: Vec<Op>,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (any::<u64>(), 1u64..300, any::<u8>()).prop_map(|(off, len, seed)| Op::Write { off, len, seed }),
        4 => (any::<u64>(), 1u64..4, any::<u8>()).prop_map(|(blk, blocks, seed)| Op::WriteBlocks { blk, blocks, seed }),
        1 => (any::<u64>(), 1u64..300).prop_map(|(off, len)| Op::Discard { off, len }),
        1 => (any::<u64>(), 1u64..300).prop_map(|(off, len)| Op::WriteZeroes { off, len }),
        1 => Just(Op::Flush),
        1 => any::<bool>().prop_map(|close| Op::Reopen { close }),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop_oneof![3 => Just(4096u32), 2 => Just(512u32), 1 => Just(65536u32)],
        4u64..24,
        0u64..3,
        any::<bool>(),
        prop_oneof![Just(u64::MAX), Just(0u64), Just(2048u64)],
        prop_oneof![Just(u64::MAX), Just(0u64), Just(100_000u64)],
        proptest::collection::vec(op(), 1..40),
    )
        .prop_map(
            |(bs, blocks, short, base, ckpt_threshold, unsynced_limit, ops)| Case {
                bs,
                blocks,
                short,
                base,
                ckpt_threshold,
                unsynced_limit,
                ops,
            },
        )
}

fn pattern(seed: u8, off: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            let x = off + i as u64;
            (x as u8) ^ seed ^ ((x >> 9) as u8).wrapping_mul(31)
        })
        .collect()
}

/// Clamps a random (offset, length) in sectors to the disk.
fn clamp(size: u64, off: u64, len: u64) -> (u64, u64) {
    let sectors = size / 512;
    let o = off % sectors;
    let l = len.min(sectors - o).max(1);
    (o * 512, l * 512)
}

fn run(c: Case) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.rrow");
    let bs = c.bs as u64;
    let size = c.blocks * bs - (c.short * 512).min(bs - 512);
    let mut model = vec![0u8; size as usize];
    let base = if c.base {
        let p = dir.path().join("base.raw");
        // Shorter than the disk: the tail reads zeros.
        let blen = size - size / 3;
        let b = pattern(0x5a, 0, blen as usize);
        model[..blen as usize].copy_from_slice(&b);
        std::fs::write(&p, &b).unwrap();
        Some(p)
    } else {
        None
    };
    let opts = CreateOptions {
        size,
        block_size: BlockSize::new(c.bs).unwrap(),
        base,
    };
    let mut img = Some(Image::create(&path, &opts).unwrap());
    img.as_ref()
        .unwrap()
        .set_checkpoint_threshold(c.ckpt_threshold);
    let mut snaps: Vec<Vec<u8>> = vec![model.clone()];
    for op in &c.ops {
        let im = img.as_ref().unwrap();
        match *op {
            Op::Write { off, len, seed } => {
                let (o, l) = clamp(size, off, len);
                let data = pattern(seed, o, l as usize);
                let w = im.write_at(o, &data).unwrap();
                model[o as usize..(o + l) as usize].copy_from_slice(&data);
                snaps.push(model.clone());
                assert_eq!(w.seq, Seq(snaps.len() as u64 - 1));
                let first = o / bs;
                let last = (o + l - 1) / bs;
                assert_eq!(w.blocks, last - first + 1);
            }
            Op::WriteBlocks { blk, blocks, seed } => {
                let full = size / bs;
                if full == 0 {
                    continue;
                }
                let b = blk % full;
                let n = blocks.min(full - b);
                let o = b * bs;
                let data = pattern(seed, o, (n * bs) as usize);
                let w = im.write_at(o, &data).unwrap();
                model[o as usize..(o + n * bs) as usize].copy_from_slice(&data);
                snaps.push(model.clone());
                assert_eq!(w.seq, Seq(snaps.len() as u64 - 1));
                assert_eq!(w.blocks, n);
            }
            Op::Discard { off, len } | Op::WriteZeroes { off, len } => {
                let (o, l) = clamp(size, off, len);
                let s = if matches!(op, Op::Discard { .. }) {
                    im.discard(o, l).unwrap()
                } else {
                    im.write_zeroes(o, l).unwrap()
                };
                model[o as usize..(o + l) as usize].fill(0);
                snaps.push(model.clone());
                assert_eq!(s, Seq(snaps.len() as u64 - 1));
            }
            Op::Flush => im.flush().unwrap(),
            Op::Reopen { close } => {
                let i = img.take().unwrap();
                if close {
                    i.close().unwrap();
                } else {
                    drop(i);
                }
                let i = Image::open(&path, OpenMode::ReadWrite).unwrap();
                i.set_checkpoint_threshold(c.ckpt_threshold);
                i.set_unsynced_limit(c.unsynced_limit);
                img = Some(i);
            }
        }
        let im = img.as_ref().unwrap();
        assert_eq!(im.seq(), Seq(snaps.len() as u64 - 1));
        let mut buf = vec![0u8; size as usize];
        im.read_at(0, &mut buf).unwrap();
        assert!(buf == model, "disk differs from the model after {op:?}");
    }
    let im = img.as_ref().unwrap();
    // Every past state, through state_at and through read_block of the extents it resolves.
    let nblocks = size.div_ceil(bs);
    for (seq, snap) in snaps.iter().enumerate() {
        let s = im.state_at(Seq(seq as u64)).unwrap();
        assert_eq!(s.seq(), Seq(seq as u64));
        let mut buf = vec![0u8; size as usize];
        s.read_at(0, &mut buf).unwrap();
        assert!(&buf == snap, "state_at({seq}) differs from the model");
        let ex = s.resolve(Lba(0), nblocks).unwrap();
        assert_eq!(ex.iter().map(|e| e.blocks()).sum::<u64>(), nblocks);
        let mut lba = 0u64;
        let mut blk = vec![0u8; bs as usize];
        for e in ex {
            if let Extent::Mapped { pba, blocks } = e {
                for i in 0..blocks {
                    im.read_block(rr_row::units::Pba(pba.0 + i), &mut blk)
                        .unwrap();
                    let start = ((lba + i) * bs) as usize;
                    let end = (start + bs as usize).min(size as usize);
                    assert_eq!(
                        &blk[..end - start],
                        &snap[start..end],
                        "read_block at seq {seq}"
                    );
                }
            }
            lba += e.blocks();
        }
    }
    // The current state through the live resolve and read_extents.
    let ex = im.resolve(Lba(0), nblocks).unwrap();
    let mut buf = vec![0u8; size as usize];
    im.read_extents(&ex, 0, &[rr_row::iobuf::IoSeg::from_mut_slice(&mut buf)])
        .unwrap();
    assert!(buf == model);
    // The image checks clean.
    let i = img.take().unwrap();
    i.close().unwrap();
    let r = Image::check(&path, false).unwrap();
    assert!(r.is_clean(), "{r:?}");
    assert_eq!(r.seq, snaps.len() as u64 - 1);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn engine_agrees_with_model(c in case()) {
        run(c);
    }
}
