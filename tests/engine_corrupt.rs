//! Hostile file content: random byte flips, overwrites and truncations anywhere in the
//! metadata of an image never make the engine panic or hang; every operation returns a value
//! or a typed error, and `check` (without --repair) never modifies the file.

use proptest::prelude::*;
mod common;

use common::image::create_image;
use rr_row::image::{Image, OpenMode};
use rr_row::units::{Lba, Seq};

fn template() -> &'static [u8] {
    static T: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    T.get_or_init(build_template)
}

fn build_template() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.rrow");
    let img = create_image(&p, 256 * 1024, 4096);
    for i in 0..30u64 {
        img.write_at((i * 7 % 64) * 4096, &[i as u8; 4096]).unwrap();
        if i % 4 == 0 {
            img.write_at((i % 64) * 4096 + 512, &[0xcc; 1024]).unwrap();
            img.discard((i % 60) * 4096, 8192).unwrap();
            img.flush().unwrap();
        }
        if i == 15 {
            img.checkpoint().unwrap();
        }
    }
    drop(img);
    std::fs::read(&p).unwrap()
}

#[derive(Debug, Clone)]
enum Damage {
    Flip { at: usize, bit: u8 },
    Put { at: usize, bytes: Vec<u8> },
    Truncate { at: usize },
}

fn damage(len: usize) -> impl Strategy<Value = Damage> {
    // Mostly the metadata: headers, journal segment 0 and the checkpoint near the end.
    let hot = prop_oneof![
        0usize..8192,
        65536usize..65536 + 8192,
        (len - 8192)..len,
        0usize..len,
    ];
    prop_oneof![
        3 => (hot.clone(), 0u8..8).prop_map(|(at, bit)| Damage::Flip { at, bit }),
        2 => (hot.clone(), proptest::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, bytes)| Damage::Put { at, bytes }),
        1 => hot.prop_map(|at| Damage::Truncate { at }),
    ]
}

fn exercise(path: &std::path::Path) {
    let before = std::fs::read(path).unwrap();
    if let Ok(img) = Image::open(path, OpenMode::ReadOnly) {
        let mut buf = vec![0u8; 256 * 1024];
        let _ = img.read_at(0, &mut buf);
        let _ = img.history(Lba(3));
        let _ = img.info();
        let _ = img.resolve(Lba(0), 64);
        let seq = img.seq();
        if let Ok(s) = img.state_at(Seq(seq.0 / 2)) {
            let _ = s.read_at(0, &mut buf);
        }
    }
    let _ = Image::check(path, false);
    assert_eq!(
        std::fs::read(path).unwrap(),
        before,
        "read-only use changed the file"
    );
    // Read-write open and repair must not panic either.
    let _ = Image::check(path, true);
    if let Ok(img) = Image::open(path, OpenMode::ReadWrite) {
        let _ = img.write_at(0, &[9u8; 4096]);
        let _ = img.flush();
        let _ = img.close();
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 150, ..ProptestConfig::default() })]
    #[test]
    fn damaged_images_never_panic(ds in proptest::collection::vec(damage(template().len()), 1..4)) {
        let t = template();
        let mut f = t.to_vec();
        for d in ds {
            match d {
                Damage::Flip { at, bit } => {
                    if let Some(b) = f.get_mut(at % t.len()) {
                        *b ^= 1 << bit;
                    }
                }
                Damage::Put { at, bytes } => {
                    let at = at % t.len();
                    let end = (at + bytes.len()).min(f.len());
                    if at < end {
                        f[at..end].copy_from_slice(&bytes[..end - at]);
                    }
                }
                Damage::Truncate { at } => f.truncate(at % (t.len() + 1)),
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.rrow");
        std::fs::write(&p, &f).unwrap();
        exercise(&p);
    }
}
