//! The freestanding test guest (`testguest/`, see docs/testguest.md): building it, disks
//! holding the pattern it checks, running it under podvmm and reading its `TESTGUEST` lines.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::OnceLock;

/// The pattern the guest expects on a disk: the 8-byte little-endian word at byte offset
/// `o` holds `o ^ DISK_KEY` (`testguest/src/blk.rs`).
pub const DISK_KEY: u64 = 0x5445_5354_4755_4553;
/// What the guest's write test writes: `o ^ WRITE_KEY`.
pub const WRITE_KEY: u64 = 0x5752_4954_5445_5354;

/// The test guest's ELF, built once per test process (cargo's own lock on the target
/// directory serialises builds from several test processes). `PODVMM_TESTGUEST=<path>` uses
/// a prebuilt image instead.
pub fn testguest() -> PathBuf {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match BUILT.get_or_init(build) {
        Ok(p) => p.clone(),
        Err(e) => panic!("{e}"),
    }
}

/// The test guest is an x86-64 image built with the host's toolchain.
const TESTGUEST_TARGET: &str = "x86_64-unknown-linux-gnu";

fn build() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("PODVMM_TESTGUEST") {
        return Ok(PathBuf::from(p));
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target_dir = root.join("target").join("testguest");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    // The guest's link arguments come from its build.rs; flags meant for podvmm (RUSTFLAGS,
    // the workspace's static linking in .cargo/config.toml) must not reach it. An empty
    // CARGO_ENCODED_RUSTFLAGS is the first source cargo looks at and holds no flags; the
    // explicit target fixes where the image lands, whatever the configuration says.
    let out = Command::new(cargo)
        .args(["build", "--release", "--quiet", "--manifest-path"])
        .arg(root.join("testguest").join("Cargo.toml"))
        .args(["--target", TESTGUEST_TARGET])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("CARGO_ENCODED_RUSTFLAGS", "")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run cargo to build the test guest: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "building the test guest failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(target_dir
        .join(TESTGUEST_TARGET)
        .join("release")
        .join("testguest"))
}

/// Writes a disk image of `size` bytes (a multiple of 8) holding the guest's pattern.
pub fn pattern_disk(path: &Path, size: u64) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).expect("create disk"));
    let mut chunk = Vec::with_capacity(1 << 20);
    let mut o = 0u64;
    while o < size {
        chunk.clear();
        let end = (o + (1 << 20)).min(size);
        while o < end {
            chunk.extend_from_slice(&(o ^ DISK_KEY).to_le_bytes());
            o += 8;
        }
        f.write_all(&chunk).expect("write disk");
    }
    f.flush().expect("flush disk");
}

/// Returns the first offset in `bytes` (which start at disk offset `base`) that does not
/// hold the pattern of `key`.
pub fn first_mismatch(bytes: &[u8], base: u64, key: u64) -> Option<u64> {
    bytes.chunks_exact(8).enumerate().find_map(|(i, w)| {
        let o = base + 8 * i as u64;
        (u64::from_le_bytes(w.try_into().unwrap()) != o ^ key).then_some(o)
    })
}

/// One run of the test guest.
pub struct GuestRun {
    pub stdout: String,
    pub stderr: String,
    pub status: ExitStatus,
}

/// Boots the test guest with `cmdline` (our options; podvmm appends the devices) and the
/// extra podvmm arguments `args`, killing it after `timeout_s` seconds.
pub fn run_testguest(cmdline: &str, args: &[&str], timeout_s: u32) -> GuestRun {
    run_testguest_under(&[], cmdline, args, timeout_s)
}

/// [`run_testguest`] with podvmm started through `wrapper` (e.g. `ip netns exec NAME`).
pub fn run_testguest_under(
    wrapper: &[&str],
    cmdline: &str,
    args: &[&str],
    timeout_s: u32,
) -> GuestRun {
    let out = testguest_command(wrapper, cmdline, args, timeout_s)
        .output()
        .expect("run podvmm");
    GuestRun::from_output(out)
}

