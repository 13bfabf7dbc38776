//! virtiofsd, the vhost-user back-end of virtio-fs, started as Kata starts it for a pod.
//! `scripts/setup.sh` builds it into the cache; `PODVMM_VIRTIOFSD` names another one.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::path_str;

pub fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("PODVMM_VIRTIOFSD") {
        return PathBuf::from(p);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .expect("HOME or XDG_CACHE_HOME");
    let p = cache.join("podvmm/virtiofsd-1.14.0/bin/virtiofsd");
    assert!(
        p.is_file(),
        "{} is missing: scripts/setup.sh builds it (or set PODVMM_VIRTIOFSD)",
        p.display()
    );
    p
}

/// One virtiofsd serving `shared` on `socket`; killed on drop.
pub struct Virtiofsd {
    child: Option<Child>,
    pub socket: PathBuf,
    pub log: PathBuf,
}

impl Virtiofsd {
    /// Kata's arguments: `--socket-path`, `--shared-dir`, `--cache`, one request thread,
    /// submounts announced. As root, virtiofsd's default sandbox (namespaces) applies.
    pub fn start(shared: &Path, socket: &Path, log: &Path) -> Virtiofsd {
        let _ = std::fs::remove_file(socket);
        let child = Command::new(binary())
            .arg(format!("--socket-path={}", path_str(socket)))
            .arg(format!("--shared-dir={}", path_str(shared)))
            .args([
                "--cache=auto",
                "--thread-pool-size=1",
                "--announce-submounts",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).expect("virtiofsd log"))
            .spawn()
            .expect("start virtiofsd");
        let mut v = Virtiofsd {
            child: Some(child),
            socket: socket.to_owned(),
            log: log.to_owned(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !socket.exists() {
            if let Some(status) = v.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("virtiofsd exited ({status}): {}", v.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "virtiofsd never listened: {}",
                v.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        v
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Kills it as a crash would (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        self.kill();
    }
}
