//! The real-guest tier: test assets, the guest's initramfs, and a QEMU (TCG) runner.
//!
//! `scripts/guest-assets.sh` (run by `scripts/test.sh`) prepares a private QEMU, Debian's
//! kernel as an uncompressed vmlinux and the files of the guest root under the folder named by
//! `RR_ROW_TEST_ASSETS`; this module packs the guest root and a test's /init into an
//! uncompressed newc cpio, boots it with a vhost-user-blk disk, and returns what the guest said
//! on its serial console.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The environment variable naming the assets folder.
pub const ASSETS_ENV: &str = "RR_ROW_TEST_ASSETS";

/// Where the prepared assets are.
#[derive(Clone, Debug)]
pub struct Assets {
    root: PathBuf,
}

impl Assets {
    /// The assets named by `RR_ROW_TEST_ASSETS`; fails the test (never skips it) when the
    /// variable is unset or the folder is not ready.
    pub fn get() -> Assets {
        let root = std::env::var_os(ASSETS_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                panic!(
                    "{ASSETS_ENV} is not set: run the tests through ./scripts/test.sh, or run \
                 scripts/guest-assets.sh and export {ASSETS_ENV}=<repo>/.test-assets"
                )
            });
        assert!(
            root.join("READY").is_file(),
            "{ASSETS_ENV}={} is not a ready assets folder (no READY file): run \
             scripts/guest-assets.sh",
            root.display()
        );
        Assets { root }
    }

    /// The private qemu-system-x86_64.
    pub fn qemu(&self) -> PathBuf {
        self.root.join("qemu/usr/bin/qemu-system-x86_64")
    }

    /// QEMU's module folder (TCG is a module in Debian's build).
    pub fn qemu_module_dir(&self) -> PathBuf {
        self.root.join("qemu/usr/lib/x86_64-linux-gnu/qemu")
    }

    /// QEMU's firmware folders, for `-L`.
    pub fn qemu_data_dirs(&self) -> [PathBuf; 2] {
        [
            self.root.join("qemu/usr/share/qemu"),
            self.root.join("qemu/usr/share/seabios"),
        ]
    }

    /// The uncompressed kernel (booted through its PVH entry).
    pub fn vmlinux(&self) -> PathBuf {
        self.root.join("kernel/vmlinux")
    }

    /// The files of the guest root (busybox, e2fsprogs, modules).
    pub fn guest_root(&self) -> PathBuf {
        self.root.join("guest")
    }
}

/// A writer of uncompressed "newc" cpio archives, the initramfs format the kernel unpacks.
pub struct Cpio {
    out: Vec<u8>,
    ino: u32,
}

impl Default for Cpio {
    fn default() -> Self {
        Self::new()
    }
}

impl Cpio {
    /// An empty archive.
    pub fn new() -> Cpio {
        Cpio {
            out: Vec::new(),
            ino: 1,
        }
    }

    fn pad4(&mut self) {
        while self.out.len() % 4 != 0 {
            self.out.push(0);
        }
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        let name = name.trim_start_matches('/');
        let fields = [
            self.ino,
            mode,
            0, // uid
            0, // gid
            1, // nlink
            0, // mtime
            u32::try_from(data.len()).expect("file too big for cpio"),
            0, // devmajor
            0, // devminor
            rdev.0,
            rdev.1,
            u32::try_from(name.len() + 1).expect("name too long"),
            0, // check
        ];
        self.ino += 1;
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad4();
        self.out.extend_from_slice(data);
        self.pad4();
    }

    /// Adds a directory.
    pub fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, (0, 0), &[]);
    }

    /// Adds a regular file with permission bits `perm`.
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100000 | (perm & 0o7777), (0, 0), data);
    }

    /// Adds a character device node.
    pub fn char_dev(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, 0o020600, (major, minor), &[]);
    }

    /// Adds the tree under `src` (directories and regular files) below `dest`.
    pub fn tree(&mut self, src: &Path, dest: &str) {
        use std::os::unix::fs::PermissionsExt;
        let mut entries: Vec<_> = std::fs::read_dir(src)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", src.display()))
            .map(|e| e.expect("cannot read a directory entry"))
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let name = format!("{dest}/{}", e.file_name().to_string_lossy());
            let meta = std::fs::metadata(e.path()).expect("cannot stat a guest file");
            if meta.is_dir() {
                self.dir(&name);
                self.tree(&e.path(), &name);
            } else {
                let data = std::fs::read(e.path()).expect("cannot read a guest file");
                self.file(&name, meta.permissions().mode(), &data);
            }
        }
    }

    /// Ends the archive and returns its bytes.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.out
    }
}

/// Builds the test initramfs: the prepared guest root, `/init`, `/rrrow-boot.sh` (the start
/// every /init sources, tests/guest/boot.sh), and extra files.
pub fn build_initramfs(assets: &Assets, init: &str, extra: &[(&str, &[u8])], out: &Path) {
    let mut c = Cpio::new();
    for d in [
        "dev", "proc", "sys", "mnt", "tmp", "root", "usr", "usr/bin", "usr/sbin",
    ] {
        c.dir(d);
    }
    c.char_dev("dev/console", 5, 1);
    c.char_dev("dev/null", 1, 3);
    c.tree(&assets.guest_root(), "");
    c.file("init", 0o755, init.as_bytes());
    // The start every /init shares (they source it).
    c.file(
        "rrrow-boot.sh",
        0o644,
        include_bytes!("../guest/boot.sh").as_slice(),
    );
    for (name, data) in extra {
        c.file(name, 0o644, data);
    }
    std::fs::write(out, c.finish()).expect("cannot write the initramfs");
}