/// The command [`run_testguest_under`] runs, for a caller that adjusts it first.
pub fn testguest_command(
    wrapper: &[&str],
    cmdline: &str,
    args: &[&str],
    timeout_s: u32,
) -> Command {
    let kernel = testguest();
    let (program, wrapper_args) = match wrapper.split_first() {
        Some((p, rest)) => (*p, rest),
        None => ("env", &[][..]),
    };
    let mut cmd = Command::new(program);
    cmd.args(wrapper_args)
        .arg("timeout")
        .arg("--kill-after=5")
        .arg(timeout_s.to_string())
        .arg(env!("CARGO_BIN_EXE_podvmm"))
        .arg("--kernel")
        .arg(&kernel)
        .args([
            "--memory",
            "size=256M",
            "--serial",
            "tty",
            "--cmdline",
            cmdline,
        ])
        .args(args)
        .stdin(Stdio::null());
    cmd
}

impl GuestRun {
    pub fn from_output(out: std::process::Output) -> Self {
        GuestRun {
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            status: out.status,
        }
    }

    /// The `key=value` pairs of every `TESTGUEST <kind> ...` line.
    pub fn lines(&self, kind: &str) -> Vec<HashMap<String, String>> {
        self.stdout
            .lines()
            .filter_map(|l| l.strip_prefix("TESTGUEST "))
            .filter_map(|l| l.strip_prefix(kind)?.strip_prefix(' '))
            .map(|rest| {
                rest.split_whitespace()
                    .filter_map(|w| w.split_once('='))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            })
            .collect()
    }

    /// `key` of the first `TESTGUEST <kind>` line that has `key`.
    pub fn value(&self, kind: &str, key: &str) -> Option<String> {
        self.lines(kind).into_iter().find_map(|mut m| m.remove(key))
    }

    /// `key` of the first `TESTGUEST <kind> <sub> ...` line (e.g. `blk iops`), as a number.
    pub fn num(&self, kind: &str, sub: &str, key: &str) -> Option<u64> {
        self.stdout
            .lines()
            .filter_map(|l| l.strip_prefix("TESTGUEST "))
            .filter_map(|l| {
                l.strip_prefix(kind)?
                    .strip_prefix(' ')?
                    .strip_prefix(sub)?
                    .strip_prefix(' ')
            })
            .flat_map(|rest| rest.split_whitespace())
            .find_map(|w| w.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
    }

    /// The status of test `name` (`pass`, `fail`, `skip`), from its `result` line.
    pub fn result(&self, name: &str) -> Option<String> {
        self.lines("result")
            .into_iter()
            .find(|m| m.get("test").map(String::as_str) == Some(name))
            .and_then(|mut m| m.remove("status"))
    }

    /// Everything, for assertion messages.
    pub fn dump(&self) -> String {
        format!(
            "status: {}\n--- guest console ---\n{}--- podvmm stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }

    /// Asserts that hostile suite `suite` ran at least `at_least` cases, each refused
    /// (accepted=1) and recovered from (recovered=1), and that the suite passed; returns
    /// how many cases ran.
    pub fn assert_hostile_cases(&self, suite: &str, at_least: usize) -> usize {
        let lines = self.lines(suite);
        let cases: Vec<_> = lines.iter().filter(|m| m.contains_key("case")).collect();
        assert!(
            cases.len() >= at_least,
            "{suite}: only {} cases ran\n{}",
            cases.len(),
            self.dump()
        );
        for c in &cases {
            assert_eq!(
                (c["accepted"].as_str(), c["recovered"].as_str()),
                ("1", "1"),
                "{suite} case {} ({})\n{}",
                c["case"],
                c["outcome"],
                self.dump()
            );
        }
        self.assert_passed(suite);
        cases.len()
    }

    /// Asserts that the guest ran test `name` to a pass, reached its `end` line with every
    /// test passed, and reset the machine (podvmm exit 0).
    pub fn assert_passed(&self, name: &str) {
        assert_eq!(
            self.result(name).as_deref(),
            Some("pass"),
            "{}",
            self.dump()
        );
        assert_eq!(
            self.value("end", "status").as_deref(),
            Some("pass"),
            "{}",
            self.dump()
        );
        assert!(self.status.success(), "{}", self.dump());
    }
}

const NS_PREFIX: &str = "podvmm-tg";
pub const HOST_IP: &str = "10.79.0.1";
pub const GUEST_IP: &str = "10.79.0.2";
pub const GUEST_MAC: &str = "02:00:0a:4f:00:02";

/// A network namespace of the test's own (needs root and iproute2), deleted on drop, so
/// the test guest's TAP traffic never leaves the machine.
pub struct Netns(pub String);

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let name = format!("{NS_PREFIX}-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .expect("run ip");
        assert!(
            out.status.success(),
            "ip netns add (this test needs root and iproute2): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Netns(name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}