/// How to boot the guest.
#[derive(Clone, Debug)]
pub struct GuestOpts {
    /// The vhost-user-blk socket of the disk.
    pub socket: PathBuf,
    /// The initramfs.
    pub initramfs: PathBuf,
    /// Appended to the kernel command line.
    pub cmdline: String,
    /// Virtual CPUs (also the number of virtqueues).
    pub cpus: u32,
    /// Guest memory in MiB.
    pub mem_mib: u32,
    /// Where to keep the full serial console log.
    pub console_log: PathBuf,
    /// Kill QEMU and fail the test after this long.
    pub limit: Duration,
}

/// What one boot produced.
pub struct GuestRun {
    /// How QEMU exited.
    pub status: ExitStatus,
    /// Everything the guest printed on its serial console.
    pub console: String,
    /// How long the boot took, start to power-off.
    pub elapsed: Duration,
}

impl GuestRun {
    /// The values of the guest's `RRROW: key value` report lines, in order.
    pub fn reports(&self, key: &str) -> Vec<String> {
        let prefix = format!("RRROW: {key} ");
        self.console
            .lines()
            .filter_map(|l| l.trim_end_matches('\r').split_once(&prefix))
            .map(|(_, v)| v.trim().to_owned())
            .collect()
    }

    /// The single value reported for `key`; fails the test, showing the console, otherwise.
    pub fn report(&self, key: &str) -> String {
        let v = self.reports(key);
        assert_eq!(
            v.len(),
            1,
            "expected exactly one `RRROW: {key}` line; console:\n{}",
            self.console
        );
        v.into_iter().next().expect("one value")
    }

    /// Asserts the guest finished `phase` (its `done` report) without reporting a failure.
    pub fn assert_phase_done(&self, phase: &str) {
        assert!(
            self.reports("FAIL").is_empty(),
            "the guest reported a failure in phase {phase}; console:\n{}",
            self.console
        );
        assert_eq!(self.report("done"), phase, "console:\n{}", self.console);
    }
}

/// Boots QEMU (TCG, q35, memfd-shared RAM, vhost-user-blk-pci disk, PVH vmlinux) until the
/// guest powers off; fails the test if it runs past `opts.limit`.
pub fn boot(assets: &Assets, opts: &GuestOpts) -> GuestRun {
    let [data1, data2] = assets.qemu_data_dirs();
    let mem = format!("{}M", opts.mem_mib);
    let mut cmd = Command::new(assets.qemu());
    cmd.env("QEMU_MODULE_DIR", assets.qemu_module_dir())
        .arg("-L")
        .arg(data1)
        .arg("-L")
        .arg(data2)
        .args([
            "-nodefaults",
            "-no-user-config",
            "-no-reboot",
            "-display",
            "none",
        ])
        .args([
            "-machine",
            "q35,memory-backend=mem",
            "-accel",
            "tcg",
            "-cpu",
            "max",
        ])
        .args(["-smp", &opts.cpus.to_string(), "-m", &mem])
        .arg("-object")
        .arg(format!("memory-backend-memfd,id=mem,size={mem},share=on"))
        .args(["-serial", "stdio"])
        .arg("-kernel")
        .arg(assets.vmlinux())
        .arg("-initrd")
        .arg(&opts.initramfs)
        .arg("-append")
        .arg(format!("console=ttyS0 panic=-1 quiet {}", opts.cmdline))
        .arg("-chardev")
        .arg(format!("socket,id=disk0,path={}", opts.socket.display()))
        .arg("-device")
        .arg(format!(
            "vhost-user-blk-pci,chardev=disk0,num-queues={}",
            opts.cpus
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd.spawn().expect("cannot start qemu-system-x86_64");
    let stdout = child.stdout.take().expect("piped stdout");
    let stderr = child.stderr.take().expect("piped stderr");
    let log_path = opts.console_log.clone();
    let reader = std::thread::spawn(move || {
        let mut log = std::fs::File::create(&log_path).expect("cannot create the console log");
        let mut all = String::new();
        for line in BufReader::new(stdout).split(b'\n') {
            let Ok(line) = line else { break };
            let line = String::from_utf8_lossy(&line).into_owned();
            let _ = writeln!(log, "{line}");
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut BufReader::new(stderr), &mut s);
        s
    });
    let mut timed_out = false;
    let status = loop {
        if let Ok(Some(s)) = child.try_wait() {
            break s;
        }
        if start.elapsed() >= opts.limit {
            timed_out = true;
            let _ = child.kill();
            break child.wait().expect("cannot reap qemu");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let console = reader.join().unwrap_or_default();
    let qemu_err = err_reader.join().unwrap_or_default();
    assert!(
        !timed_out,
        "the guest did not power off within {:?}; console:\n{console}\nqemu stderr:\n{qemu_err}",
        opts.limit
    );
    assert!(
        status.success(),
        "qemu failed ({status}); console:\n{console}\nqemu stderr:\n{qemu_err}"
    );
    GuestRun {
        status,
        console,
        elapsed: start.elapsed(),
    }
}
